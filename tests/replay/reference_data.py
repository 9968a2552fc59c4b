"""Where the public reference runs live: `../shared/calibration`, beside the checkout, never inside it.

The project may read that data but not ship it (it carries no licence), so a clone elsewhere may
not have it. Looked up in order: `SAGESCHED_SHARED_DIR`, the checkout's `../shared`, and this
workplace's `/work/shared`. Tests that need it skip, saying where they looked, when none exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_CANDIDATES = [Path(p) for p in (os.environ.get("SAGESCHED_SHARED_DIR"),) if p] + [
    Path(__file__).resolve().parents[3] / "shared",
    Path("/work/shared"),
]

SHARED = next((p for p in _CANDIDATES if (p / "calibration").is_dir()), None)
CALIBRATION = (SHARED or _CANDIDATES[0]) / "calibration" / "vllm-h100-llama-2-7b"
WHERE = ", ".join(str(p) for p in _CANDIDATES)
needs_reference_data = pytest.mark.skipif(
    SHARED is None,
    reason=f"reference runs not found (looked in {WHERE}); set SAGESCHED_SHARED_DIR to the shared folder",
)


def calibration_reports() -> list[Path]:
    return sorted(CALIBRATION.glob("*/results/*_lifecycle_metrics.json")) if SHARED is not None else []
