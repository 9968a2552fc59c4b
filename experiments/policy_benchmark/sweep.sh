# Sourced by run.sh, heldout.sh and learned.sh (not run on its own): the repository root as the
# working directory, the knobs they share, and `sweep`. Set OUT (the run folder) before sourcing.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-python}
HERE=experiments/policy_benchmark
JOBS=${N_JOBS:-1}

sweep() {  # sweep NAME [overrides...]: one Hydra multirun into ${DEST:-$OUT}, logged to $OUT.NAME.log
    local name=$1
    shift
    local start
    start=$(date +%s)
    SAGESCHED_BENCH_DIR="${DEST:-$OUT}" "$PYTHON" -m sagesched.experiment -m --config-dir "$HERE/conf" \
        "hydra.launcher.n_jobs=$JOBS" "$@" >"$OUT.$name.log" 2>&1 || { tail -40 "$OUT.$name.log"; exit 1; }
    echo "$name: done in $(($(date +%s) - start)) s"
}

scenarios() {  # scenarios [overrides...]: a fresh $OUT holding the four scenarios' sweeps
    rm -rf "$OUT"
    mkdir -p "$(dirname "$OUT")"
    for scenario in azure_conv azure_code rag embedding_heavy; do
        sweep "$scenario" "+benchmark=$scenario" "$@"
    done
    echo "runs: $(find "$OUT" -name summary.json | wc -l)"
}
