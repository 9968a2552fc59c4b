#!/usr/bin/env bash
# Held-out windows: the four scenarios of the policy benchmark on seeds 3-6, whose trace windows
# (0, 600, 1800 and 3000 s) the scored report (seeds 1-2: windows 1200 and 2400 s) never reads.
# Knobs are chosen on these seeds, then checked on the scored ones (no fitting to the scored cells).
#
#     bash experiments/policy_benchmark/heldout.sh [extra Hydra overrides]
#
# 8 policies x 4 scenarios x 4 loads x 4 seeds = 512 runs (~8 min with N_JOBS=1 on 2 shared cores),
# then analyze.py's paired comparisons into reports/policy_benchmark/heldout/.
# The window list keeps seeds 1 and 2 on their scored windows (index = seed mod 6).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${SAGESCHED_HELDOUT_DIR:-multirun/policy_benchmark-heldout}
HERE=experiments/policy_benchmark
JOBS=${N_JOBS:-1}
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
for scenario in azure_conv azure_code rag embedding_heavy; do
    start=$(date +%s)
    SAGESCHED_BENCH_DIR="$OUT" "$PYTHON" -m sagesched.experiment -m --config-dir "$HERE/conf" \
        "+benchmark=$scenario" "hydra.launcher.n_jobs=$JOBS" seed=3,4,5,6 \
        'window_starts_s=[3000.0,1200.0,2400.0,0.0,600.0,1800.0]' "$@" >"$OUT.$scenario.log" 2>&1 \
        || { tail -40 "$OUT.$scenario.log"; exit 1; }
    echo "$scenario: done in $(($(date +%s) - start)) s"
done
echo "runs: $(find "$OUT" -name summary.json | wc -l)"
"$PYTHON" "$HERE/analyze.py" "$OUT" --out reports/policy_benchmark/heldout \
    --title "Held-out windows (seeds 3-6: trace windows at 0, 600, 1800, 3000 s): paired comparisons"
