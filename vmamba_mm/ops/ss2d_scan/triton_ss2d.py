"""The "triton" backend of ``ss2d_scan``: host launchers of the fused four-route kernels.

The kernels are in ``triton_ss2d_kernels.py`` (their docstring explains routes, route groups,
checkpoints, tiles and scans). This module picks tile sizes and the schedule, allocates results
and partials, and finishes the merges that are cheap in PyTorch: the sums of the per-channel-block
and per-segment partials of dB, dC, dA, dD and d(delta_bias). Nothing here reads tensor values
on the host, and it runs on ``meta`` tensors (the compile report replaces Triton's launch and
records what would run).

Schedules, chosen per call from the number of (batch, channel block) programs:

* sequential: one program walks all chunks of all four routes of its channel block, writing y
  (dx) once; the forward writes the checkpoints (the state entering every route chunk but the
  first) on the way. One read of each input per route.
* chunk-parallel: when those programs would leave most of the GPU idle AND the routes are
  long (at least ``MIN_PARALLEL_CHUNKS`` chunks). ``ss2d_chunk_state_kernel`` computes every
  route chunk's contribution from a zero carry, ``ss2d_propagate_kernel`` carries it along the
  route, then the output kernels run every (route pair, chunk) from its checkpoint: one launch
  for routes 0 and 2, then one for routes 1 and 3 that adds to the y (dx) the first stored. It
  reads x, delta and B (C and dy in the backward) a second time, and y (dx) once more, so it is
  not used where the walk it saves is short.

No float atomics: every sum has a fixed order, so results are bitwise repeatable.
"""

from typing import List, Optional, Tuple

import torch
import triton

from ..triton_launch import next_pow2, num_sms, on_device
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


