#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py has the details): one GPU, within 480 s, one JSON
# summary line last (and $OUT/gpu_check.json, $OUT/<stage>.json, $OUT/gpu_check.log when $OUT is set).
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
# On the GPU 480 s for the install and the stages together (8 of the 15 device minutes; the machine
# itself takes minutes to start); the kill 5 s after the check's own budget. --cpu
# (the plumbing test on a small shared CPU machine) gets 1800 s.
total=480
for arg in "$@"; do [ "$arg" = "--cpu" ] && total=1800; done
left=$((total - SECONDS))
exec timeout -k 5 $((left + 5)) "$PY" tools/gpu_check.py --budget-s "$left" "$@"
