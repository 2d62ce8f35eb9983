"""Command-line tools around maxvit.py, run from the repository root as ``python -m tools.NAME`` (docs/tools.md)."""
