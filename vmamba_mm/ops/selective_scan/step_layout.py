"""Shared pieces of the pure-PyTorch scans: the step layout, its layout changes, input gradients.

The time axis [L] is cut into nc chunks of T consecutive steps (the last one zero-padded) and
laid out time-in-chunk first: x [*lead, L] becomes [T, *lead, nc], where step t of chunk j is
x[..., j*T + t]. Step t of every chunk is then one contiguous slice, so one Python step of a
scan advances all chunks at once.

The layout changes are written as copies between 4-d (or higher) strided views: PyTorch runs
those through its parallel element-wise loops, while a 2-d transposed copy takes a
single-threaded path that measured about twice as slow.
"""

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

LOG2E = 1.0 / math.log(2.0)  # exp(x) = exp2(x log2(e)); exp2 is markedly cheaper on CPUs


def chunking(length: int, target: float) -> Tuple[int, int]:
    """(T, nc): steps per chunk and chunk count, T * nc >= L, with T near ``target``.

    A divisor of L in [target / 2, 2 target] is preferred (no padded steps; VMamba's L = H * W
    has one for the usual sizes); else T = ceil(target). T is at most L.
    """
    low, high = max(1, math.ceil(target / 2)), min(length, int(2 * target))
    divisors = [t for t in range(low, high + 1) if length % t == 0]
    chunk = min(divisors, key=lambda t: abs(t - target)) if divisors else math.ceil(target)
    chunk = max(1, min(length, chunk))
    return chunk, math.ceil(length / chunk)


def chunk_scan(ends: Tensor, whole: Tensor, reverse: bool) -> Tensor:
    """Level 2 of a chunked scan: s_{j+1} = ends_j + whole_j s_j over the chunks.

    With ``reverse`` it runs from the far end instead: s_{j-1} = ends_j + whole_j s_j.

    Args:
        ends: [nc, ...], what each chunk adds when nothing enters it.
        whole: [nc, ...], the decay across each chunk.

    Returns:
        [..., nc]: what enters each chunk, zero for the first (the last when ``reverse``).
    """
    n_chunks = ends.shape[0]
    ends = ends.contiguous()
    out = torch.empty_like(ends)
    if reverse:
        out[-1].zero_()
        for j in range(n_chunks - 1, 0, -1):
            torch.addcmul(ends[j], whole[j], out[j], out=out[j - 1])
    else:
        out[0].zero_()
        for j in range(n_chunks - 1):
            torch.addcmul(ends[j], whole[j], out[j], out=out[j + 1])
    return out.movedim(0, -1)


