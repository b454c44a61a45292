"""Fast pure-PyTorch selective scan: a chunked two-level scan with a hand-written backward.

The recurrence h_t = a_t * h_{t-1} + x_t (a_t = exp(delta_t * A), x_t = delta_t * B_t * u_t) is
evaluated in chunks of T steps. The time axis [L] is laid out as [T, nc] (nc = ceil(L / T) chunks)
behind the channel axes, [batch, K*D, T, (N,) nc], so one Python step advances all chunks of all
channels at once, and converting from/to [batch, K*D, L] is a small per-channel transpose:

1. level 1: a scan inside every chunk from a zero state (T Python steps on [batch, K*D, N, nc]);
2. level 2: a scan over the chunk ends that yields the true state entering each chunk (nc steps on
   [batch, K*D, N], with the whole-chunk decay exp(A * sum(delta)));
3. a fix-up pass that adds the carried state, decayed step by step, to every position.

With T about sqrt(L) both loops take about sqrt(L) Python steps. The backward recomputes the states
and runs the same scheme in reverse time for the adjoint g_t = C_t * dy_t + a_{t+1} * g_{t+1}.
Nothing ever divides by a decay: decays may underflow to zero (very negative A, large delta) and
the result stays finite. The state is float32 whatever the input dtype.

Memory: the forward holds two [batch, K*D, N, L] float32 buffers, the backward three. Between
them the forward keeps the discretised time steps (as large as u) and, for N = 1 only, the states
(as large as u too); for N > 1 the backward recomputes the states, as the CUDA kernels do.
"""

import math
from typing import List, Optional, Tuple

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
    """[b, X, (N,) L] -> fresh contiguous [b, X, T, (N,) nc] (time-in-chunk, chunk index last)."""
    x = _pad_time(x, padded).unflatten(-1, (-1, chunk)).movedim(-1, 2)
    return x.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _from_chunks(x: Tensor, length: int) -> Tensor:
    """[b, X, T, (N,) nc] -> [b, X, (N,) length], always a fresh tensor (never a buffer's view)."""
    x = x.movedim(2, -1).flatten(-2)[..., :length]
    return x.clone(memory_format=torch.contiguous_format)


def _natural(x: Tensor, length: int) -> Tensor:
    """[b, X, T, nc] -> [b, X, nc, T] view when unpadded, else a trimmed [b, X, 1, L] copy."""
    x = x.transpose(-1, -2)  # [b, X, nc, T]
    if x.shape[-1] * x.shape[-2] == length:
        return x
    return x.flatten(-2)[..., :length].unflatten(-1, (1, length))


