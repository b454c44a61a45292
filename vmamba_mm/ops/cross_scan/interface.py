"""Public cross-scan / cross-merge ops with backend dispatch and autograd.

``cross_scan`` unfolds an image into the four 1D routes the 2D selective scan runs along
(row-major, column-major, and both reversed); ``cross_merge`` sums four routes back onto the image.
Cross-merge is the adjoint of cross-scan, so the backward of each one is the other.

Backends:
    "torch": copies, transposes and flips in PyTorch; any device and dtype; the backward calls
        the partner op.
    "triton": one Triton kernel per call (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``),
        floating-point tensors only; the backward launches the partner kernel.
    "auto": "triton" for floating-point CUDA tensors when Triton imports, otherwise "torch".

Both backends give identical cross-scan results. Cross-merge sums in a different order (the torch
path adds ``(y0 + flip y2) + T(y1 + flip y3)``, the Triton path ``((y0 + y1) + y2) + y3`` in fp32),
so merged values may differ in the last bit.
"""

from typing import Callable

import torch

from ..triton_env import interpreter_enabled, triton_available
from .torch_cross import (
    cross_merge_channel_last_torch,
    cross_merge_torch,
    cross_scan_channel_last_torch,
    cross_scan_torch,
)
from .triton_cross import cross_merge_triton, cross_scan_triton

BACKENDS = ("auto", "torch", "triton")
ROUTES = 4
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)




def _check_tensor(name: str, tensor: object, ndim: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}."
        )
    if tensor.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions {layout}, got shape {tuple(tensor.shape)}; "
            "reshape it before calling."
        )


def _check_routes(ys: torch.Tensor) -> None:
    if ys.shape[1] != ROUTES:
        raise ValueError(
            f"ys must hold {ROUTES} routes in dimension 1 ([B, 4, D, H, W]), got shape "
            f"{tuple(ys.shape)}."
        )


def _resolve_backend(backend: str, tensor: torch.Tensor, name: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        use_triton = tensor.is_cuda and tensor.dtype in _TRITON_DTYPES and triton_available()
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError(
                "backend='triton' needs Triton, which does not import here; install it "
                "(pip install triton) or use backend='torch'."
            )
        if not tensor.is_cuda and not interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs {name} on a CUDA device (it is on {tensor.device}); move "
                "it to CUDA, set TRITON_INTERPRET=1 before importing Triton to run the kernels "
                "on the CPU interpreter, or use backend='torch'."
            )
        if tensor.dtype not in _TRITON_DTYPES:
            raise TypeError(
                f"backend='triton' supports float16/bfloat16/float32/float64 {name}, got "
                f"{tensor.dtype}; cast it or use backend='torch'."
            )
    return backend


class _CrossScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, channel_last: bool) -> torch.Tensor:
        ctx.channel_last = channel_last
        ctx.image_shape = x.shape
        return cross_scan_triton(x, channel_last)

    @staticmethod
    def backward(ctx, dxs: torch.Tensor):
        if ctx.channel_last:
            batch, height, width, dim = ctx.image_shape
        else:
            batch, dim, height, width = ctx.image_shape
        dys = dxs.reshape(batch, ROUTES, dim, height, width)
        dx = _CrossMergeTriton.apply(dys, ctx.channel_last)
        return dx.view(ctx.image_shape), None


class _CrossMergeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys: torch.Tensor, channel_last: bool) -> torch.Tensor:
        ctx.channel_last = channel_last
        ctx.routes_shape = ys.shape
        return cross_merge_triton(ys, channel_last)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        batch, _, dim, height, width = ctx.routes_shape
        if ctx.channel_last:
            image = dy.reshape(batch, height, width, dim)
        else:
            image = dy.reshape(batch, dim, height, width)
        dxs = _CrossScanTriton.apply(image, ctx.channel_last)
        return dxs.view(ctx.routes_shape), None


def _dispatch(
    tensor: torch.Tensor, backend: str, name: str, torch_fn: Callable, triton_fn: Callable
) -> torch.Tensor:
    if _resolve_backend(backend, tensor, name) == "triton":
        return triton_fn()
    return torch_fn()


def cross_scan(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Unfolds a channel-first image into the four scan routes.

    With L = H * W and a pixel (h, w): route 0 is row-major (``xs[:, 0, :, h*W + w]``), route 1
    column-major (``xs[:, 1, :, w*H + h]``), routes 2 and 3 are routes 0 and 1 reversed along L.

    Args:
        x: [B, D, H, W] image.
        backend: "auto", "torch" or "triton" (see the module docstring).

    Returns:
        xs: [B, 4, D, H*W], dtype of ``x``. Differentiable; its backward is ``cross_merge``.
    """
    _check_tensor("x", x, 4, "[B, D, H, W]")
    return _dispatch(
        x, backend, "x", lambda: cross_scan_torch(x), lambda: _CrossScanTriton.apply(x, False)
    )


def cross_merge(ys: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Sums the four routes back onto the image, the adjoint of ``cross_scan``.

    ``y[:, :, h*W + w] = ys0[h*W + w] + ys1[w*H + h] + ys2[L-1-(h*W + w)] + ys3[L-1-(w*H + h)]``,
    each route indexed along its flattened H*W positions.

    Args:
        ys: [B, 4, D, H, W], each route laid out in its own scan order over L = H * W (H and W
            only give the image size; the last two dimensions are read as one route of length L).
        backend: "auto", "torch" or "triton" (see the module docstring).

    Returns:
        y: [B, D, H*W] in row-major pixel order, dtype of ``ys``. Differentiable; its backward is
        ``cross_scan``.
    """
    _check_tensor("ys", ys, 5, "[B, 4, D, H, W]")
    _check_routes(ys)
    return _dispatch(
        ys, backend, "ys", lambda: cross_merge_torch(ys), lambda: _CrossMergeTriton.apply(ys, False)
    )


def cross_scan_channel_last(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``cross_scan`` for a channel-last image, without a transposing copy on the Triton path.

    Args:
        x: [B, H, W, D] image.
        backend: "auto", "torch" or "triton" (see the module docstring).

    Returns:
        xs: [B, 4, D, H*W], equal to ``cross_scan(x.permute(0, 3, 1, 2))``. Its backward is
        ``cross_merge_channel_last``.
    """
    _check_tensor("x", x, 4, "[B, H, W, D]")
    return _dispatch(
        x,
        backend,
        "x",
        lambda: cross_scan_channel_last_torch(x),
        lambda: _CrossScanTriton.apply(x, True),
    )


def cross_merge_channel_last(ys: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``cross_merge`` returning channel-last tokens.

    Args:
        ys: [B, 4, D, H, W], as for ``cross_merge``.
        backend: "auto", "torch" or "triton" (see the module docstring).

    Returns:
        y: [B, H*W, D], equal to ``cross_merge(ys).transpose(1, 2)`` (contiguous on the Triton
        path, a transposed view on the torch path). Its backward is ``cross_scan_channel_last``.
    """
    _check_tensor("ys", ys, 5, "[B, 4, D, H, W]")
    _check_routes(ys)
    return _dispatch(
        ys,
        backend,
        "ys",
        lambda: cross_merge_channel_last_torch(ys),
        lambda: _CrossMergeTriton.apply(ys, True),
    )
