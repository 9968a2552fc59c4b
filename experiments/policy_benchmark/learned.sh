#!/usr/bin/env bash
# The policy benchmark's scored cells again, with the policies' view rates learned as the live
# executor learns them (`sim.view_rates=learned`, docs/simulator.md) instead of the engine models'
# nominal figures: does each policy's standing survive the estimates a live gateway would hand it?
#
#     bash experiments/policy_benchmark/learned.sh [extra Hydra overrides]
#
# 8 policies x 4 scenarios x 4 loads x 2 seeds = 256 runs (~4 min with N_JOBS=2 on 2 shared cores),
# then analyze.py's paired comparisons into reports/policy_benchmark/learned_rates/. Nothing is tuned
# on these runs; they are read beside the scored report (analysis.md, "Learned view rates").
set -euo pipefail
OUT=${SAGESCHED_LEARNED_DIR:-multirun/policy_benchmark-learned}
source "$(dirname "$0")/sweep.sh"
scenarios sim.view_rates=learned "$@"
"$PYTHON" "$HERE/analyze.py" "$OUT" --out reports/policy_benchmark/learned_rates \
    --title "Learned view rates (sim.view_rates=learned, seeds 1-2, the scored windows): paired comparisons"
