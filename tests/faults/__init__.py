"""The fault suite: runs interrupted, starved of disk, fed a damaged checkpoint, a failing teacher or changed data,
each checked to lose nothing. A package, so that pytest puts tests/ on the path and its tests share the helpers of
tests/test_train.py."""
