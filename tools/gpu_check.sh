#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py has the details): one GPU, under 8 minutes, one JSON
# summary line last (and $OUT/gpu_check.json + $OUT/gpu_check.log when $OUT is set).
#
#   tools/gpu_check.sh          # on the GPU machine, from anywhere in the checkout
#   tools/gpu_check.sh --cpu    # the same plumbing on CPU with small shapes
#
# A megatron-core wheel in .whl/ (machines without network) is installed into /tmp/site first; the
# repository itself is used in place through PYTHONPATH (not pip-installed).
set -u
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
exec timeout -k 5 470 "$PY" tools/gpu_check.py "$@"
