"""Triton kernels for the four-direction cross-scan and cross-merge.

One scan kernel and one merge kernel serve both memory layouts: the image side (the scan's input,
the merge's output) is addressed through strides, so channel-first [B, D, H, W] and channel-last
[B, H, W, D] tensors are read or written in place without a transposing copy. The route side is
always a contiguous [B, 4, D, L] tensor with L = H * W.

Each program handles a tile of BLOCK_H x BLOCK_W pixels for BLOCK_D channels of one image. H, W, D
and L are runtime arguments, so a new image size never triggers a recompile; addresses are computed
in int64 because B * 4 * D * L overflows int32 at detection resolutions.

Triton is imported only when a kernel is first needed. The kernels are decorated on first use and
cached per interpreter mode, because ``triton.jit`` decides at decoration time whether a function
runs compiled or in the CPU interpreter (``TRITON_INTERPRET=1``). The kernels call only Triton
builtins (no ``@triton.jit`` helpers such as ``tl.cdiv``, which are decorated when Triton is first
imported), so they run in either mode whatever the mode was at that import.
"""

from typing import Any, Callable, Dict, Tuple

import torch

from ..triton_env import interpreter_enabled
from ..triton_launch import next_pow2

_KERNELS: Dict[bool, Tuple[Any, Any]] = {}




