#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment and installs the pinned stack.
#
# Usage: tools/install_env.sh [VENV_DIR]
# Environment:
#   PYTHON             interpreter used to create the venv (default: python3.11, else python3)
#   VMAMBA_MM_WHEELS   extra directory searched for a prebuilt mmcv wheel
#   MAX_JOBS           parallel compile jobs when mmcv has to be built from source (default: nproc)
#
# Idempotent: a stamp file records the hash of the inputs that decide what is installed, so a
# second run only re-verifies the compiled mmcv ops.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_VERSION="2.13.0"
MMCV_VERSION="2.1.0"
TRITON_VERSION="3.6.0"

log() { echo "[install] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV with $PY_BIN"
    "$PY_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

STAMP="$VENV/.vmamba_mm_installed"
INPUTS_HASH="$(cat "$ROOT/setup.py" "$ROOT/tools/install_env.sh" | sha256sum | cut -d' ' -f1)"

verify_mmcv_ops() {
    "$PY" - <<'PY'
import torch
from mmcv.ops import RoIAlign, nms

boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
scores = torch.tensor([0.9, 0.8, 0.7])
dets, keep = nms(boxes, scores, iou_threshold=0.5)
if keep.tolist() != [0, 2]:
    raise SystemExit(f"mmcv.ops.nms returned {keep.tolist()}, expected [0, 2]")
feat = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2)(feat, rois)
if out.shape != (1, 1, 2, 2) or not torch.isfinite(out).all():
    raise SystemExit(f"mmcv.ops.RoIAlign gave {out}")
print(f"[install] mmcv ops verified: nms keep={keep.tolist()}, RoIAlign out={out.flatten().tolist()}")
PY
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS_HASH" ]; then
    log "environment up to date ($VENV)"
    verify_mmcv_ops
    exit 0
fi

# setuptools stays below 82 for good: mmengine's config loader imports pkg_resources.
"${PIP[@]}" install -q "setuptools>=77.0.3,<82" wheel ninja psutil packaging numpy

if "$PY" -c "import torch" 2>/dev/null; then
    log "keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    # Ask for the exact version: a bare `torch` resolves to a multi-GB CUDA build, and mmcv 2.1.0's
    # ops do not compile against torch >= 2.14 (which requires C++20).
    log "installing torch==$TORCH_VERSION"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
fi
TORCH_INSTALLED="$("$PY" -c 'import torch; print(torch.__version__)')"
PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"

mmcv_has_ops() { "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; }

if mmcv_has_ops; then
    log "mmcv $MMCV_VERSION with ops already installed"
else
    # A wheel of compiled torch extensions is tied to the torch it was built against, so wheels
    # live in a folder named after that torch version: <dir>/torch-<version>/mmcv-*.whl.
    WHEEL=""
    for dir in "${VMAMBA_MM_WHEELS:-}" "$ROOT/../shared/wheels"; do
        [ -n "$dir" ] || continue
        candidate="$dir/torch-$TORCH_INSTALLED/mmcv-$MMCV_VERSION-$PY_TAG-$PY_TAG-linux_$(uname -m).whl"
        if [ -f "$candidate" ]; then
            WHEEL="$candidate"
            break
        fi
    done
    if [ -n "$WHEEL" ]; then
        log "installing prebuilt mmcv wheel $WHEEL (built against torch $TORCH_INSTALLED, $PY_TAG)"
        "${PIP[@]}" install -q "$WHEEL"
    else
        log "no prebuilt mmcv wheel for torch $TORCH_INSTALLED / $PY_TAG: building mmcv $MMCV_VERSION from source"
        log "(compiles 77 files: about an hour on 2 cores; pip caches the wheel afterwards)"
        MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            "${PIP[@]}" install --no-build-isolation "mmcv==$MMCV_VERSION"
    fi
fi

log "installing the pinned OpenMMLab stack, triton and vmamba_mm (editable)"
"${PIP[@]}" install -q "triton==$TRITON_VERSION" -e "$ROOT[mm,triton,dev]" "setuptools>=77.0.3,<82"

verify_mmcv_ops
"$PY" -c "import mmdet, mmseg, mmengine, vmamba_mm; print('[install] mmengine', mmengine.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__, 'vmamba_mm', vmamba_mm.__version__)"
echo "$INPUTS_HASH" > "$STAMP"
log "done"