class _Prepared:
    """fp32 (fp64 for fp64 inputs), padded, chunk-laid-out inputs shared by forward and backward.

    Every [.., L] tensor is held as [b, .., T, (N,) nc]: the per-step slices of the scan loops
    are runs of N*nc contiguous values and all elementwise passes run over contiguous memory.
    """

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus, dt_l=None):
        batch, channels, length = u.shape
        groups, d_state = B.shape[1], A.shape[1]
        self.shape = (batch, channels, length, groups, channels // groups, d_state)
        self.chunk = chunk = _chunk_size(length)
        self.n_chunks = math.ceil(length / chunk)
        self.padded = padded = chunk * self.n_chunks
        self.dtype = dtype = _compute_dtype(u)
        self.A = A.to(dtype)
        self.u_l = _to_chunks(u, chunk, padded, dtype)  # [b, K*D, T, nc]
        if dt_l is None:
            dt_l = _to_chunks(delta, chunk, padded, dtype)
            if delta_bias is not None:
                dt_l.add_(delta_bias.to(dtype)[None, :, None, None])
            if delta_softplus:
                dt_l = _softplus(dt_l)
            # Padded steps must be exact no-ops: dt = 0 gives a = 1 and x = 0.
            dt_l[:, :, length - (self.n_chunks - 1) * chunk :, -1] = 0
        self.dt_l = dt_l  # [b, K*D, T, nc], read-only from here on (it may be a saved tensor)
        self.dtu_l = dt_l * self.u_l
        self.B_l = _to_chunks(B, chunk, padded, dtype).unsqueeze(2)  # [b, K, 1, T, N, nc]
        self.C_l = _to_chunks(C, chunk, padded, dtype).unsqueeze(2)

    def grouped(self, x: Tensor) -> Tensor:
        """[b, K*D, T, N, nc] -> view [b, K, D, T, N, nc] (channel c belongs to group c // D)."""
        _, _, _, groups, per_group, _ = self.shape
        return x.unflatten(1, (groups, per_group))

    def per_group(self, x: Tensor) -> Tensor:
        """[b, K*D, T, nc] -> view [b, K, D, T, 1, nc], broadcastable against B/C layouts."""
        return self.grouped(x.unsqueeze(3))

    def new_state_buffer(self) -> Tensor:
        batch, channels, _, _, _, d_state = self.shape
        shape = (batch, channels, self.chunk, d_state, self.n_chunks)
        return torch.empty(shape, dtype=self.dtype, device=self.u_l.device)

    def decays(self) -> Tensor:
        """a = exp(dt * A) in chunk layout, [b, K*D, T, N, nc]."""
        a = self.new_state_buffer()
        torch.mul(self.dt_l.unsqueeze(3), self.A[None, :, None, :, None], out=a)
        return a.exp_()

    def chunk_decays(self) -> Tensor:
        """Decay over each whole chunk, exp(A * sum_t dt_t), as [nc, b, K*D, N]."""
        dt_sum = self.dt_l.sum(2).movedim(-1, 0)  # [nc, b, K*D]
        return torch.exp(dt_sum.unsqueeze(-1) * self.A)


def _forward_states(prep: _Prepared, a: Tensor) -> Tensor:
    """Runs the two-level scan; returns the states h in chunk layout, [b, K*D, T, N, nc]."""
    h = prep.new_state_buffer()
    torch.mul(prep.per_group(prep.dtu_l), prep.B_l, out=prep.grouped(h))  # x_t
    for t in range(1, prep.chunk):
        h[:, :, t].addcmul_(a[:, :, t], h[:, :, t - 1])
    if prep.n_chunks > 1:
        ends = h[:, :, -1].movedim(-1, 0).contiguous()  # [nc, b, K*D, N] chunk-local end states
        whole = prep.chunk_decays()
        entering = torch.zeros_like(ends)  # true state entering each chunk
        for j in range(prep.n_chunks - 1):
            torch.addcmul(ends[j], whole[j], entering[j], out=entering[j + 1])
        carry = entering.movedim(0, -1).contiguous()  # [b, K*D, N, nc]
        for t in range(prep.chunk):
            carry.mul_(a[:, :, t])
            h[:, :, t].add_(carry)
    return h


def _reverse_adjoint(prep: _Prepared, a: Tensor, g: Tensor) -> Tensor:
    """Turns g = C * dy (chunk layout), in place, into the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}.

    Returns:
        g, [b, K*D, T, N, nc].
    """
    for t in range(prep.chunk - 2, -1, -1):
        g[:, :, t].addcmul_(a[:, :, t + 1], g[:, :, t + 1])
    if prep.n_chunks > 1:
        starts = (a[:, :, 0] * g[:, :, 0]).movedim(-1, 0).contiguous()  # [nc, b, K*D, N]
        whole = prep.chunk_decays()
        # leaving[j] = a_{s} * g_{s} at the first step s of chunk j + 1 (true adjoint).
        leaving = torch.zeros_like(starts)
        for j in range(prep.n_chunks - 2, -1, -1):
            torch.addcmul(starts[j + 1], whole[j + 1], leaving[j + 1], out=leaving[j])
        carry = leaving.movedim(0, -1).contiguous()  # [b, K*D, N, nc]
        g[:, :, -1].add_(carry)
        for t in range(prep.chunk - 2, -1, -1):
            carry.mul_(a[:, :, t + 1])
            g[:, :, t].add_(carry)
    return g


def _sum_states(prep: _Prepared, x: Tensor) -> Tensor:
    """Sums [b, K, D, T, N, nc] over N -> [b, K, D, T, nc] (a view when N == 1)."""
    return x.squeeze(4) if prep.shape[5] == 1 else x.sum(4)


def _forward_block(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tuple[Tensor, List[Tensor]]:
    """Forward of one block of channels (all of them when the problem is small).

    Args:
        u: [batch, K*D, L], fp32/bf16/fp16.
        delta: [batch, K*D, L], same dtype family as u.
        A: [K*D, N] fp32, entries <= 0.
        B, C: [batch, K, N, L].
        D: [K*D] fp32 or None.
        delta_bias: [K*D] fp32 or None.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        (y, saved): y is fp32 [batch, K*D, L] (fp64 for fp64 inputs). saved = [dt] (the time
        steps after bias/softplus in the chunk layout [batch, K*D, T, nc], as large as u), plus
        the states [batch, K*D, T, 1, nc] when N == 1, where they are as small as u too; for
        N > 1 the backward recomputes the states (N times larger) instead of keeping them.
    """
    prep = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus)
    length = prep.shape[2]
    a = prep.decays()
    h = _forward_states(prep, a)
    # y_t = sum_n C_t h_t; the decay buffer is free now and takes the product.
    prod = prep.grouped(a)
    torch.mul(prep.grouped(h), prep.C_l, out=prod)
    y_l = _natural(_sum_states(prep, prod).flatten(1, 2), length)  # [b, K*D, nc, T] view
    y = torch.empty(y_l.shape, dtype=prep.dtype, device=u.device)
    # One pass writes y in the natural layout (and adds the D skip on the way).
    if D is not None:
        torch.addcmul(y_l, u.reshape(y.shape), D.to(prep.dtype)[None, :, None, None], out=y)
    else:
        y.copy_(y_l)
    saved = [prep.dt_l, h] if prep.shape[5] == 1 else [prep.dt_l]
    return y.view(u.shape), saved


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
        (y, saved): empty tensors shaped like ``torch_scan_forward``'s outputs.
    """
    batch, channels, length = u.shape
    chunk = _chunk_size(int(length))  # the chunking depends on L's value: specialise on it
    n_chunks = math.ceil(int(length) / chunk)
    dtype = _compute_dtype(u)
    saved = [u.new_empty((batch, channels, chunk, n_chunks), dtype=dtype)]
    if A.shape[1] == 1:
        saved.append(u.new_empty((batch, channels, chunk, 1, n_chunks), dtype=dtype))
    return u.new_empty(u.shape, dtype=dtype), saved


def _backward_block(
    dy: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    *saved: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Backward of one block of channels; grads in the compute dtype (fp32, or fp64).

    Args:
        dy: gradient of y, [batch, K*D, L] (any float dtype).
        u, delta, A, B, C, D, delta_bias, delta_softplus: the forward's inputs.
        *saved: what ``torch_scan_forward`` returned as saved (dt, and the states when N == 1);
            may be empty, in which case everything is recomputed. Never modified.

    Returns:
        (du, ddelta, dA, dB, dC, dD, ddelta_bias) in the compute dtype: [batch, K*D, L] twice,
        [K*D, N], [batch, K, N, L] twice, then [K*D] (or None when the input was None) twice.
    """
    dt_saved = saved[0] if saved else None
    h_saved = saved[1] if len(saved) > 1 else None
    prep = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus, dt_l=dt_saved)
    length, d_state = prep.shape[2], prep.shape[5]
    dy_l = _to_chunks(dy, prep.chunk, prep.padded, prep.dtype)  # [b, K*D, T, nc]
    dy_g = prep.per_group(dy_l)  # [b, K, D, T, 1, nc]

    a = prep.decays()
    h = _forward_states(prep, a) if h_saved is None else h_saved
    g = prep.new_state_buffer()
    # dC = sum over the group's channels of dy * h (g's buffer is scratch until it holds g).
    torch.mul(prep.grouped(h), dy_g, out=prep.grouped(g))
    dC_l = prep.grouped(g).sum(2)  # [b, K, T, N, nc]
    torch.mul(prep.C_l, dy_g, out=prep.grouped(g))
    _reverse_adjoint(prep, a, g)

    # Gradient w.r.t. the log-decay dt*A: g_t * a_t * h_{t-1}, with h_{t-1} read from the
    # shifted states (no division, no cancellation). Written over a.
    dlog = a.mul_(g)
    dlog[:, :, 1:].mul_(h[:, :, :-1])
    dlog[:, :, 0, :, 1:].mul_(h[:, :, -1, :, :-1])
    dlog[:, :, 0, :, 0].zero_()
    # The recomputed states are no longer needed and become scratch; saved ones stay intact.
    scratch = h if h_saved is None else prep.new_state_buffer()
    torch.mul(dlog, prep.dt_l.unsqueeze(3), out=scratch)
    dA = scratch.sum((0, 2, 4))  # [K*D, N]
    # With softplus, ddt is accumulated negated, which the softplus derivative below undoes
    # for free (-expm1(-dt) = sigmoid(pre)).
    sign = -1.0 if delta_softplus else 1.0
    if d_state == 1:
        ddt_l = dlog.squeeze(3) * (sign * prep.A).view(1, -1, 1, 1)  # [b, K*D, T, nc]
    else:
        torch.mul(dlog, (sign * prep.A)[None, :, None, :, None], out=scratch)
        ddt_l = scratch.sum(3)

    torch.mul(prep.grouped(g), prep.per_group(prep.dtu_l), out=prep.grouped(scratch))
    dB_l = prep.grouped(scratch).sum(2)  # [b, K, T, N, nc]
    torch.mul(prep.grouped(g), prep.B_l, out=prep.grouped(dlog))
    ddtu_l = _sum_states(prep, prep.grouped(dlog)).flatten(1, 2)  # [b, K*D, T, nc]

    # du and ddelta are written straight into the natural layout by their last operation.
    du = torch.empty(_natural(ddtu_l, length).shape, dtype=prep.dtype, device=u.device)
    torch.mul(_natural(ddtu_l, length), _natural(prep.dt_l, length), out=du)
    dD = None
    if D is not None:
        du.addcmul_(_natural(dy_l, length), D.to(prep.dtype)[None, :, None, None])
        dD = (dy_l * prep.u_l).sum((0, 2, 3))
    ddt_l.addcmul_(ddtu_l, prep.u_l, value=sign)
    ddelta = torch.empty_like(du)
    if delta_softplus:
        # d softplus(v)/dv = sigmoid(v) = 1 - exp(-softplus(v)) = -expm1(-dt), exact for tiny dt;
        # above the threshold 20 it rounds to 1 in fp32, as the thresholded derivative is 1.
        neg_sig = torch.expm1(prep.dt_l.neg())
        torch.mul(_natural(ddt_l, length), _natural(neg_sig, length), out=ddelta)
    else:
        ddelta.copy_(_natural(ddt_l, length))
    ddelta_bias = ddelta.sum((0, 2, 3)) if delta_bias is not None else None
    du = du.view(u.shape)
    ddelta = ddelta.view(delta.shape)
    dB = _from_chunks(dB_l, length)
    dC = _from_chunks(dC_l, length)
    return du, ddelta, dA, dB, dC, dD, ddelta_bias


