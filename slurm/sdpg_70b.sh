#!/bin/bash
# SDPG on Llama-3.3-70B: 4 trainer nodes (TP8 x PP2 x DP2) + 2 SGLang nodes (2 servers, TP8) + router.
#
#   sbatch slurm/sdpg_70b.sh                                   # from the repository root
#   sbatch --nodes=8 --export=ALL,ROLLOUT_NODES=2 slurm/sdpg_70b.sh
#   MODEL_PATH=/models/Llama-3.3-70B-Instruct RUN_DIR=/scratch/runs/70b sbatch slurm/sdpg_70b.sh
#   DRY_RUN=1 sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --time=30 slurm/sdpg_70b.sh   # CPU
#
# Check the layout before queueing: python tools/plan.py --config examples/llama3_70b/config.json \
#   --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80 --max-response-len 8192 --tp 8 --pp 2 --recompute full
# Every knob below can be set in the environment; slurm/lib.sh documents them and does the work.
#SBATCH --job-name=sdpg-70b
#SBATCH --nodes=6
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

# The batch copy of this script lives in Slurm's spool; find the repository.
if [ -z "${SDPG_ROOT:-}" ]; then
  for candidate in "$(dirname "$(readlink -f "$0")")/.." "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
    if [ -f "$candidate/slurm/lib.sh" ]; then SDPG_ROOT=$(readlink -f "$candidate"); break; fi
  done
fi
[ -f "${SDPG_ROOT:-}/slurm/lib.sh" ] || { echo "ERROR: submit from the repository root or set SDPG_ROOT" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$SDPG_ROOT/slurm/lib.sh"

RECIPE=${RECIPE:-examples/llama3_70b/recipe.yaml}
MODEL_PATH=${MODEL_PATH:-/models/Llama-3.3-70B-Instruct}
RUN_DIR=${RUN_DIR:-$SDPG_ROOT/runs/llama3_70b_sdpg}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ROLLOUT_MODE=${ROLLOUT_MODE:-dedicated}
ROLLOUT_NODES=${ROLLOUT_NODES:-2}
ROLLOUT_TP=${ROLLOUT_TP:-8}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-1800}   # 70B weights take a while to load
if [ "${DRY_RUN:-0}" = 1 ]; then
  # Same logic on CPU: 2 "GPU" slots per node, one server per rollout node, a 2-rank trainer.
  GPUS_PER_NODE=${DRY_RUN_SLOTS:-2}
  ROLLOUT_TP=$GPUS_PER_NODE
  SDPG_FAKE_NODES=${SDPG_FAKE_NODES:-2}
  ROLLOUT_NODES=1
  HEALTH_TIMEOUT=${DRY_RUN_HEALTH_TIMEOUT:-300}
fi

sdpg_main
