#!/usr/bin/env bash
# Reproduce reports/fidelity (issue 11): leave-one-out on the public H100 runs, both operator paths.
# Usage: scripts/fidelity_report.sh [RUNS_FOLDER]   (default ../shared/calibration/vllm-h100-llama-2-7b)
set -euo pipefail
runs="${1:-../shared/calibration/vllm-h100-llama-2-7b}"
python -m sagesched.calibrate.report "$runs" --out reports/fidelity --operators roofline
python -m sagesched.calibrate.report "$runs" --out reports/fidelity
