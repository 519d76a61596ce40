"""The fault suite: runs interrupted, starved of disk, fed a corrupted checkpoint, a failing teacher or changed
data, each checked to lose nothing. Its tests share the helpers of tests/test_train.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
