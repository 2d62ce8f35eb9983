"""Shared pieces of train.py, eval.py and tools/: one job per module."""
