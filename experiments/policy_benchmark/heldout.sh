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
OUT=${SAGESCHED_HELDOUT_DIR:-multirun/policy_benchmark-heldout}
source "$(dirname "$0")/sweep.sh"
scenarios seed=3,4,5,6 'window_starts_s=[3000.0,1200.0,2400.0,0.0,600.0,1800.0]' "$@"
"$PYTHON" "$HERE/analyze.py" "$OUT" --out reports/policy_benchmark/heldout \
    --title "Held-out windows (seeds 3-6: trace windows at 0, 600, 1800, 3000 s): paired comparisons"
