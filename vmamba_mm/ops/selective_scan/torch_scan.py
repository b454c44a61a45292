"""Fast pure-PyTorch selective scan: a chunked two-level scan with a hand-written backward.

The recurrence h_t = a_t * h_{t-1} + x_t (a_t = exp(delta_t * A), x_t = delta_t * B_t * u_t) is
evaluated in chunks of T steps. The time axis [L] is laid out as [T, ..., nc] (nc = ceil(L / T)
chunks), so one Python step advances all chunks of all channels at once:

1. level 1: a scan inside every chunk from a zero state (T Python steps on [batch, K*D, N, nc]);
2. level 2: a scan over the chunk ends that yields the true state entering each chunk (nc steps on
   [batch, K*D, N], with the whole-chunk decay exp(A * sum(delta)));
3. a fix-up pass that adds the carried state, decayed step by step, to every position.

With T about sqrt(L) both loops take about sqrt(L) Python steps. The backward recomputes the states
and runs the same scheme in reverse time for the adjoint g_t = C_t * dy_t + a_{t+1} * g_{t+1}.
Nothing ever divides by a decay: decays may underflow to zero (very negative A, large delta) and
the result stays finite. The state is float32 whatever the input dtype.

Memory: the forward holds two [batch, K*D, N, L] float32 buffers, the backward three; nothing is
saved between them (the backward recomputes, as the CUDA kernels do).
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _chunk_size(length: int) -> int:
    """Steps per chunk: about sqrt(L), which balances the two Python loops."""
    return max(1, math.ceil(math.sqrt(length)))


def _softplus(x: Tensor) -> Tensor:
    """softplus with the kernels' threshold 20 (log1p(exp(v)) for v <= 20, else v)."""
    return F.softplus(x)


def _pad_time(x: Tensor, padded: int) -> Tensor:
    """Zero-pads the last (time) axis to ``padded`` steps."""
    extra = padded - x.shape[-1]
    return F.pad(x, (0, extra)) if extra else x


