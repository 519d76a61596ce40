"""`opdlab diagnose`: the preconditions of the methods' claims, per pair and task, training-free (`run.py`)."""
