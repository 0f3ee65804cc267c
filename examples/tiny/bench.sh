#!/usr/bin/env bash
# SDPG vs DAPO, GRPO, OPSD, RLSD and guarded SDPG on unseen arithmetic problems, 5 seeds each, at the
# settings chosen by the equal-budget grid (examples/tiny/bench_algos_tuned.json; tools/bench_algos.py,
# recipe examples/tiny/bench_algos.yaml). Results and the time it took: examples/tiny/README.md.
#   examples/tiny/bench.sh                                   # -> runs/bench_algos/{bench.json,bench.png}
#   OUT=runs/g examples/tiny/bench.sh --grid                 # redo the tuning (writes the tuned JSON)
#   OUT=runs/b examples/tiny/bench.sh --algos sdpg,dapo --seeds 1 --steps 5    # smoke run
# Extra arguments go to tools/bench_algos.py (flags, then key=value trainer overrides for every run).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" tools/bench_algos.py --out "${OUT:-runs/bench_algos}" "$@"