def _compute_dtype(u: Tensor) -> torch.dtype:
    """float32 for fp32/bf16/fp16 inputs; float64 inputs (gradcheck) stay in float64."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _to_chunks(x: Tensor, chunk: int, padded: int, dtype: torch.dtype) -> Tensor:
    """[b, ..., L] -> fresh contiguous [T, b, ..., nc] (time-in-chunk first, chunk index last)."""
    x = _pad_time(x, padded).unflatten(-1, (-1, chunk)).movedim(-1, 0)
    return x.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _from_chunks(x: Tensor, length: int) -> Tensor:
    """[T, b, ..., nc] -> [b, ..., length], always a fresh tensor (never aliases a buffer)."""
    return x.movedim(0, -1).flatten(-2)[..., :length].clone(memory_format=torch.contiguous_format)


class _Prepared:
    """fp32 (fp64 for fp64 inputs), padded, chunk-laid-out inputs shared by forward and backward.

    Every [.., L] tensor is held as [T, b, .., nc], so the per-step slices of the scan loops and
    all elementwise passes run over contiguous memory.
    """

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus):
        batch, channels, length = u.shape
        groups, d_state = B.shape[1], A.shape[1]
        self.shape = (batch, channels, length, groups, channels // groups, d_state)
        self.chunk = chunk = _chunk_size(length)
        self.n_chunks = math.ceil(length / chunk)
        self.padded = padded = chunk * self.n_chunks
        self.dtype = dtype = _compute_dtype(u)
        self.A = A.to(dtype)
        self.u_l = _to_chunks(u, chunk, padded, dtype)  # [T, b, K*D, nc]
        dt = _to_chunks(delta, chunk, padded, dtype)
        if delta_bias is not None:
            dt.add_(delta_bias.to(dtype)[None, None, :, None])
        if delta_softplus:
            dt = _softplus(dt)
        # Padded steps must be exact no-ops: dt = 0 gives a = 1 and x = 0.
        dt[length - (self.n_chunks - 1) * chunk :, ..., -1] = 0
        self.dt_l = dt  # [T, b, K*D, nc]
        self.dtu_l = dt * self.u_l
        self.B_l = _to_chunks(B, chunk, padded, dtype).unsqueeze(3)  # [T, b, K, 1, N, nc]
        self.C_l = _to_chunks(C, chunk, padded, dtype).unsqueeze(3)

    def grouped(self, x: Tensor) -> Tensor:
        """[T, b, K*D, N, nc] -> view [T, b, K, D, N, nc] (channel c belongs to group c // D)."""
        _, _, _, groups, per_group, _ = self.shape
        return x.unflatten(2, (groups, per_group))

    def per_group(self, x: Tensor) -> Tensor:
        """[T, b, K*D, nc] -> view [T, b, K, D, 1, nc], broadcastable against B/C layouts."""
        return self.grouped(x.unsqueeze(3))

    def new_state_buffer(self) -> Tensor:
        batch, channels, _, _, _, d_state = self.shape
        shape = (self.chunk, batch, channels, d_state, self.n_chunks)
        return torch.empty(shape, dtype=self.dtype, device=self.u_l.device)

    def decays(self) -> Tensor:
        """a = exp(dt * A) in chunk layout, [T, b, K*D, N, nc]."""
        a = self.new_state_buffer()
        torch.mul(self.dt_l.unsqueeze(3), self.A[None, None, :, :, None], out=a)
        return a.exp_()

    def chunk_decays(self) -> Tensor:
        """Decay over each whole chunk, exp(A * sum_t dt_t), as [nc, b, K*D, N]."""
        dt_sum = self.dt_l.sum(0).movedim(-1, 0)  # [nc, b, K*D]
        return torch.exp(dt_sum.unsqueeze(-1) * self.A)


def _forward_states(prep: _Prepared, a: Tensor) -> Tensor:
    """Runs the two-level scan; returns the states h in chunk layout, [T, b, K*D, N, nc]."""
    h = prep.new_state_buffer()
    torch.mul(prep.per_group(prep.dtu_l), prep.B_l, out=prep.grouped(h))  # x_t
    for t in range(1, prep.chunk):
        h[t].addcmul_(a[t], h[t - 1])
    if prep.n_chunks > 1:
        ends = h[-1].movedim(-1, 0).contiguous()  # [nc, b, K*D, N] chunk-local end states
        whole = prep.chunk_decays()
        entering = torch.zeros_like(ends)  # true state entering each chunk
        for j in range(prep.n_chunks - 1):
            torch.addcmul(ends[j], whole[j], entering[j], out=entering[j + 1])
        carry = entering.movedim(0, -1).contiguous()  # [b, K*D, N, nc]
        for t in range(prep.chunk):
            carry.mul_(a[t])
            h[t].add_(carry)
    return h


def _reverse_adjoint(prep: _Prepared, a: Tensor, g: Tensor) -> Tensor:
    """Turns g = C * dy (chunk layout), in place, into the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}.

    Returns:
        g, [T, b, K*D, N, nc].
    """
    for t in range(prep.chunk - 2, -1, -1):
        g[t].addcmul_(a[t + 1], g[t + 1])
    if prep.n_chunks > 1:
        starts = (a[0] * g[0]).movedim(-1, 0).contiguous()  # [nc, b, K*D, N]
        whole = prep.chunk_decays()
        # leaving[j] = a_{s} * g_{s} at the first step s of chunk j + 1 (true adjoint).
        leaving = torch.zeros_like(starts)
        for j in range(prep.n_chunks - 2, -1, -1):
            torch.addcmul(starts[j + 1], whole[j + 1], leaving[j + 1], out=leaving[j])
        carry = leaving.movedim(0, -1).contiguous()  # [b, K*D, N, nc]
        g[-1].add_(carry)
        for t in range(prep.chunk - 2, -1, -1):
            carry.mul_(a[t + 1])
            g[t].add_(carry)
    return g


def _sum_states(prep: _Prepared, x: Tensor) -> Tensor:
    """Sums [T, b, K, D, N, nc] over N -> [T, b, K, D, nc] (a view when N == 1)."""
    return x.squeeze(4) if prep.shape[5] == 1 else x.sum(4)


def torch_scan_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tuple[Tensor, List[Tensor]]:
    """Selective scan forward (no autograd), same math as ``selective_scan_naive``.

    Args:
        u: [batch, K*D, L], fp32/bf16/fp16.
        delta: [batch, K*D, L], same dtype family as u.
        A: [K*D, N] fp32, entries <= 0.
        B, C: [batch, K, N, L].
        D: [K*D] fp32 or None.
        delta_bias: [K*D] fp32 or None.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        (y, saved): y is fp32 [batch, K*D, L] (fp64 for fp64 inputs); saved is an empty list
        (the backward recomputes).
    """
    prep = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus)
    length = prep.shape[2]
    a = prep.decays()
    h = _forward_states(prep, a)
    # y_t = sum_n C_t h_t; the decay buffer is free now and takes the product.
    prod = prep.grouped(a)
    torch.mul(prep.grouped(h), prep.C_l, out=prod)
    y = _from_chunks(_sum_states(prep, prod).flatten(2, 3), length)  # [b, K*D, L]
    if D is not None:
        y = y.addcmul_(u.to(prep.dtype), D.to(prep.dtype)[None, :, None])
    return y, []