def compute_dtype(u: Tensor) -> torch.dtype:
    """float32 for fp32/bf16/fp16 inputs; float64 inputs (gradcheck) stay in float64."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def load_steps(x: Tensor, out: Tensor) -> Tensor:
    """Writes x [*lead, L] into ``out`` [T, *lead, nc]; steps past L are set to zero.

    Casts to out's dtype. Returns ``out``.
    """
    chunk, n_chunks, length = out.shape[0], out.shape[-1], x.shape[-1]
    full = length // chunk  # chunks without padding
    if full:
        out[..., :full].copy_(x[..., : full * chunk].unflatten(-1, (full, chunk)).movedim(-1, 0))
    if full < n_chunks:
        rest = length - full * chunk
        out[:rest, ..., full].copy_(x[..., full * chunk :].movedim(-1, 0))
        out[rest:, ..., full].zero_()
    return out


def store_steps(x_l: Tensor, out: Tensor) -> Tensor:
    """Writes the valid steps of x_l [T, *lead, nc] into ``out`` [*lead, L]; returns ``out``."""
    chunk, length = x_l.shape[0], out.shape[-1]
    full = length // chunk
    if full:
        out[..., : full * chunk].unflatten(-1, (full, chunk)).copy_(
            x_l[..., :full].movedim(0, -1)
        )
    rest = length - full * chunk
    if rest:
        out[..., full * chunk :].copy_(x_l[:rest, ..., full].movedim(0, -1))
    return out


def staging(buffer: Tensor) -> Tensor:
    """A step-layout view [T, *lead, nc] of ``buffer`` whose memory is ordered [*lead, T, nc].

    ``buffer`` is a contiguous [T, *lead, nc] tensor whose values are no longer needed. A result
    written into this view (a write of contiguous runs of nc values, nearly free when fused
    into the operation that forms the result) leaves the step layout through ``store_staged``,
    which then only transposes one small [T, nc] tile per leading index, inside the CPU caches:
    that measured about 1.6x faster than ``store_steps``, whose long strides defeat the caches.
    """
    chunk, *lead, n_chunks = buffer.shape
    return buffer.view(*lead, chunk, n_chunks).movedim(-2, 0)


def store_staged(staged: Tensor, out: Tensor) -> Tensor:
    """Writes the valid steps of ``staged`` (a ``staging`` view) into ``out`` [*lead, L].

    Returns ``out``.
    """
    tiles = staged.movedim(0, -2)  # [*lead, T, nc], contiguous
    chunk, length = tiles.shape[-2], out.shape[-1]
    full = length // chunk
    if full:
        out[..., : full * chunk].unflatten(-1, (full, chunk)).copy_(
            tiles[..., :full].transpose(-1, -2)
        )
    rest = length - full * chunk
    if rest:
        out[..., full * chunk :].copy_(tiles[..., :rest, full])
    return out


def to_steps(x: Tensor, chunk: int, n_chunks: int, dtype: torch.dtype) -> Tensor:
    """A fresh [T, *lead, nc] step-layout copy of x [*lead, L] in ``dtype``."""
    out = torch.empty((chunk, *x.shape[:-1], n_chunks), dtype=dtype, device=x.device)
    return load_steps(x, out)


def from_steps(x_l: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """A fresh [*lead, L] copy of the valid steps of x_l [T, *lead, nc] in ``dtype``."""
    out = torch.empty((*x_l.shape[1:-1], length), dtype=dtype, device=x_l.device)
    return store_steps(x_l, out)


def softplus_grad(grad: Tensor, dt: Tensor, scratch: Tensor, out: Tensor) -> Tensor:
    """out = grad * softplus'(v), at the v where dt = softplus(v); ``out`` may be ``grad``.

    softplus'(v) = sigmoid(v) = 1 - exp(-softplus(v)) = -expm1(-dt): it comes from the time steps
    themselves, with no second pass over delta. Above the threshold 20 (dt = v) it rounds to 1,
    the thresholded derivative. ``scratch`` (dt's shape) is overwritten. Returns ``out``.
    """
    derivative = torch.neg(dt, out=scratch).expm1_().neg_()
    return torch.mul(grad, derivative, out=out)


def input_grads(
    ddtu: Tensor,
    ddt: Tensor,
    u_l: Tensor,
    dt_l: Tensor,
    dy_l: Tensor,
    spare: Tensor,
    D: Optional[Tensor],
    delta_softplus: bool,
    with_bias: bool,
    du: Tensor,
    ddelta: Tensor,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients of u, delta, D and delta_bias from those of dt*u and of the decays' dt.

    All step-layout tensors are [T, b, K*D, nc]: ``ddtu`` = d loss / d(dt u) and ``ddt`` = the
    decays' part of d loss / d(dt). Then du = ddtu dt + D dy, d(dt) = ddt + ddtu u,
    d(delta) = d(dt) softplus'(v) (or d(dt) without softplus), dD = sum dy u and
    d(delta_bias) = sum d(delta). ``ddtu``, ``ddt``, ``dy_l`` and ``spare`` (a contiguous tensor
    of the same shape) are overwritten. du and d(delta) are formed staged and written into
    ``du`` and ``ddelta`` ([b, K*D, L], any float dtype).

    Returns:
        (dD or None, ddelta_bias or None), in the compute dtype.
    """
    ddt.addcmul_(ddtu, u_l)
    du_l = torch.mul(ddtu, dt_l, out=staging(spare))
    dD = None
    if D is not None:
        du_l.addcmul_(dy_l, D.to(du_l.dtype).view(-1, 1))
        dD = torch.mul(dy_l, u_l, out=ddtu).sum((0, 1, 3))
    store_staged(du_l, du)
    ddelta_l = staging(dy_l)
    if delta_softplus:
        softplus_grad(ddt, dt_l, scratch=ddtu, out=ddelta_l)
    else:
        ddelta_l.copy_(ddt)
    store_staged(ddelta_l, ddelta)
    return dD, ddelta_l.sum((0, 1, 3)) if with_bias else None
