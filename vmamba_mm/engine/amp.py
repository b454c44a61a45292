"""bf16 mixed-precision training on any device, CPU included: an mmengine optimizer wrapper.

mmengine's ``AmpOptimWrapper`` asserts a GPU (it is built around CUDA's fp16 ``GradScaler``).
``BF16AutocastOptimWrapper`` runs the forward pass under ``torch.autocast(<model's device>,
dtype=torch.bfloat16)``, which works on CPUs and CUDA GPUs alike. bf16 has float32's exponent
range, so gradients do not underflow and no loss scaling is needed: backward, gradient clipping
and the optimizer step are plain ``OptimWrapper``'s, on float32 parameters.

``tools/train.py --amp`` uses it on machines without CUDA; on CUDA it keeps mmengine's
``AmpOptimWrapper`` (fp16 with dynamic loss scaling, the OpenMMLab default). It can also be
chosen on a bf16-capable GPU in a config: ``optim_wrapper = dict(type='BF16AutocastOptimWrapper',
optimizer=...)``. fp16 is refused: it needs loss scaling, which is what ``AmpOptimWrapper`` is for.

mmcv's compiled ops have no bf16 kernels (on CPU not even fp16): ``nms`` and ``roi_align`` fail
with "expected scalar type Float but found BFloat16" when autocast hands them bf16 scores or
features. autocast cannot cast their inputs itself because they bypass torch's dispatcher, so
while the wrapper's context is active they run in float32 with their floating outputs cast back
to the input dtype, as torchvision's autocast rule for its own ``nms``/``roi_align`` does
(``mmcv_ops_in_float32``). Box geometry and RoI sampling are precision-sensitive and cheap, so
nothing is lost by keeping them in float32.

Importing this module registers the wrapper in mmengine's root ``OPTIM_WRAPPERS`` registry, which
mmdet's and mmseg's registries search as their parent.
"""

import functools
import importlib
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Dict, Iterator, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# mmcv entry points that reach compiled kernels without bf16 support, as (module, attribute).
# They are the module globals the callers look up at call time: mmcv's ``batched_nms`` resolves
# ``nms`` / ``soft_nms`` by name in ``mmcv.ops.nms``, ``mmcv.ops.RoIAlign.forward`` calls the
# ``roi_align`` global of ``mmcv.ops.roi_align``. Code that imported these functions by value
# before the context was entered keeps the unpatched ones.
MMCV_FLOAT32_OPS: Tuple[Tuple[str, str], ...] = (
    ("mmcv.ops.nms", "nms"),
    ("mmcv.ops.nms", "soft_nms"),
    ("mmcv.ops.roi_align", "roi_align"),
)

_patch_lock = threading.Lock()
_patch_depth = 0
_originals: Dict[Tuple[str, str], Callable] = {}


def _in_float32(op: Callable) -> Callable:
    """Wraps ``op`` to run on float32 copies of its fp16/bf16 tensor arguments, autocast off.

    Floating tensors in the result (a tensor or a tuple/list of them) are cast back to the dtype
    of the op's first tensor argument (the features of ``roi_align``, the boxes of ``nms``), the
    rule torchvision's autocast kernels follow; integer results (indices) are returned as they
    are. Calls without fp16/bf16 tensors go straight to ``op``.
    """

    @functools.wraps(op)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not any(t.dtype in _LOW_PRECISION for t in tensors):
            return op(*args, **kwargs)
        out_dtype = tensors[0].dtype

        def up(a: Any) -> Any:
            return a.float() if isinstance(a, torch.Tensor) and a.dtype in _LOW_PRECISION else a

        def down(a: Any) -> Any:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return a.to(out_dtype)
            return a

        with torch.autocast(tensors[0].device.type, enabled=False):
            out = op(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        if isinstance(out, (tuple, list)):
            return type(out)(down(o) for o in out)
        return down(out)

    return wrapper


@contextmanager
def mmcv_ops_in_float32() -> Iterator[None]:
    """Runs the mmcv ops of ``MMCV_FLOAT32_OPS`` in float32 while the context is active.

    Re-entrant: the ops are patched on the first entry and restored on the last exit. The patch
    is process-wide while a context is open, which is harmless: the wrapped ops change only
    calls that pass fp16/bf16 tensors, which the unwrapped ones reject. Without mmcv installed
    it does nothing.

    Yields:
        None.
    """
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            for module_name, name in MMCV_FLOAT32_OPS:
                try:
                    module = importlib.import_module(module_name)
                except ImportError:  # mmcv (or its compiled ops) not installed: nothing to adapt
                    continue
                original = getattr(module, name)
                _originals[(module_name, name)] = original
                setattr(module, name, _in_float32(original))
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                for (module_name, name), original in _originals.items():
                    setattr(importlib.import_module(module_name), name, original)
                _originals.clear()


def _device_type_of(model: nn.Module) -> str:
    for param in model.parameters():
        return param.device.type
    return "cpu"


@OPTIM_WRAPPERS.register_module()
class BF16AutocastOptimWrapper(OptimWrapper):
    """An ``OptimWrapper`` whose forward context is bf16 autocast on the model's device.

    Args:
        dtype: the autocast dtype; only ``"bfloat16"`` / ``torch.bfloat16`` (the key exists so
            configs written for ``AmpOptimWrapper`` keep working).
        **kwargs: ``OptimWrapper``'s arguments (``optimizer``, ``accumulative_counts``,
            ``clip_grad``).

    ``state_dict()`` is the optimizer's (there is no loss scaler to save); ``load_state_dict``
    also accepts a checkpoint of ``AmpOptimWrapper`` and drops its ``loss_scaler`` entry.
    """

    def __init__(self, dtype: Union[str, torch.dtype] = "bfloat16", **kwargs: Any) -> None:
        if dtype not in ("bfloat16", torch.bfloat16):
            raise ValueError(
                f"BF16AutocastOptimWrapper trains with bfloat16 autocast only, got dtype "
                f"{dtype!r}. float16 needs loss scaling: use type='AmpOptimWrapper' with "
                "loss_scale='dynamic' on a GPU, or dtype='bfloat16' here (CPUs support only "
                "bfloat16 autocast).")
        super().__init__(**kwargs)
        self.cast_dtype = torch.bfloat16
        self._announced = False

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """Runs the block under bf16 autocast on ``model``'s device (and gradient accumulation).

        Args:
            model: the training model (possibly wrapped for distributed training).

        Yields:
            None.
        """
        device_type = _device_type_of(model)
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError(
                "this GPU does not support bfloat16; train with type='AmpOptimWrapper' "
                "(fp16 with loss scaling) instead of BF16AutocastOptimWrapper.")
        if not self._announced:
            print_log(f"BF16AutocastOptimWrapper: mixed precision with torch.autocast("
                      f"device_type={device_type!r}, dtype=torch.bfloat16), no loss scaling.",
                      logger="current")
            self._announced = True
        with ExitStack() as stack:
            stack.enter_context(super().optim_context(model))
            stack.enter_context(torch.autocast(device_type=device_type, dtype=self.cast_dtype))
            stack.enter_context(mmcv_ops_in_float32())
            yield

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads the optimizer state (and ``base_param_settings``) saved by ``state_dict``.

        Args:
            state_dict: from ``state_dict()`` of this wrapper, ``OptimWrapper`` or
                ``AmpOptimWrapper`` (whose ``loss_scaler`` is ignored: bf16 needs none).
        """
        state_dict = dict(state_dict)
        state_dict.pop("loss_scaler", None)
        super().load_state_dict(state_dict)