def _kernel_sources() -> Tuple[Callable, Callable]:
    import triton.language as tl

    def cross_scan_kernel(
        x_ptr,
        xs_ptr,
        D,
        H,
        W,
        L,
        route_stride,
        stride_xb,
        stride_xd,
        stride_xh,
        stride_xw,
        BLOCK_D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        pid_hw = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        blocks_w = (W + BLOCK_W - 1) // BLOCK_W
        h0 = (pid_hw // blocks_w) * BLOCK_H
        w0 = (pid_hw % blocks_w) * BLOCK_W
        pix = tl.arange(0, BLOCK_H * BLOCK_W)
        d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        # Row order: pixel p of the tile is (h0 + p // BLOCK_W, w0 + p % BLOCK_W).
        h = (h0 + pix // BLOCK_W).to(tl.int64)
        w = (w0 + pix % BLOCK_W).to(tl.int64)
        mask = (d[:, None] < D) & ((h < H) & (w < W))[None, :]
        # Column order: pixel p is (h0 + p % BLOCK_H, w0 + p // BLOCK_H), so the column-major
        # routes are written in runs that are contiguous in memory.
        hc = (h0 + pix % BLOCK_H).to(tl.int64)
        wc = (w0 + pix // BLOCK_H).to(tl.int64)
        mask_c = (d[:, None] < D) & ((hc < H) & (wc < W))[None, :]

        src = x_ptr + pid_b * stride_xb + d[:, None] * stride_xd
        vals = tl.load(src + (h * stride_xh + w * stride_xw)[None, :], mask=mask)
        vals_c = tl.reshape(
            tl.permute(tl.reshape(vals, (BLOCK_D, BLOCK_H, BLOCK_W)), (0, 2, 1)),
            (BLOCK_D, BLOCK_H * BLOCK_W),
        )

        row = (h * W + w)[None, :]  # position along route 0
        col = (wc * H + hc)[None, :]  # position along route 1, column order
        # Left to right, so the int64 program index widens every product before it can overflow.
        dst0 = xs_ptr + pid_b * 4 * route_stride + d[:, None] * L
        dst1 = dst0 + route_stride
        dst2 = dst1 + route_stride
        dst3 = dst2 + route_stride
        tl.store(dst0 + row, vals, mask=mask)
        tl.store(dst1 + col, vals_c, mask=mask_c)
        tl.store(dst2 + (L - 1 - row), vals, mask=mask)
        tl.store(dst3 + (L - 1 - col), vals_c, mask=mask_c)

    def cross_merge_kernel(
        ys_ptr,
        y_ptr,
        D,
        H,
        W,
        L,
        route_stride,
        stride_yb,
        stride_yd,
        stride_yh,
        stride_yw,
        BLOCK_D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
        ACC_F64: tl.constexpr,
    ):
        pid_hw = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        blocks_w = (W + BLOCK_W - 1) // BLOCK_W
        h0 = (pid_hw // blocks_w) * BLOCK_H
        w0 = (pid_hw % blocks_w) * BLOCK_W
        pix = tl.arange(0, BLOCK_H * BLOCK_W)
        d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
        h = (h0 + pix // BLOCK_W).to(tl.int64)
        w = (w0 + pix % BLOCK_W).to(tl.int64)
        mask = (d[:, None] < D) & ((h < H) & (w < W))[None, :]
        hc = (h0 + pix % BLOCK_H).to(tl.int64)
        wc = (w0 + pix // BLOCK_H).to(tl.int64)
        mask_c = (d[:, None] < D) & ((hc < H) & (wc < W))[None, :]

        row = (h * W + w)[None, :]
        col = (wc * H + hc)[None, :]
        src0 = ys_ptr + pid_b * 4 * route_stride + d[:, None] * L
        src1 = src0 + route_stride
        src2 = src1 + route_stride
        src3 = src2 + route_stride
        y0 = tl.load(src0 + row, mask=mask)
        y2 = tl.load(src2 + (L - 1 - row), mask=mask)
        # The column routes are read in column order (contiguous runs), then brought to row order.
        y1 = tl.load(src1 + col, mask=mask_c)
        y3 = tl.load(src3 + (L - 1 - col), mask=mask_c)
        y1 = tl.reshape(
            tl.permute(tl.reshape(y1, (BLOCK_D, BLOCK_W, BLOCK_H)), (0, 2, 1)),
            (BLOCK_D, BLOCK_H * BLOCK_W),
        )
        y3 = tl.reshape(
            tl.permute(tl.reshape(y3, (BLOCK_D, BLOCK_W, BLOCK_H)), (0, 2, 1)),
            (BLOCK_D, BLOCK_H * BLOCK_W),
        )
        # Half-precision routes are summed in fp32 and rounded once; float64 stays float64.
        if ACC_F64:
            acc = ((y0 + y1) + y2) + y3
        else:
            acc = ((y0.to(tl.float32) + y1.to(tl.float32)) + y2.to(tl.float32)) + y3.to(tl.float32)

        dst = y_ptr + pid_b * stride_yb + d[:, None] * stride_yd
        dst = dst + (h * stride_yh + w * stride_yw)[None, :]
        tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=mask)

    return cross_scan_kernel, cross_merge_kernel


def _kernels() -> Tuple[Any, Any]:
    interpret = interpreter_enabled()
    if interpret not in _KERNELS:
        import triton

        scan_fn, merge_fn = _kernel_sources()
        _KERNELS[interpret] = (triton.jit(scan_fn), triton.jit(merge_fn))
    return _KERNELS[interpret]


def _tile(dim: int, height: int, width: int, channel_last: bool) -> Tuple[int, int, int, int]:
    """Block sizes (BLOCK_D, BLOCK_H, BLOCK_W) and warp count for one launch.

    Tiles hold at most 2048 elements. Channel-first tiles are wide in space (contiguous runs along W
    for the image and along H for the column routes); channel-last tiles are wide in D, the
    contiguous axis of the image.
    """
    budget = 2048
    if channel_last:
        block_d = min(next_pow2(dim), 32)
        block_w = min(next_pow2(width), 8)
        block_h = min(next_pow2(height), max(1, budget // (block_d * block_w)))
    else:
        block_w = min(next_pow2(width), 32)
        block_h = min(next_pow2(height), 32)
        block_d = min(next_pow2(dim), max(1, budget // (block_h * block_w)))
    warps = 8 if block_d * block_h * block_w >= 2048 else 4
    return block_d, block_h, block_w, warps


def _grid(batch: int, dim: int, height: int, width: int, tile: Tuple[int, int, int, int]):
    block_d, block_h, block_w, _ = tile
    tiles = -(-height // block_h) * -(-width // block_w)
    return (tiles, -(-dim // block_d), batch)


def cross_scan_triton(x: torch.Tensor, channel_last: bool = False) -> torch.Tensor:
    """Four-route cross-scan with one Triton launch (no autograd).

    Args:
        x: [B, D, H, W], or [B, H, W, D] when ``channel_last``; any strides.

    Returns:
        xs: [B, 4, D, H*W], contiguous, dtype of ``x``.
    """
    if channel_last:
        batch, height, width, dim = x.shape
        stride_b, stride_h, stride_w, stride_d = x.stride()
    else:
        batch, dim, height, width = x.shape
        stride_b, stride_d, stride_h, stride_w = x.stride()
    length = height * width
    xs = torch.empty((batch, 4, dim, length), dtype=x.dtype, device=x.device)
    if xs.numel() == 0:
        return xs
    scan_kernel, _ = _kernels()
    tile = _tile(dim, height, width, channel_last)
    scan_kernel[_grid(batch, dim, height, width, tile)](
        x,
        xs,
        dim,
        height,
        width,
        length,
        dim * length,
        stride_b,
        stride_d,
        stride_h,
        stride_w,
        BLOCK_D=tile[0],
        BLOCK_H=tile[1],
        BLOCK_W=tile[2],
        num_warps=tile[3],
    )
    return xs


def cross_merge_triton(ys: torch.Tensor, channel_last: bool = False) -> torch.Tensor:
    """Four-route cross-merge with one Triton launch (no autograd).

    Each output element is ``((y0 + y1) + y2) + y3``, summed in fp32 (float64 for float64 input)
    and rounded once to the dtype of ``ys``.

    Args:
        ys: [B, 4, D, H, W], each route in its own scan order.

    Returns:
        y: [B, D, H*W], or [B, H*W, D] when ``channel_last``; contiguous, dtype of ``ys``.
    """
    batch, _, dim, height, width = ys.shape
    length = height * width
    ys = ys.contiguous()
    if channel_last:
        y = torch.empty((batch, length, dim), dtype=ys.dtype, device=ys.device)
        stride_b, stride_d, stride_h, stride_w = length * dim, 1, width * dim, dim
    else:
        y = torch.empty((batch, dim, length), dtype=ys.dtype, device=ys.device)
        stride_b, stride_d, stride_h, stride_w = dim * length, length, width, 1
    if y.numel() == 0:
        return y
    _, merge_kernel = _kernels()
    tile = _tile(dim, height, width, channel_last)
    merge_kernel[_grid(batch, dim, height, width, tile)](
        ys,
        y,
        dim,
        height,
        width,
        length,
        dim * length,
        stride_b,
        stride_d,
        stride_h,
        stride_w,
        BLOCK_D=tile[0],
        BLOCK_H=tile[1],
        BLOCK_W=tile[2],
        ACC_F64=ys.dtype == torch.float64,
        num_warps=tile[3],
    )
    return y
