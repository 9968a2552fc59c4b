"""`sagesched import FORMAT PATH --out DIR` (sagesched.replay.formats holds the logic)."""

from sagesched.replay.formats import import_main as main

__all__ = ["main"]
