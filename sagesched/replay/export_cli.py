"""`sagesched export FORMAT RUN_DIR [--out FILE]` (sagesched.replay.formats holds the logic)."""

from sagesched.replay.formats import export_main as main

__all__ = ["main"]