# Elements of one [batch, channels, N, T, nc] state buffer per channel block: the scan's working
# set (three such buffers in the backward) then stays in the CPU's caches, which matters for N > 1.
_BLOCK_ELEMENTS = 1 << 21


def _channel_blocks(u: Tensor, A: Tensor, B: Tensor) -> List[Tuple[int, int, int]]:
    """Splits the channels into (group, first, last) blocks of at most ~_BLOCK_ELEMENTS states."""
    batch, channels, length = u.shape
    groups = B.shape[1]
    per_group = channels // groups
    chunk = _chunk_size(length)
    per_channel = batch * A.shape[1] * chunk * math.ceil(length / chunk)
    if channels * per_channel <= _BLOCK_ELEMENTS:
        return []  # one block: no slicing at all
    size = max(1, min(per_group, _BLOCK_ELEMENTS // per_channel))
    return [
        (k, k * per_group + start, k * per_group + min(start + size, per_group))
        for k in range(groups)
        for start in range(0, per_group, size)
    ]


def _block_args(block, u, delta, A, B, C, D, delta_bias):
    k, first, last = block
    part = slice(first, last)
    return (
        u[:, part], delta[:, part], A[part], B[:, k : k + 1], C[:, k : k + 1],
        None if D is None else D[part], None if delta_bias is None else delta_bias[part],
    )


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

    Large problems are processed in blocks of channels (within one group) so the working set
    stays in cache; each block runs the chunked scan described in the module docstring.

    Args:
        u: [batch, K*D, L], fp32/bf16/fp16 (fp64 is computed in fp64, for gradcheck).
        delta: [batch, K*D, L], u's dtype.
        A: [K*D, N] fp32, entries <= 0.
        B, C: [batch, K, N, L].
        D: [K*D] fp32 or None.
        delta_bias: [K*D] fp32 or None.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        (y, saved): y is fp32 [batch, K*D, L] (fp64 for fp64 inputs). saved = [dt] (the time
        steps after bias/softplus in the chunk layout [batch, K*D, T, nc], as large as u), plus
        the states [batch, K*D, T, 1, nc] when N == 1, where they are as small as u too; for
        N > 1 the backward recomputes the states (N times larger) instead of keeping them.
    """
    blocks = _channel_blocks(u, A, B)
    if not blocks:
        return _forward_block(u, delta, A, B, C, D, delta_bias, delta_softplus)
    y = torch.empty(u.shape, dtype=_compute_dtype(u), device=u.device)
    saved_blocks = []
    for block in blocks:
        y_block, saved = _forward_block(
            *_block_args(block, u, delta, A, B, C, D, delta_bias), delta_softplus
        )
        y[:, block[1] : block[2]] = y_block
        saved_blocks.append(saved)
    return y, [torch.cat(parts, dim=1) for parts in zip(*saved_blocks)]


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
    *saved: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of the selective scan (no autograd), block by block like the forward.

    Args:
        dy: gradient of y, [batch, K*D, L] (any float dtype).
        u, delta, A, B, C, D, delta_bias, delta_softplus: the forward's inputs.
        *saved: what ``torch_scan_forward`` returned as saved (dt, and the states when N == 1);
            may be empty, in which case everything is recomputed. Never modified.

    Returns:
        (du, ddelta, dA, dB, dC, dD, ddelta_bias): du/ddelta in u/delta's dtype [batch, K*D, L],
        dA fp32 [K*D, N], dB/dC in B/C's dtype [batch, K, N, L], dD and ddelta_bias fp32 [K*D]
        or None when the input was None.
    """
    blocks = _channel_blocks(u, A, B)
    if not blocks:
        grads = list(_backward_block(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, *saved))
    else:
        dtype = _compute_dtype(u)
        grads = [
            torch.empty(u.shape, dtype=dtype, device=u.device),
            torch.empty(u.shape, dtype=dtype, device=u.device),
            torch.empty(A.shape, dtype=dtype, device=u.device),
            torch.zeros(B.shape, dtype=dtype, device=u.device),
            torch.zeros(C.shape, dtype=dtype, device=u.device),
            None if D is None else torch.empty(D.shape, dtype=dtype, device=u.device),
            None if delta_bias is None else torch.empty(u.shape[1], dtype=dtype, device=u.device),
        ]
        for block in blocks:
            k, part = block[0], slice(block[1], block[2])
            du, ddelta, dA, dB, dC, dD, ddelta_bias = _backward_block(
                dy[:, part], *_block_args(block, u, delta, A, B, C, D, delta_bias),
                delta_softplus, *(t[:, part] for t in saved),
            )
            grads[0][:, part], grads[1][:, part], grads[2][part] = du, ddelta, dA
            grads[3][:, k : k + 1] += dB  # B and C are shared by the channels of a group
            grads[4][:, k : k + 1] += dC
            if dD is not None:
                grads[5][part] = dD
            if ddelta_bias is not None:
                grads[6][part] = ddelta_bias
    grads[0], grads[1] = grads[0].to(u.dtype), grads[1].to(delta.dtype)
    grads[3], grads[4] = grads[3].to(B.dtype), grads[4].to(C.dtype)
    return tuple(grads)
