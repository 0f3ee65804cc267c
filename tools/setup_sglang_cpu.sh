#!/usr/bin/env bash
# Real SGLang on a CPU-only machine, in its own venv: .venv-sglang/ at the repository root.
#
#   tools/setup_sglang_cpu.sh          # idempotent: a complete venv is left as it is
#   tools/setup_sglang_cpu.sh --help
#
# Why it is not `pip install sglang`: sglang pins a CUDA torch and ~20 CUDA-only kernel packages
# (several GB). Here the CPU torch goes in first, sglang with --no-deps, then its pure-Python
# requirements; packages that depend on torch get --no-deps so nothing replaces the CPU torch
# (a constraint file pins it: pip fails rather than swap it). The two import-time obstacles
# (CUDA torchvision, vllm's rotary kernel) are handled by sdpg_mcore/rollout/sglang_cpu_shim/,
# which the launcher puts on the server's PYTHONPATH; no installed file is edited.
# rollout.backend=sglang on a machine without CUDA launches `.venv-sglang/bin/python -m
# sglang.launch_server ... --device cpu` (see sdpg_mcore/rollout/servers.py).
set -euo pipefail

SGLANG_VERSION=0.5.23
TORCH_VERSION=2.13.0

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

root=$(cd "$(dirname "$0")/.." && pwd)
venv="${SGLANG_VENV:-$root/.venv-sglang}"
# The stamp names this script's content: an edited package list re-runs the (idempotent) installs.
stamp="$venv/.sdpg-setup-$(sha256sum "$0" | cut -c1-16)"
python_bin="${PYTHON:-python3}"

if [[ -f "$stamp" ]]; then
  echo "sglang $SGLANG_VERSION (CPU) already set up in $venv"
  exit 0
fi

start=$(date +%s)
[[ -x "$venv/bin/python" ]] || "$python_bin" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
constraints="$venv/constraints.txt"
printf 'torch==%s\n' "$TORCH_VERSION" >"$constraints"

# 1. The CPU torch (the registry's default torch is a CUDA build).
"${pip[@]}" -c "$constraints" "torch==$TORCH_VERSION"

# 2. sglang itself, without its CUDA dependency closure.
"${pip[@]}" --no-deps "sglang==$SGLANG_VERSION"

# 3. Its pure-Python requirements (from its wheel METADATA, CUDA-only kernels left out).
"${pip[@]}" -c "$constraints" \
  aiohttp "anthropic>=0.20.0" blobfile==3.0.0 datasets distro easydict einops fastapi gguf \
  interegular IPython "llguidance>=1.7.6,<2.0.0" msgspec ninja numpy nvidia-ml-py openai==2.8.0 \
  openai-harmony==0.0.4 orjson packaging partial_json_parser pillow "prometheus-client>=0.20.0" \
  psutil pybase64 pydantic "python-dateutil<3" python-multipart "pyzmq>=25.1.2" regex requests \
  scipy sentencepiece==0.2.1 setproctitle tiktoken tokenizers==0.23.2 tqdm transformers==5.19.0 \
  "uvicorn>=0.51" uvloop watchfiles xxhash zstandard safetensors huggingface_hub jinja2 \
  lark nest_asyncio cloudpickle diskcache referencing jsonschema pycountry airportsdata \
  outlines_core==0.1.26 triton apache-tvm-ffi==0.1.11 loguru soundfile==0.13.1

# 4. Packages that depend on torch: --no-deps so the CPU torch stays.
"${pip[@]}" --no-deps outlines==0.1.11 xgrammar==0.2.7 compressed-tensors==0.18.0 \
  "torch_memory_saver>=0.0.9.post1" torchvision==0.28.0

"$venv/bin/python" -m pip check >/dev/null 2>&1 || true # sglang wants torch 2.14.1 + CUDA kernels: expected
PYTHONPATH="$root/sdpg_mcore/rollout/sglang_cpu_shim" "$venv/bin/python" -c \
  "import sglang, sglang.launch_server; print('sglang', sglang.__version__)"
touch "$stamp"
echo "sglang $SGLANG_VERSION (CPU) set up in $venv in $(($(date +%s) - start)) s"
