#!/usr/bin/env bash
# The one GPU check for a lent machine with one H100/H200 (torch, Triton, timm and pytest; no
# mmcv/mmdet/mmseg): the tests marked gpu, then the figures for docs/BENCHMARKS.md (SS2D scan
# paths at VMamba-T's stage shapes, VMamba-T vs Swin-T training and inference img/s). Fits in
# about 8 minutes; each part has its own time limit so one slow part cannot eat the others.
#
# Usage: bash tools/gpu_check.sh            (writes to $OUT, or gpu_check_out/ without it)
# Environment: PYTHON (python), OUT (output folder).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The machine has no network for an install: the package is used from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
status=0

{
    date -u '+%Y-%m-%d %H:%M UTC'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} | tee "$OUT/machine.txt"

# Modules that need the OpenMMLab stack skip themselves; a collection error must not hide the rest.
timeout 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    tests/ops tests/models 2>&1 | tee "$OUT/pytest_gpu.txt" || status=1

timeout 240 "$PY" tools/analysis_tools/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.md" || status=1

exit $status
