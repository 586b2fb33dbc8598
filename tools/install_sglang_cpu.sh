#!/usr/bin/env bash
# Install SGLang 0.5.23 for CPU-only runs into the project venv (default .venv), next to the CPU
# torch the venv already has. About 3 GB and a few minutes. Idempotent: re-running re-checks.
#
#   tools/install_sglang_cpu.sh [path/to/venv]
#
# Why this shape:
#  * sglang's wheel pins torch==2.14.1 and many CUDA packages; installing it normally would pull a
#    multi-GB CUDA torch. So: the wheel with --no-deps, then its dependency list minus the CUDA
#    packages (requirements-sglang-cpu.txt), under a constraints file that pins the torch in place.
#  * Two imports cannot be satisfied from PyPI on CPU: torchvision (PyPI's build does not load
#    beside the CPU torch) and sgl_kernel (CUDA/AMX kernels). Small stand-ins live in ONE package,
#    holderpo_megatron/rollout/sglang_cpu_shims/, which our SGLang launcher puts on sys.path (and
#    PYTHONPATH for server processes) only for CPU engines. Nothing is written into site-packages,
#    so transformers and every other library keep seeing "torchvision not installed".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY="$VENV/bin/python"
SGLANG_VERSION=0.5.23
[ -x "$PY" ] || { echo "no python at $PY: create the venv first (make install)" >&2; exit 1; }

if [ -z "${SGLANG_CPU_FORCE:-}" ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "CUDA is available: install SGLang the normal way (pip install sglang==$SGLANG_VERSION); skipping the CPU install"
  echo "(set SGLANG_CPU_FORCE=1 to install the CPU stack anyway)"
  exit 0
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
# Keep torch, transformers and tokenizers exactly as the project installed them.
{
  echo "torch==$TORCH_VERSION"
  "$PY" - <<'PYEOF'
import importlib.metadata as md
for name in ("transformers", "tokenizers"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PYEOF
} > "$CONSTRAINTS"
echo "constraints: $(tr '\n' ' ' < "$CONSTRAINTS")"

start=$(date +%s)
STAMP="$VENV/.sglang-cpu-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt requirements-sglang-cpu.txt ] && [ "$STAMP" -nt "$0" ] \
   && "$PY" -c "import importlib.metadata as m; assert m.version('sglang') == '$SGLANG_VERSION'" 2>/dev/null; then
  echo "sglang $SGLANG_VERSION already installed (remove $STAMP to reinstall)"
else
  "$PY" -m pip install -q --no-deps "sglang==$SGLANG_VERSION"
  "$PY" -m pip install -q -r requirements-sglang-cpu.txt -c "$CONSTRAINTS"
fi

# The torch must still be the one we started with (a CUDA torch here would be a 3 GB mistake).
after=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$after" != "$TORCH_VERSION" ]; then
  echo "torch changed from $TORCH_VERSION to $after during the install" >&2
  exit 1
fi
# Smoke: import SGLang's engine with the CPU shims in place.
SGLANG_USE_CPU_ENGINE=1 "$PY" -c "
from holderpo_megatron.rollout.sglang_cpu_shims import activate
activate()
import sglang, sglang.srt.entrypoints.engine
print('sglang', sglang.__version__, 'imports on CPU')
"
touch "$STAMP"
echo "SGLang CPU install took $(( $(date +%s) - start )) s"
