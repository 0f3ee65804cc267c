#!/bin/bash
# SDPG paper recipe (sdpg_mcore/algo/README.md): Qwen3-4B on one node of 8 GPUs; trainer on all 8 (DP8) and
# SGLang colocated on the same GPUs (8 servers, TP1, memory saver on) behind the router.
#
#   sbatch slurm/sdpg_qwen3_4b.sh                              # from the repository root
#   MODEL_PATH=/models/Qwen3-4B RUN_DIR=/scratch/runs/q4b sbatch slurm/sdpg_qwen3_4b.sh
#   ROLLOUT_MODE=dedicated ROLLOUT_NODES=1 sbatch --nodes=2 slurm/sdpg_qwen3_4b.sh   # servers on a 2nd node
#   DRY_RUN=1 sbatch --ntasks-per-node=2 --gpus-per-node=0 --time=30 slurm/sdpg_qwen3_4b.sh   # CPU
#
# Plan: python tools/plan.py --config examples/qwen3_4b/config.json --nodes 1 --gpus-per-node 8 \
#   --gpu-mem-gb 80 --rollout colocated
#SBATCH --job-name=sdpg-qwen3-4b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

if [ -z "${SDPG_ROOT:-}" ]; then
  for candidate in "$(dirname "$(readlink -f "$0")")/.." "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
    if [ -f "$candidate/slurm/lib.sh" ]; then SDPG_ROOT=$(readlink -f "$candidate"); break; fi
  done
fi
[ -f "${SDPG_ROOT:-}/slurm/lib.sh" ] || { echo "ERROR: submit from the repository root or set SDPG_ROOT" >&2; exit 2; }
# shellcheck source=slurm/lib.sh
source "$SDPG_ROOT/slurm/lib.sh"

RECIPE=${RECIPE:-examples/qwen3_4b/recipe.yaml}
MODEL_PATH=${MODEL_PATH:-/models/Qwen3-4B}
RUN_DIR=${RUN_DIR:-$SDPG_ROOT/runs/qwen3_4b_sdpg}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ROLLOUT_MODE=${ROLLOUT_MODE:-colocated}
ROLLOUT_NODES=${ROLLOUT_NODES:-1}
ROLLOUT_TP=${ROLLOUT_TP:-1}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-900}
if [ "${DRY_RUN:-0}" = 1 ]; then
  GPUS_PER_NODE=${DRY_RUN_SLOTS:-2}
  ROLLOUT_TP=$GPUS_PER_NODE   # one CPU dev server per node
  HEALTH_TIMEOUT=${DRY_RUN_HEALTH_TIMEOUT:-300}
fi

sdpg_main
