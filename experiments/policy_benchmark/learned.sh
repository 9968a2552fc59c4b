#!/usr/bin/env bash
# The policy benchmark's scored cells again, with the policies' view rates learned as the live
# executor learns them (`sim.view_rates=learned`, docs/simulator.md) instead of the engine models'
# nominal figures: does each policy's standing survive the estimates a live gateway would hand it?
#
#     bash experiments/policy_benchmark/learned.sh [extra Hydra overrides]
#
# 8 policies x 4 scenarios x 4 loads x 2 seeds = 256 runs (~10 min with N_JOBS=2 on 2 shared cores),
# then analyze.py's paired comparisons into reports/policy_benchmark/learned_rates/. Nothing is tuned
# on these runs; they are read beside the scored report (analysis.md, "Learned view rates").
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${SAGESCHED_LEARNED_DIR:-multirun/policy_benchmark-learned}
HERE=experiments/policy_benchmark
JOBS=${N_JOBS:-1}
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
for scenario in azure_conv azure_code rag embedding_heavy; do
    start=$(date +%s)
    SAGESCHED_BENCH_DIR="$OUT" "$PYTHON" -m sagesched.experiment -m --config-dir "$HERE/conf" \
        "+benchmark=$scenario" "hydra.launcher.n_jobs=$JOBS" sim.view_rates=learned "$@" \
        >"$OUT.$scenario.log" 2>&1 || { tail -40 "$OUT.$scenario.log"; exit 1; }
    echo "$scenario: done in $(($(date +%s) - start)) s"
done
echo "runs: $(find "$OUT" -name summary.json | wc -l)"
"$PYTHON" "$HERE/analyze.py" "$OUT" --out reports/policy_benchmark/learned_rates \
    --title "Learned view rates (sim.view_rates=learned, seeds 1-2, the scored windows): paired comparisons"
