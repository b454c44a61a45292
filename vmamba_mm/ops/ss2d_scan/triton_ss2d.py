"""The "triton" backend of ``ss2d_scan``: host launchers of the fused four-route kernels.

The kernels are in ``triton_ss2d_kernels.py`` (their docstring explains routes, pairs, tiles
and scans). This module picks tile sizes and the schedule, allocates results and partials, and
finishes the merges that are cheap in PyTorch: y = pair 0 + pair 1, dx likewise, and the sums of
the per-channel-block and per-segment partials of dB, dC, dA, dD and d(delta_bias). Nothing
here reads tensor values on the host, and it runs on ``meta`` tensors (the compile report
replaces Triton's launch and records what would run).

Schedules, chosen per call from the number of (batch, route pair, channel block) programs:

* sequential: one program walks all chunks of its pair; the forward writes the checkpoints
  (the state entering every route chunk) on the way. One read of each input per route.
* chunk-parallel: when those programs would leave most of the GPU idle AND the routes are
  long (at least ``MIN_PARALLEL_CHUNKS`` chunks). ``ss2d_chunk_state_kernel`` computes every
  route chunk's contribution from a zero carry, ``ss2d_propagate_kernel`` carries it along the
  route, then the output kernel runs every chunk from its checkpoint. It reads x, delta and B
  (C and dy in the backward) a second time, so it is not used where the walk it saves is short.

No float atomics: every sum has a fixed order, so results are bitwise repeatable.
"""

import contextlib
from typing import Optional, Tuple

import torch
import triton

from . import triton_ss2d_kernels as kernels
from .routes import ROUTES

Tensor = torch.Tensor

# Elements of a [T, BLOCK_C, NP] state tile per program: the backward keeps about ten such
# tiles live, which at 8 warps (256 threads) is 8 registers each.
TILE_ELEMENTS = 2048
MAX_CHUNK = 64
# The chunk-parallel schedule pays two more launches and a second read of the inputs; below
# this many chunks per route, the sequential walk it would shorten is short already.
MIN_PARALLEL_CHUNKS = 8


def _next_pow2(value: int) -> int:
    return 1 << max(int(value) - 1, 0).bit_length()


