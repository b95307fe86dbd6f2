"""Experiments and benchmarks (`python -m qunet experiment|bench|...`): kept apart from the core library."""