def tile_sizes(dim: int, d_state: int, length: int) -> Tuple[int, int, int]:
    """(T, BLOCK_C, NP): steps per tile (= per checkpoint), channels per program, padded N.

    BLOCK_C keeps each row of an x/delta tile at least 64 bytes in fp32 (32 bytes in bf16), a
    whole number of 32-byte sectors; T fills the tile budget, at most 64 steps, and no more than
    the image has positions.
    """
    n_pad = next_pow2(d_state)
    block_c = min(next_pow2(dim), 32 if n_pad <= 2 else 16)
    steps = max(8, min(MAX_CHUNK, TILE_ELEMENTS // (block_c * n_pad)))
    return min(steps, max(2, next_pow2(length))), block_c, n_pad


def _num_warps(steps: int, block_c: int, n_pad: int) -> int:
    return max(1, min(8, steps * block_c * n_pad // 256))


def use_chunk_parallel(programs: int, n_chunks: int, device: torch.device) -> bool:
    """Whether to split the routes into independently walked chunks (see the module doc).

    Args:
        programs: programs of the sequential schedule, one per (batch, channel block).
        n_chunks: route chunks per route.
    """
    sms = num_sms(device)
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
        self.warps = _num_warps(self.steps, self.block_c, self.n_pad)

    def schedule(self, device: torch.device) -> "_Schedule":
        if use_chunk_parallel(self.batch * self.n_cblk, self.n_chunks, device):
            return _Schedule(self, parallel=True, routes_per_program=2, chunks_per_prog=1)
        return _Schedule(self, parallel=False, routes_per_program=ROUTES,
                         chunks_per_prog=self.n_chunks)

    def per_route_chunk(self, like: Tensor, n_chunks: int) -> Tensor:
        """Empty fp32 [batch, 4, n_chunks, D, N]."""
        return like.new_empty((self.batch, ROUTES, n_chunks, self.dim, self.d_state),
                              dtype=torch.float32)

    def checkpoints(self, like: Tensor) -> Tensor:
        """Empty fp32 [batch, 4, n_chunks - 1, D, N]: the carries entering the route chunks
        (the zero one at each route's start is not stored; see the kernels' docstring)."""
        return self.per_route_chunk(like, self.n_chunks - 1)

    def image(self, like: Tensor) -> Tensor:
        """Empty fp32 [batch, H, W, D]: y or dx."""
        return like.new_empty((self.batch, self.height, self.width, self.dim),
                              dtype=torch.float32)

    def sizes(self) -> dict:
        return dict(H=self.height, W=self.width, L=self.length, DIM=self.dim, N=self.d_state,
                    n_chunks=self.n_chunks)

    def tiles(self) -> dict:
        return dict(T=self.steps, BLOCK_C=self.block_c, NP=self.n_pad, num_warps=self.warps)


class _Schedule:
    """How a call's output kernels split the work (see the module doc): one launch per route
    group, in group order, each with ``programs`` programs."""

    def __init__(self, geo: _Geometry, parallel: bool, routes_per_program: int,
                 chunks_per_prog: int) -> None:
        self.parallel = parallel
        self.routes_per_program = routes_per_program
        self.chunks_per_prog = chunks_per_prog
        self.n_seg = geo.n_chunks // chunks_per_prog
        self.programs = geo.batch * geo.n_cblk * self.n_seg

    def launches(self) -> List[dict]:
        """The schedule's arguments of each output-kernel launch, in the order they must run."""
        return [dict(chunks_per_prog=self.chunks_per_prog, n_seg=self.n_seg,
                     FROM_CKPT=self.parallel, ROUTES_PER_PROGRAM=self.routes_per_program,
                     GROUP=group)
                for group in range(ROUTES // self.routes_per_program)]


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
    """The chunk-parallel carries, [batch, 4, n_chunks - 1, D, N]: the state entering route
    chunks 1 .. n - 1 (or the state gradient entering route chunks 0 .. n - 2).

    Args:
        inputs: x (forward) or dy (gradient), [batch, H, W, D].
        M: B (forward) or C (gradient), [batch, H, W, 4, N].
    """
    loc = geo.per_route_chunk(A, geo.n_chunks)
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
    block_p = min(next_pow2(geo.dim), max(1, 256 // geo.n_pad))
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
        n_chunks - 1, D, N], the state entering every route chunk but the first) when ``keep``,
        else [].
    """
    del scan_backend
    geo = _Geometry(x, A)
    x, delta, B, C = (channel_rows(t) for t in (x, delta, B, C))
    A = A.contiguous()
    D, delta_bias = (None if t is None else t.contiguous() for t in (D, delta_bias))
    plan = geo.schedule(x.device)
    y = geo.image(x)
    with on_device(x.device):
        if plan.parallel:
            h_ckpt = _carried(geo, x, delta, B, A, delta_bias, delta_softplus, gradient=False)
        else:
            h_ckpt = geo.checkpoints(x)
        for launch in plan.launches():
            kernels.ss2d_forward_kernel[(plan.programs,)](
                x_ptr=x, delta_ptr=delta, A_ptr=A, B_ptr=B, C_ptr=C,
                D_ptr=A if D is None else D,
                bias_ptr=A if delta_bias is None else delta_bias,
                y_ptr=y, hck_ptr=h_ckpt,
                **_strides("x", x, "bhwd"), **_strides("d", delta, "bhwkd"),
                **_strides("B", B, "bhwkn"), **_strides("C", C, "bhwkn"),
                **geo.sizes(), n_cblk=geo.n_cblk, **launch,
                **_flags(D, delta_bias, delta_softplus), **geo.tiles(),
            )
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
    D, delta_bias = (None if t is None else t.contiguous() for t in (D, delta_bias))
    f32 = dict(dtype=torch.float32)
    plan = geo.schedule(x.device)
    n_seg = plan.n_seg
    dx = geo.image(x)
    ddelta = delta.new_empty(delta.shape)  # contiguous: the kernel computes its offsets so
    routed = (geo.n_cblk, geo.batch, geo.height, geo.width, ROUTES, geo.d_state)
    dB_part, dC_part = B.new_empty(routed, **f32), C.new_empty(routed, **f32)
    dA_part = A.new_empty((geo.batch, n_seg, ROUTES * geo.dim, geo.d_state))
    dD_part = A.new_empty((geo.batch, n_seg, ROUTES * geo.dim))
    dbias_part = A.new_empty((geo.batch, n_seg, ROUTES * geo.dim))
    with on_device(x.device):
        if plan.parallel:
            g_ckpt = _carried(geo, dy, delta, C, A, delta_bias, delta_softplus, gradient=True)
        else:
            g_ckpt = h_ckpt  # not read
        for launch in plan.launches():
            kernels.ss2d_backward_kernel[(plan.programs,)](
                dy_ptr=dy, x_ptr=x, delta_ptr=delta, A_ptr=A, B_ptr=B, C_ptr=C,
                D_ptr=A if D is None else D,
                bias_ptr=A if delta_bias is None else delta_bias,
                hck_ptr=h_ckpt, gck_ptr=g_ckpt, dx_ptr=dx, ddelta_ptr=ddelta,
                dA_ptr=dA_part, dD_ptr=dD_part, dbias_ptr=dbias_part, dB_ptr=dB_part,
                dC_ptr=dC_part,
                **_strides("g", dy, "bhwd"), **_strides("x", x, "bhwd"),
                **_strides("d", delta, "bhwkd"), **_strides("B", B, "bhwkn"),
                **_strides("C", C, "bhwkn"),
                BATCH=geo.batch, **geo.sizes(), n_cblk=geo.n_cblk, **launch,
                **_flags(D, delta_bias, delta_softplus), **geo.tiles(),
            )
    dx = dx.to(x_dtype)
    dA = dA_part.sum((0, 1))
    dB = dB_part.sum(0).to(B.dtype)
    dC = dC_part.sum(0).to(C.dtype)
    dD = dD_part.sum((0, 1)) if D is not None else None
    ddelta_bias = dbias_part.sum((0, 1)) if delta_bias is not None else None
    return dx, ddelta, dA, dB, dC, dD, ddelta_bias
