#!/usr/bin/env bash
# Reproduce reports/policy_benchmark in one command, from the repository root or anywhere:
#
#     bash experiments/policy_benchmark/run.sh [extra Hydra overrides, e.g. hydra.launcher.n_jobs=8]
#
# Sweeps (conf/benchmark/*.yaml), 640 simulated runs in all:
#   - the four scenarios: 8 policies x 4 loads x 2 seeds each (256 runs);
#   - mixed versus siloed at 4 GPUs on embedding_heavy (loads 2, 3, 4) and rag (load 2.2): siloed
#     layouts once, mixed layouts under each interference preset, and the interference-free ceiling
#     (cluster bound_4llm_4tei: 4 LLM + 4 TEI GPUs); fifo, slo_aware, hybrid (360 runs);
#   - multi_tenant: four tenants (40/20/20/20%), 6 policies, 2 loads, 2 seeds (24 runs);
# then `sagesched.report` (the per-scenario tables and plots) and `analyze.py` (paired-by-seed
# comparisons, gap to the bound closed, shed fractions, mixed vs siloed, Jain's index).
# One job at a time by default (N_JOBS=1; the machine it was tuned on has 2 shared cores): ~20 min (29 Nov 2026; the 4x mixed-versus-siloed sweep added ~8 of them).
# Set SAGESCHED_BENCH_DIR to keep the run folders elsewhere (default: multirun/policy_benchmark).
set -euo pipefail
OUT=${SAGESCHED_BENCH_DIR:-multirun/policy_benchmark}
source "$(dirname "$0")/sweep.sh"
rm -rf "$OUT" "$OUT-mvs"
mkdir -p "$(dirname "$OUT")"

for scenario in azure_conv azure_code rag embedding_heavy; do
    sweep "$scenario" "+benchmark=$scenario" "${@}"
done
MIXED=mixed_1llm_2mix_1tei,mixed_2llm_2mix,mixed_3mix_1tei,all_mixed_4
for wl in embedding_heavy rag; do
    DEST="$OUT-mvs" sweep "mvs_${wl}_silo" "+benchmark=mvs_$wl" "${@}"
    DEST="$OUT-mvs" sweep "mvs_${wl}_mixed" "+benchmark=mvs_$wl" "cluster=$MIXED" "interference=time_slice,mps,ideal" "${@}"
    # The ceiling: 4 LLM + 4 TEI GPUs, i.e. four shared GPUs that cost nothing to share (not a 4-GPU layout).
    DEST="$OUT-mvs" sweep "mvs_${wl}_ceiling" "+benchmark=mvs_$wl" "cluster=bound_4llm_4tei" "${@}"
done
sweep multi_tenant "+benchmark=multi_tenant" "${@}"
echo "runs: $(find "$OUT" "$OUT-mvs" -name summary.json | wc -l)"

analysis=()
[[ -f "$HERE/analysis.md" ]] && analysis=(--analysis "$HERE/analysis.md")
# The per-scenario report covers the four scenarios and multi_tenant; the mixed-versus-siloed runs
# (in $OUT-mvs) are read by analyze.py, which writes its tables into the same report folder.
"$PYTHON" -m sagesched.report "$OUT" --out reports/policy_benchmark --title "Policy benchmark" \
    --command "bash experiments/policy_benchmark/run.sh" "${analysis[@]}"
"$PYTHON" "$HERE/analyze.py" "$OUT" "$OUT-mvs" --out reports/policy_benchmark
