#!/usr/bin/env bash
# SDPG vs GRPO vs OPSD vs RLSD on the low-start-accuracy tiny task, 5 seeds each, 2 runs at a time
# (tools/bench_algos.py; recipe examples/tiny/bench_algos.yaml). ~25 CPU-minutes: about 15 min on 2 idle
# cores (measured: 30 min on 2 cores shared with ~5 other jobs).
#   examples/tiny/bench.sh                                   # -> runs/bench_algos/{bench.json,bench.png}
#   OUT=runs/b examples/tiny/bench.sh --algos sdpg,grpo --seeds 0 --steps 5    # smoke run
# Extra arguments go to tools/bench_algos.py (flags, then key=value trainer overrides for every run).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" tools/bench_algos.py --out "${OUT:-runs/bench_algos}" "$@"
