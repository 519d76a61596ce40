"""Experiment drivers built on the library: the demo, objective comparisons, the privileged comparison, toy studies."""