def tile_sizes(dim: int, d_state: int, length: int) -> Tuple[int, int, int]:
    """(T, BLOCK_C, NP): steps per tile (= per checkpoint), channels per program, padded N.

    BLOCK_C keeps each row of an x/delta tile at least 64 bytes in fp32 (32 bytes in bf16), a
    whole number of 32-byte sectors; T fills the tile budget, at most 64 steps, and no more than
    the image has positions.
    """
    n_pad = _next_pow2(d_state)
    block_c = min(_next_pow2(dim), 32 if n_pad <= 2 else 16)
    steps = max(8, min(MAX_CHUNK, TILE_ELEMENTS // (block_c * n_pad)))
    return min(steps, max(2, _next_pow2(length))), block_c, n_pad


def _num_warps(steps: int, block_c: int, n_pad: int) -> int:
    return max(1, min(8, steps * block_c * n_pad // 256))


def _num_sms(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def use_chunk_parallel(programs: int, n_chunks: int, device: torch.device) -> bool:
    """Whether to split the routes into independently walked chunks (see the module doc)."""
    sms = _num_sms(device)
    if sms is None:
        return False  # the interpreter runs programs one after the other
    return programs < 2 * sms and n_chunks >= MIN_PARALLEL_CHUNKS


class _Geometry:
    """Sizes of one call: image, channels, states, tiles, chunks and the program grid."""

    def __init__(self, x: Tensor, A: Tensor) -> None:
        self.batch, self.height, self.width, self.dim = x.shape
        self.length = self.height * self.width
        self.d_state = A.shape[1]
        self.steps, self.block_c, self.n_pad = tile_sizes(self.dim, self.d_state, self.length)
        self.n_chunks = triton.cdiv(self.length, self.steps)
        self.n_cblk = triton.cdiv(self.dim, self.block_c)
        self.programs = self.batch * 2 * self.n_cblk  # per segment
        self.warps = _num_warps(self.steps, self.block_c, self.n_pad)

    def chunk_parallel(self, device: torch.device) -> bool:
        return use_chunk_parallel(self.programs, self.n_chunks, device)

    def checkpoints(self, like: Tensor) -> Tensor:
        """Empty fp32 [batch, 4, n_chunks, D, N]: the state entering each route chunk."""
        return like.new_empty((self.batch, ROUTES, self.n_chunks, self.dim, self.d_state),
                              dtype=torch.float32)

    def sizes(self) -> dict:
        return dict(H=self.height, W=self.width, L=self.length, DIM=self.dim, N=self.d_state,
                    n_chunks=self.n_chunks)

    def tiles(self) -> dict:
        return dict(T=self.steps, BLOCK_C=self.block_c, NP=self.n_pad, num_warps=self.warps)


def channel_rows(tensor: Tensor) -> Tensor:
    """``tensor`` itself when its last (channel or state) stride is 1, else a contiguous copy.

    The kernels read every position's vector along the last dimension, once per route: with a
    unit stride that is one coalesced row; with another stride every element is a sector of
    its own. One copy is then cheaper than the four strided reads (a gradient arriving as a
    transposed view, an x whose conv did not run in channels_last memory format).
    """
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()


def _strides(prefix: str, tensor: Tensor, names: str) -> dict:
    return {f"s{prefix}_{name}": stride for name, stride in zip(names, tensor.stride())}


def _flags(D: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool) -> dict:
    return dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus))


def _carried(geo: _Geometry, inputs: Tensor, delta: Tensor, M: Tensor, A: Tensor,
             delta_bias: Optional[Tensor], delta_softplus: bool, gradient: bool) -> Tensor:
    """The chunk-parallel carries: the state (or state gradient) entering every route chunk.

    Args:
        inputs: x (forward) or dy (gradient), [batch, H, W, D].
        M: B (forward) or C (gradient), [batch, H, W, 4, N].
    """
    loc = geo.checkpoints(A)
    dsum = A.new_empty((geo.batch, ROUTES, geo.n_chunks, geo.dim))
    kernels.ss2d_chunk_state_kernel[(geo.batch * ROUTES * geo.n_cblk * geo.n_chunks,)](
        x_ptr=inputs, delta_ptr=delta, M_ptr=M, A_ptr=A,
        bias_ptr=A if delta_bias is None else delta_bias, loc_ptr=loc, dsum_ptr=dsum,
        **_strides("x", inputs, "bhwd"), **_strides("d", delta, "bhwkd"),
        **_strides("M", M, "bhwkn"), **geo.sizes(), n_cblk=geo.n_cblk,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), GRADIENT=gradient,
        **geo.tiles(),
    )
    carried = geo.checkpoints(A)
    block_p = min(_next_pow2(geo.dim), max(1, 256 // geo.n_pad))
    kernels.ss2d_propagate_kernel[(geo.batch * ROUTES, triton.cdiv(geo.dim, block_p))](
        loc_ptr=loc, dsum_ptr=dsum, A_ptr=A, out_ptr=carried, DIM=geo.dim, N=geo.d_state,
        n_chunks=geo.n_chunks, GRADIENT=gradient, BLOCK_C=block_p, NP=geo.n_pad,
    )
    return carried


def triton_ss2d_forward_fake(x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend,
                             keep):
    """Shape-only twin of ``triton_ss2d_forward`` (torch.library fake tensors)."""
    geo = _Geometry(x, A)
    y = x.new_empty(x.shape, dtype=torch.float32)
    return y, ([geo.checkpoints(x)] if keep else [])


def triton_ss2d_forward(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    scan_backend: str = "",
    keep: bool = True,
) -> Tuple[Tensor, list]:
    """Fused four-route scan forward (see ``interface.ss2d_scan`` for the shapes).

    Args:
        x, delta, A, B, C, D, delta_bias, delta_softplus: as ``ss2d_scan``; any strides.
        scan_backend: unused (the kernels are their own scan).
        keep: return the checkpoints for the backward.

    Returns:
        (y, saved): y fp32 [batch, H, W, D], contiguous; saved = [h_ckpt] (fp32 [batch, 4,
        n_chunks, D, N], the state entering every route chunk) when ``keep``, else [].
    """
    del scan_backend
    geo = _Geometry(x, A)
    x, delta, B, C = (channel_rows(t) for t in (x, delta, B, C))
    A = A.contiguous()
    pairs = x.new_empty((2, geo.batch, geo.height, geo.width, geo.dim), dtype=torch.float32)
    parallel = geo.chunk_parallel(x.device)
    with _on_device(x.device):
        if parallel:
            h_ckpt = _carried(geo, x, delta, B, A, delta_bias, delta_softplus, gradient=False)
            chunks_per_prog = 1
        else:
            h_ckpt = geo.checkpoints(x)
            chunks_per_prog = geo.n_chunks
        n_seg = geo.n_chunks // chunks_per_prog
        kernels.ss2d_forward_kernel[(geo.programs * n_seg,)](
            x_ptr=x, delta_ptr=delta, A_ptr=A, B_ptr=B, C_ptr=C,
            D_ptr=A if D is None else D.contiguous(),
            bias_ptr=A if delta_bias is None else delta_bias.contiguous(),
            y_ptr=pairs, hck_ptr=h_ckpt,
            **_strides("x", x, "bhwd"), **_strides("d", delta, "bhwkd"),
            **_strides("B", B, "bhwkn"), **_strides("C", C, "bhwkn"),
            BATCH=geo.batch, **geo.sizes(), chunks_per_prog=chunks_per_prog,
            n_cblk=geo.n_cblk, n_seg=n_seg, **_flags(D, delta_bias, delta_softplus),
            FROM_CKPT=parallel, **geo.tiles(),
        )
    y = torch.add(pairs[0], pairs[1])
    return y, ([h_ckpt] if keep else [])


def triton_ss2d_backward(
    dy: Tensor,
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    scan_backend: str = "",
    *saved: Tensor,
) -> Tuple[Optional[Tensor], ...]:
    """Gradients of the fused four-route scan.

    Args:
        dy: gradient of y, [batch, H, W, D], any strides.
        x, delta, A, B, C, D, delta_bias, delta_softplus: the forward's inputs.
        scan_backend: unused.
        *saved: [h_ckpt] from the forward; recomputed by a forward pass when absent.

    Returns:
        (dx, ddelta, dA, dB, dC, dD, ddelta_bias), each contiguous in its input's dtype and shape
        (dA, dD, d(delta_bias) fp32); dD / d(delta_bias) None when D / delta_bias is None.
    """
    del scan_backend
    if not saved:
        _, saved = triton_ss2d_forward(x, delta, A, B, C, D, delta_bias, delta_softplus)
    (h_ckpt,) = saved
    geo = _Geometry(x, A)
    x_dtype = x.dtype
    dy, x, delta, B, C = (channel_rows(t) for t in (dy, x, delta, B, C))
    A = A.contiguous()
    f32 = dict(dtype=torch.float32)
    parallel = geo.chunk_parallel(x.device)
    chunks_per_prog = 1 if parallel else geo.n_chunks
    n_seg = geo.n_chunks // chunks_per_prog
    dx_pairs = x.new_empty((2, geo.batch, geo.height, geo.width, geo.dim), **f32)
    ddelta = delta.new_empty(delta.shape)  # contiguous: the kernel computes its offsets so
    routed = (geo.n_cblk, geo.batch, geo.height, geo.width, ROUTES, geo.d_state)
    dB_part, dC_part = B.new_empty(routed, **f32), C.new_empty(routed, **f32)
    dA_part = A.new_empty((geo.batch, n_seg, ROUTES * geo.dim, geo.d_state))
    dD_part = A.new_empty((geo.batch, n_seg, ROUTES * geo.dim))
    dbias_part = A.new_empty((geo.batch, n_seg, ROUTES * geo.dim))
    with _on_device(x.device):
        if parallel:
            g_ckpt = _carried(geo, dy, delta, C, A, delta_bias, delta_softplus, gradient=True)
        else:
            g_ckpt = h_ckpt  # not read
        kernels.ss2d_backward_kernel[(geo.programs * n_seg,)](
            dy_ptr=dy, x_ptr=x, delta_ptr=delta, A_ptr=A, B_ptr=B, C_ptr=C,
            D_ptr=A if D is None else D.contiguous(),
            bias_ptr=A if delta_bias is None else delta_bias.contiguous(),
            hck_ptr=h_ckpt, gck_ptr=g_ckpt, dx_ptr=dx_pairs, ddelta_ptr=ddelta,
            dA_ptr=dA_part, dD_ptr=dD_part, dbias_ptr=dbias_part, dB_ptr=dB_part,
            dC_ptr=dC_part,
            **_strides("g", dy, "bhwd"), **_strides("x", x, "bhwd"),
            **_strides("d", delta, "bhwkd"), **_strides("B", B, "bhwkn"),
            **_strides("C", C, "bhwkn"),
            BATCH=geo.batch, **geo.sizes(), chunks_per_prog=chunks_per_prog,
            n_cblk=geo.n_cblk, n_seg=n_seg, **_flags(D, delta_bias, delta_softplus),
            FROM_CKPT=parallel, **geo.tiles(),
        )
    dx = torch.add(dx_pairs[0], dx_pairs[1]).to(x_dtype)
    dA = dA_part.sum((0, 1))
    dB = dB_part.sum(0).to(B.dtype)
    dC = dC_part.sum(0).to(C.dtype)
    dD = dD_part.sum((0, 1)) if D is not None else None
    ddelta_bias = dbias_part.sum((0, 1)) if delta_bias is not None else None
    return dx, ddelta, dA, dB, dC, dD, ddelta_bias
