"""Toy studies that run in seconds on a CPU (no language model): `estimators` is the OPD gradient-estimator study."""
