#!/usr/bin/env bash
# SDPG vs GRPO on the tiny CPU task: same seed, data, model and step budget; then one figure.
#   examples/tiny/compare.sh                      # runs/tiny_compare/{sdpg,grpo}, runs/tiny_compare/compare.png
#   OUT=runs/cmp examples/tiny/compare.sh trainer.total_steps=20
# Extra arguments are key=value overrides applied to both runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-runs/tiny_compare}
for algo in sdpg grpo; do
  RUN_DIR="$OUT/$algo" examples/tiny/run.sh algorithm.name="$algo" trainer.resume=none "$@"
done
"$PYTHON" tools/plot.py "$OUT/sdpg" "$OUT/grpo" --out "$OUT/compare.png" --smooth 3
