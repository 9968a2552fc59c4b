#!/usr/bin/env bash
# Part (ii) of reports/fidelity: the shipped llama-server (and its embedding server) calibrated from probes
# only, then a load sweep replayed live (twice: the noise floor) and simulated. About 15-20 minutes on a
# 2-core machine; run it on a quiet machine (its load average is recorded with each run).
set -euo pipefail
cd "$(dirname "$0")/.."
export SAGESCHED_LLAMA_THREADS="${SAGESCHED_LLAMA_THREADS:-1}"
python -m sagesched.calibrate.live_report --out reports/fidelity/live \
    --ship sagesched/data/profiles/calibration/llamacpp/gemma-3-270m-q4km-xeon-2cpu-t1.yaml "$@"
