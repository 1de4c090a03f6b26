#!/usr/bin/env bash
# The GPU check, in one run of at most 8 minutes on one H100/H200:
#   1. the CUDA-only tests (bf16 Triton kernels against naive, inductor): pytest -m gpu
#   2. benchmarks/moe_layer.py in bf16 at E=8 k=2, T=16384, D=2048, H=1408: triton,
#      grouped_mm, sorted, naive and the dense GEMM of equal FLOPs, one table, and the
#      targets (triton >= grouped_mm, triton >= 70% of dense).
#   3. benchmarks/gpu_train.py: the moe_1b_8gpu recipe shrunk to this GPU (dp=1, 8 layers,
#      generated tokens), 30 steps eager, compiled and with activation checkpointing:
#      tokens/s, MFU, peak memory against the dry-run plan, host syncs per step, and the
#      cost of memory snapshots and of an async checkpoint, with the targets.
# It installs nothing the project's files do not name: it uses .venv if that has a CUDA
# torch, else the python3 on PATH (PYTHON=... overrides), and installs atoll itself into it
# (no dependencies, no build isolation: the GPU machine has no network) only if missing.
# Without a CUDA GPU it stops at once with one line and exit status 2.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

# The first of $PYTHON, .venv/bin/python, python3 whose torch sees a GPU; else the first with torch.
PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY="$candidate"; break
    fi
    if [ -z "$PY" ] && "$candidate" -c "import torch" 2>/dev/null; then PY="$candidate"; fi
done
PY="${PY:-python3}"

if ! "$PY" - <<'CHECK'
import sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_check: {sys.executable} has no torch")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, {sys.executable}); "
             "this check needs one H100/H200")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {sys.executable}", flush=True)
CHECK
then
    exit 2
fi

if ! "$PY" -c "import atoll.parallel.kernels" 2>/dev/null; then
    echo "gpu_check: installing atoll into $PY (editable, no dependencies)"
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || { echo "gpu_check: cannot install atoll"; exit 1; }
fi

status=0
echo "== CUDA-only tests (pytest -m gpu)"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ || status=1

echo "== moe_layer.py, bf16, E=8 k=2, T=16384, D=2048, H=1408"
timeout 100 "$PY" benchmarks/moe_layer.py --device cuda --dtype bf16 --tokens 16384 --dim 2048 \
    --hidden 1408 --experts 8 --topk 2 --repeat 20 || status=1

echo "== gpu_train.py, moe_1b_8gpu on one GPU: eager, compiled, activation checkpointing"
timeout 240 "$PY" benchmarks/gpu_train.py || status=1
exit $status
