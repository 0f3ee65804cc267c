#!/usr/bin/env bash
# The tiny CPU example, end to end: make the tiny model (if missing) and the arithmetic data, then train.
#   examples/tiny/run.sh                                   # SDPG, run dir runs/tiny_sdpg
#   RUN_DIR=runs/x examples/tiny/run.sh algorithm.name=grpo trainer.total_steps=10
# Extra arguments are key=value overrides for sdpg-train. PYTHON picks the interpreter (default: .venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL_DIR=${MODEL_DIR:-examples/tiny/model}
DATA_DIR=${DATA_DIR:-runs/tiny_data}
RUN_DIR=${RUN_DIR:-runs/tiny_sdpg}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  echo "[tiny] making the tiny model in $MODEL_DIR (about a minute)"
  "$PYTHON" tools/make_tiny_model.py --out "$MODEL_DIR"
fi
if [ ! -f "$DATA_DIR/train.jsonl" ]; then
  echo "[tiny] writing synthetic arithmetic data to $DATA_DIR"
  "$PYTHON" tools/prepare_data.py --synthetic arithmetic --out "$DATA_DIR" --format jsonl --num-train 2048 --num-test 64
fi
exec "$PYTHON" -m sdpg_mcore.cli --config examples/tiny/sdpg.yaml \
  model.path="$MODEL_DIR" data.train_files="[$DATA_DIR/train.jsonl]" trainer.run_dir="$RUN_DIR" "$@"