def torch_scan_forward_fake(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tuple[Tensor, List[Tensor]]:
    """Shape-only twin of ``torch_scan_forward`` for fake/meta tensors (torch.library tracing).

    Returns:
        (y, saved): an empty fp32 [batch, K*D, L] tensor and an empty list.
    """
    return u.new_empty(u.shape, dtype=_compute_dtype(u)), []


def torch_scan_backward(
    dy: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    *saved: Sequence[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of the selective scan, recomputing the forward states chunk by chunk.

    Args:
        dy: gradient of y, [batch, K*D, L] (any float dtype).
        u, delta, A, B, C, D, delta_bias, delta_softplus: the forward's inputs.
        *saved: what ``torch_scan_forward`` returned as saved (nothing).

    Returns:
        (du, ddelta, dA, dB, dC, dD, ddelta_bias): du/ddelta in u/delta's dtype [batch, K*D, L],
        dA fp32 [K*D, N], dB/dC in B/C's dtype [batch, K, N, L], dD and ddelta_bias fp32 [K*D]
        or None when the input was None.
    """
    prep = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus)
    length, d_state = prep.shape[2], prep.shape[5]
    dy_l = _to_chunks(dy, prep.chunk, prep.padded, prep.dtype)  # [T, b, K*D, nc]
    dy_g = prep.per_group(dy_l)  # [T, b, K, D, 1, nc]

    a = prep.decays()
    h = _forward_states(prep, a)
    g = prep.new_state_buffer()
    # dC = sum over the group's channels of dy * h (g's buffer is scratch until it holds g).
    torch.mul(prep.grouped(h), dy_g, out=prep.grouped(g))
    dC_l = prep.grouped(g).sum(3)  # [T, b, K, N, nc]
    torch.mul(prep.C_l, dy_g, out=prep.grouped(g))
    _reverse_adjoint(prep, a, g)

    # Gradient w.r.t. the log-decay dt*A: g_t * a_t * h_{t-1}, with h_{t-1} read from the
    # shifted states (no division, no cancellation). Written over a.
    dlog = a.mul_(g)
    dlog[1:].mul_(h[:-1])
    dlog[0, ..., 1:].mul_(h[-1, ..., :-1])
    dlog[0, ..., 0].zero_()
    scratch = h  # the states are no longer needed
    torch.mul(dlog, prep.dt_l.unsqueeze(3), out=scratch)
    dA = scratch.sum((0, 1, 4))  # [K*D, N]
    torch.mul(dlog, prep.A[None, None, :, :, None], out=scratch)
    ddt_l = scratch.squeeze(3).clone() if d_state == 1 else scratch.sum(3)  # [T, b, K*D, nc]

    torch.mul(prep.grouped(g), prep.per_group(prep.dtu_l), out=prep.grouped(scratch))
    dB_l = prep.grouped(scratch).sum(3)  # [T, b, K, N, nc]
    torch.mul(prep.grouped(g), prep.B_l, out=prep.grouped(dlog))
    ddtu_l = _sum_states(prep, prep.grouped(dlog)).flatten(2, 3)  # [T, b, K*D, nc]

    du_l = ddtu_l * prep.dt_l
    ddt_l.addcmul_(ddtu_l, prep.u_l)
    dD = None
    if D is not None:
        du_l.addcmul_(dy_l, D.to(prep.dtype)[None, None, :, None])
        dD = (dy_l * prep.u_l).sum((0, 1, 3))
    if delta_softplus:
        # d softplus(v)/dv = sigmoid(v) = 1 - exp(-softplus(v)), read from dt itself; above the
        # threshold (dt = v > 20) it rounds to 1 in fp32, as the thresholded derivative does.
        ddt_l.mul_(torch.expm1(prep.dt_l.neg()).neg_())
    ddelta_bias = ddt_l.sum((0, 1, 3)) if delta_bias is not None else None
    du = _from_chunks(du_l, length).to(u.dtype)
    ddelta = _from_chunks(ddt_l, length).to(delta.dtype)
    dB = _from_chunks(dB_l, length).to(B.dtype)
    dC = _from_chunks(dC_l, length).to(C.dtype)
    return du, ddelta, dA, dB, dC, dD, ddelta_bias
