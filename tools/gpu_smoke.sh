#!/usr/bin/env bash
# GPU smoke check for one-GPU device machines (Python 3.12, torch, transformers; no megatron-core):
# megatron-core travels as a wheel in .whl/ (see the device README), installed to /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import megatron.core" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 tools/gpu_smoke.py "$@"
echo "--- loss overhead (GPU)"
python3 bench/loss_overhead.py --device cuda --repeats 21
