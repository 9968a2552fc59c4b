#!/usr/bin/env bash
# Reproduce reports/policy_benchmark in one command, from the repository root or anywhere:
#
#     bash experiments/policy_benchmark/run.sh [extra Hydra overrides, e.g. hydra.launcher.n_jobs=8]
#
# Runs the four scenario sweeps (conf/benchmark/*.yaml: 10 policies x 4 loads x 3 seeds each, 480
# runs) on local cores with the joblib launcher, then writes the report: about 12 minutes on 2 busy cores.
# Set SAGESCHED_BENCH_DIR to keep the run folders elsewhere (default: multirun/policy_benchmark).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${SAGESCHED_BENCH_DIR:-multirun/policy_benchmark}
HERE=experiments/policy_benchmark
rm -rf "$OUT"
for scenario in azure_conv azure_code rag embedding_heavy; do
    start=$(date +%s)
    SAGESCHED_BENCH_DIR="$OUT" "$PYTHON" -m sagesched.experiment -m --config-dir "$HERE/conf" "+benchmark=$scenario" "$@" \
        >"$OUT.$scenario.log" 2>&1 || { tail -40 "$OUT.$scenario.log"; exit 1; }
    echo "$scenario: $(find "$OUT/$scenario" -name summary.json | wc -l) runs in $(( $(date +%s) - start )) s"
done
analysis=()
[[ -f "$HERE/analysis.md" ]] && analysis=(--analysis "$HERE/analysis.md")
"$PYTHON" -m sagesched.report "$OUT" --out reports/policy_benchmark --title "Policy benchmark" \
    --command "bash experiments/policy_benchmark/run.sh" "${analysis[@]}"
