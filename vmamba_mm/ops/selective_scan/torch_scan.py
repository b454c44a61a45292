"""Fast pure-PyTorch selective scan: a chunked two-level scan with a hand-written backward.

The recurrence h_t = a_t * h_{t-1} + x_t (a_t = exp(delta_t * A), x_t = delta_t * B_t * u_t) is
evaluated in chunks of T steps. The time axis [L] is laid out as [T, nc] (nc = ceil(L / T) chunks)
with the time-in-chunk axis first, [T, batch, K*D, nc], so that step t of every chunk of every
channel is one contiguous slice and one Python step advances all chunks at once:

1. level 1: a scan inside every chunk from a zero state, keeping only the running state (T steps);
2. level 2: a scan over the chunk ends that yields the true state entering each chunk (nc steps on
   [batch, K*D, N], with the whole-chunk decay exp(A * sum(delta)));
3. level 3: the scan inside every chunk again, now from the true entering states, which gives the
   true state h_t at every step; y_t = sum_n C_t h_t is reduced on the spot.

With T about sqrt(L) every loop takes about sqrt(L) Python steps, and every operation inside them
works on one step's slice [batch, K*D, N, nc], which stays in the CPU caches. This matters for
N = 16, where a full [batch, K*D, N, L] buffer is 16 times larger than u: the forward never
materialises one (the decays and inputs exp(dt*A), dt*B*u are recomputed per step, which is
cheaper than streaming them through memory), and the backward materialises exactly one, the
recomputed states. The backward runs the same three levels in reverse time for the adjoint
g_t = C_t dy_t + a_{t+1} g_{t+1} and reduces every gradient step by step.

Nothing ever divides by a decay: decays may underflow to zero (very negative A, large delta) and
the result stays finite; the backward reads h_{t-1} from the recomputed states. The state is
float32 whatever the input dtype (float64 for float64 inputs, for gradcheck).

Saved for the backward: for N = 1 the time steps dt and the states (each as large as u); for
N > 1 only the states entering each chunk ([batch, K*D, N, nc], 1/T of a state buffer).
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _chunk_size(length: int, d_state: int) -> int:
    """Steps per chunk T.

    About sqrt(L) balances the Python steps of the levels (T steps each) against the chunk-level
    scan (nc = L / T steps). For N > 1 longer chunks (fewer of them) make each step's slice
    [batch, K*D, N, nc] smaller, so the per-step working set stays in the caches; the chunk-level
    scan works on small [batch, K*D, N] tensors and its extra steps are cheap.
    """
    factor = 1.0
    return max(1, min(length, math.ceil(factor * math.sqrt(length))))


def _compute_dtype(u: Tensor) -> torch.dtype:
    """float32 for fp32/bf16/fp16 inputs; float64 inputs (gradcheck) stay in float64."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _to_steps(x: Tensor, chunk: int, padded: int, dtype: torch.dtype) -> Tensor:
    """[b, X.., L] -> fresh contiguous [T, b, X.., nc] (zero-padded to T * nc steps)."""
    extra = padded - x.shape[-1]
    if extra:
        x = F.pad(x, (0, extra))
    x = x.unflatten(-1, (-1, chunk)).movedim(-1, 0)
    return x.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _natural(x: Tensor, length: int) -> Tensor:
    """[T, b, X, nc] -> [b, X, nc, T] view when unpadded, else a trimmed [b, X, 1, L] copy."""
    x = x.permute(1, 2, 3, 0)
    if x.shape[-1] * x.shape[-2] == length:
        return x
    return x.flatten(-2)[..., :length].unflatten(-1, (1, length))


def _from_steps(x: Tensor, length: int) -> Tensor:
    """[T, b, X.., nc] -> fresh contiguous [b, X.., length]."""
    x = x.movedim(0, -1).flatten(-2)[..., :length]
    return x.clone(memory_format=torch.contiguous_format)


def _contract(x: Tensor, y: Tensor, dim: int, out: Tensor, scratch: Tensor) -> None:
    """out = sum over ``dim`` of x * y (broadcast); a single multiply when that axis has size 1."""
    if scratch.shape[dim] == 1:
        torch.mul(x, y, out=out.unsqueeze(dim))
    else:
        torch.mul(x, y, out=scratch)
        torch.sum(scratch, dim, out=out)


class _Prepared:
    """Inputs in the compute dtype and the step layout, shared by the forward and the backward.

    Per-channel tensors are [T, b, K*D, nc] and are read per step through [T, b, K, D, 1, nc]
    views; B and C are [T, b, K, N, nc], read through [T, b, K, 1, N, nc] views, so that every
    product broadcasts over the group's channels without copying B and C per channel. A state
    slice is [b, K, D, N, nc].
    """

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus, dt_l=None):
        batch, channels, length = u.shape
        groups, d_state = B.shape[1], A.shape[1]
        per_group = channels // groups
        self.shape = (batch, channels, length, groups, per_group, d_state)
        self.chunk = chunk = _chunk_size(length, d_state)
        self.n_chunks = n_chunks = math.ceil(length / chunk)
        self.padded = padded = chunk * n_chunks
        self.dtype = dtype = _compute_dtype(u)
        self.state_shape = (batch, groups, per_group, d_state, n_chunks)
        self.A_g = A.to(dtype).view(1, groups, per_group, d_state, 1)
        self.A_log2 = self.A_g * (1.0 / math.log(2.0))  # exp(x) = exp2(x / log(2))
        self.u_l = _to_steps(u, chunk, padded, dtype)  # [T, b, K*D, nc]
        if dt_l is None:
            dt_l = _to_steps(delta, chunk, padded, dtype)
            if delta_bias is not None:
                dt_l.add_(delta_bias.to(dtype)[None, None, :, None])
            if delta_softplus:
                dt_l = F.softplus(dt_l)  # threshold 20, as the kernels
            # Padded steps must be exact no-ops: dt = 0 gives a = 1 and x = 0.
            dt_l[length - (n_chunks - 1) * chunk :, :, :, -1] = 0
        self.dt_l = dt_l  # read-only from here on (it may be a saved tensor)
        self.dtu_l = dt_l * self.u_l
        self.B_l = _to_steps(B, chunk, padded, dtype)  # [T, b, K, N, nc]
        self.C_l = _to_steps(C, chunk, padded, dtype)

    def per_channel(self, x: Tensor) -> Tensor:
        """[T, b, K*D, nc] -> view [T, b, K, D, 1, nc]."""
        batch, _, _, groups, per_group, _ = self.shape
        return x.view(x.shape[0], batch, groups, per_group, 1, x.shape[-1])

    def per_group(self, x: Tensor) -> Tensor:
        """[T, b, K, N, nc] -> view [T, b, K, 1, N, nc]."""
        return x.unsqueeze(3)

    def state(self) -> Tensor:
        """An uninitialised state slice [b, K, D, N, nc]."""
        return torch.empty(self.state_shape, dtype=self.dtype, device=self.u_l.device)

    def states(self) -> Tensor:
        """An uninitialised buffer of every step's state slice, [T, b, K, D, N, nc]."""
        shape = (self.chunk, *self.state_shape)
        return torch.empty(shape, dtype=self.dtype, device=self.u_l.device)

    def decay(self, t: int, out: Tensor) -> Tensor:
        """a_t = exp(dt_t * A) for step t of every chunk, written into ``out`` [b, K, D, N, nc].

        Evaluated as exp2(dt_t * A log2(e)): exp2 is markedly cheaper than exp on CPUs, and the
        extra rounding of A * log2(e) is far below the scan's tolerances.
        """
        torch.mul(self.per_channel(self.dt_l)[t], self.A_log2, out=out)
        return out.exp2_()

    def chunk_decays(self) -> Tensor:
        """Decay over each whole chunk, exp(A * sum_t dt_t), as [nc, b, K, D, N]."""
        dt_sum = self.per_channel(self.dt_l).sum(0)  # [b, K, D, 1, nc]
        return torch.exp2(dt_sum * self.A_log2).movedim(-1, 0).contiguous()


def _entering_states(prep: _Prepared, decays: Tensor) -> Tensor:
    """Levels 1 and 2: the true state entering each chunk.

    Args:
        prep: the prepared inputs.
        decays: [T, b, K, D, N, nc], receives a_t of every step (level 3 reads them back).

    Returns:
        [b, K, D, N, nc], zero for the first chunk.
    """
    dtu_g, B_g = prep.per_channel(prep.dtu_l), prep.per_group(prep.B_l)
    h = prep.state()
    torch.mul(dtu_g[0], B_g[0], out=h)
    prep.decay(0, decays[0])
    for t in range(1, prep.chunk):
        h.mul_(prep.decay(t, decays[t])).addcmul_(dtu_g[t], B_g[t])
    ends = h.movedim(-1, 0).contiguous()  # [nc, b, K, D, N] chunk-local end states
    whole = prep.chunk_decays()
    entering = torch.empty_like(ends)
    entering[0].zero_()
    for j in range(prep.n_chunks - 1):
        torch.addcmul(ends[j], whole[j], entering[j], out=entering[j + 1])
    return entering.movedim(0, -1).contiguous()


def _level3_forward(prep: _Prepared, entering: Tensor, decays: Tensor, states: Optional[Tensor],
                    y_l: Tensor) -> None:
    """Level 3 of the forward: the true states from the entering ones, and y, step by step.

    Args:
        prep: the prepared inputs.
        entering: the true state entering each chunk, [b, K, D, N, nc].
        decays: a_t of every step, [T, b, K, D, N, nc] (from level 1).
        states: when given, receives the state of every step, [T, b, K, D, N, nc].
        y_l: receives y_t = sum_n C_t h_t, [T, b, K*D, nc].
    """
    dtu_g, B_g, C_g = prep.per_channel(prep.dtu_l), prep.per_group(prep.B_l), prep.per_group(
        prep.C_l
    )
    batch, _, _, groups, per_group, _ = prep.shape
    scratch = prep.state()
    h = entering.clone() if states is None else entering
    for t in range(prep.chunk):
        if states is None:
            h.mul_(decays[t])
        else:
            h = torch.mul(decays[t], h, out=states[t])
        h.addcmul_(dtu_g[t], B_g[t])
        _contract(h, C_g[t], 3, y_l[t].view(batch, groups, per_group, -1), scratch)


def _level3_backward(prep: _Prepared, entering: Tensor, dy_g: Tensor, decays: Tensor,
                     decayed_prev: Tensor, dC_l: Tensor) -> Tensor:
    """Level 3 recomputed in the backward, which also gathers what the adjoint scan needs.

    Args:
        prep: the prepared inputs.
        entering: the true state entering each chunk, [b, K, D, N, nc].
        dy_g: the output gradient, [T, b, K, D, 1, nc].
        decays: [T, b, K, D, N, nc], receives a_t of every step.
        decayed_prev: [T, b, K, D, N, nc], receives a_t h_{t-1} of every step (what the
            gradient of the log-decay needs, so that nothing is ever divided by a decay).
        dC_l: receives dC_t = sum_d dy_t h_t, [T, b, K, N, nc].

    Returns:
        [b, K, D, N, nc]: a_0 times each chunk's local adjoint at its first step,
        sum_t (a_0 ... a_t) C_t dy_t, which is what the chunk passes back to the previous one.
        It is the sum the reverse scan from zero would build, formed forwards here with a running
        product of the decays, so it needs no pass of its own.
    """
    dtu_g, B_g, C_g = prep.per_channel(prep.dtu_l), prep.per_group(prep.B_l), prep.per_group(
        prep.C_l
    )
    h, scratch, local, cumulative = prep.state(), prep.state(), prep.state(), prep.state()
    prev = entering
    for t in range(prep.chunk):
        a_t = prep.decay(t, decays[t])
        torch.mul(a_t, prev, out=decayed_prev[t])
        torch.addcmul(decayed_prev[t], dtu_g[t], B_g[t], out=h)
        _contract(h, dy_g[t], 2, dC_l[t], scratch)
        if t == 0:
            torch.mul(C_g[0], dy_g[0], out=local).mul_(a_t)
            cumulative.copy_(a_t)
        else:
            cumulative.mul_(a_t)
            local.addcmul_(cumulative, torch.mul(C_g[t], dy_g[t], out=scratch))
        prev = h
    return local


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

    Args and Returns: as ``torch_scan_forward``.
    """
    prep = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus)
    length, d_state = prep.shape[2], prep.shape[5]
    decays = prep.states()
    entering = _entering_states(prep, decays)
    y_l = torch.empty(prep.u_l.shape, dtype=prep.dtype, device=u.device)  # [T, b, K*D, nc]
    # For N = 1 the states are as small as u: keep them, the backward then skips a level.
    states = prep.states() if d_state == 1 else None
    _level3_forward(prep, entering, decays, states, y_l)
    del decays
    y_nat = _natural(y_l, length)
    y = torch.empty(y_nat.shape, dtype=prep.dtype, device=u.device)
    # One pass writes y in the natural layout (and adds the D skip on the way).
    if D is not None:
        torch.addcmul(y_nat, u.reshape(y.shape), D.to(prep.dtype)[None, :, None, None], out=y)
    else:
        y.copy_(y_nat)
    if d_state == 1:
        saved = [prep.dt_l, states.view(prep.u_l.shape)]
    else:
        saved = [entering.flatten(1, 2)]  # [b, K*D, N, nc]
    return y.view(u.shape), saved


def _saved_channel_dim(d_state: int) -> int:
    """The channel axis of the saved tensors: [T, b, K*D, nc] (N = 1), [b, K*D, N, nc] (N > 1)."""
    return 2 if d_state == 1 else 1


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
    d_state = A.shape[1]
    # The chunking depends on L's value: specialise on it.
    chunk = _chunk_size(int(length), int(d_state))
    n_chunks = math.ceil(int(length) / chunk)
    dtype = _compute_dtype(u)
    if d_state == 1:
        saved = [u.new_empty((chunk, batch, channels, n_chunks), dtype=dtype) for _ in range(2)]
    else:
        saved = [u.new_empty((batch, channels, d_state, n_chunks), dtype=dtype)]
    return u.new_empty(u.shape, dtype=dtype), saved


def _local_adjoint_starts(prep: _Prepared, dy_g: Tensor, decays: Tensor) -> Tensor:
    """Reverse level 1 (used when the states were saved): a_0 times each chunk's local adjoint.

    Args:
        prep: the prepared inputs.
        dy_g: the output gradient, [T, b, K, D, 1, nc].
        decays: [T, b, K, D, N, nc], receives a_t of every step.

    Returns:
        [b, K, D, N, nc]: a_0 g_0 of the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} run backwards
        through each chunk from zero (what the chunk passes back to the previous one).
    """
    C_g = prep.per_group(prep.C_l)
    g = prep.state()
    last = prep.chunk - 1
    torch.mul(C_g[last], dy_g[last], out=g)
    prep.decay(last, decays[last])
    for t in range(last - 1, -1, -1):
        g.mul_(decays[t + 1]).addcmul_(C_g[t], dy_g[t])
        prep.decay(t, decays[t])
    return g.mul_(decays[0])


def _adjoint_leaving(prep: _Prepared, starts: Tensor) -> Tensor:
    """Reverse level 2: the adjoint arriving at each chunk's last step from the later chunks.

    Args:
        starts: a_0 times each chunk's local adjoint at its first step, [b, K, D, N, nc].

    Returns:
        [b, K, D, N, nc]: a_s g_s (true adjoint) at the first step s of the next chunk, zero for
        the last chunk.
    """
    starts = starts.movedim(-1, 0).contiguous()  # [nc, b, K, D, N]
    whole = prep.chunk_decays()
    leaving = torch.empty_like(starts)
    leaving[-1].zero_()
    for j in range(prep.n_chunks - 2, -1, -1):
        torch.addcmul(starts[j + 1], whole[j + 1], leaving[j + 1], out=leaving[j])
    return leaving.movedim(0, -1).contiguous()


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
        *saved: what ``torch_scan_forward`` returned as saved; may be empty, in which case
            everything is recomputed. Never modified.

    Returns:
        (du, ddelta, dA, dB, dC, dD, ddelta_bias) in the compute dtype: [batch, K*D, L] twice,
        [K*D, N], [batch, K, N, L] twice, then [K*D] (or None when the input was None) twice.
    """
    d_state = A.shape[1]
    dt_saved = saved[0] if saved and d_state == 1 else None
    prep = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus, dt_l=dt_saved)
    length, chunk = prep.shape[2], prep.chunk
    device = u.device
    dy_l = _to_steps(dy, chunk, prep.padded, prep.dtype)  # [T, b, K*D, nc]
    dy_g = prep.per_channel(dy_l)
    dtu_g, B_g, C_g = prep.per_channel(prep.dtu_l), prep.per_group(prep.B_l), prep.per_group(
        prep.C_l
    )
    dt_g = prep.per_channel(prep.dt_l)

    # Two full buffers: the decays a_t and the decayed previous states a_t h_{t-1}.
    decays, decayed_prev = prep.states(), prep.states()
    group_shape = (chunk, *prep.state_shape[:2], d_state, prep.n_chunks)  # [T, b, K, N, nc]
    dC_l = torch.empty(group_shape, dtype=prep.dtype, device=device)
    if d_state == 1 and saved:
        states = saved[1].view(decays.shape)
        torch.sum(states * dy_g, 3, out=dC_l)
        starts = _local_adjoint_starts(prep, dy_g, decays)
        torch.mul(decays[1:], states[:-1], out=decayed_prev[1:])
        decayed_prev[0, ..., 0].zero_()  # nothing enters the first chunk
        torch.mul(decays[0, ..., 1:], states[-1, ..., :-1], out=decayed_prev[0, ..., 1:])
    else:
        if saved:
            entering = saved[0].view(prep.state_shape)
        else:
            entering = _entering_states(prep, decays)
        starts = _level3_backward(prep, entering, dy_g, decays, decayed_prev, dC_l)

    # The adjoint, step by step in reverse, with every gradient reduced on the spot.
    g = _adjoint_leaving(prep, starts)
    dB_l = torch.empty_like(dC_l)
    ddtu_l = torch.empty_like(dy_l)  # [T, b, K*D, nc]
    ddt_l = torch.empty_like(dy_l)
    dA_acc = torch.zeros(prep.state_shape, dtype=prep.dtype, device=device)
    # With softplus, ddt is accumulated negated, which the softplus derivative below undoes
    # for free (-expm1(-dt) = sigmoid(pre)).
    sign = -1.0 if delta_softplus else 1.0
    A_signed = prep.A_g * sign
    scratch, dlog = prep.state(), prep.state()
    for t in range(chunk - 1, -1, -1):
        if t < chunk - 1:
            g.mul_(decays[t + 1])
        g.addcmul_(C_g[t], dy_g[t])
        _contract(g, dtu_g[t], 2, dB_l[t], scratch)
        _contract(g, B_g[t], 3, prep.per_channel(ddtu_l)[t].squeeze(3), scratch)
        # d/d(dt*A) of the loss: g_t * a_t * h_{t-1}.
        torch.mul(g, decayed_prev[t], out=dlog)
        dA_acc.addcmul_(dlog, dt_g[t])
        _contract(dlog, A_signed, 3, prep.per_channel(ddt_l)[t].squeeze(3), scratch)
    del decays, decayed_prev
    dA = dA_acc.sum((0, 4)).flatten(0, 1)  # [K*D, N]

    # du and ddelta are written straight into the natural layout by their last operation.
    du = torch.empty(_natural(ddtu_l, length).shape, dtype=prep.dtype, device=device)
    torch.mul(_natural(ddtu_l, length), _natural(prep.dt_l, length), out=du)
    dD = None
    if D is not None:
        du.addcmul_(_natural(dy_l, length), D.to(prep.dtype)[None, :, None, None])
        dD = (dy_l * prep.u_l).sum((0, 1, 3))
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
    dB = _from_steps(dB_l, length)
    dC = _from_steps(dC_l, length)
    return du, ddelta, dA, dB, dC, dD, ddelta_bias


# States of one [batch, channels, N, L] buffer per channel block. The loops' per-step slices stay
# small whatever the block; blocks bound the backward's one full state buffer (memory) and let
# that buffer stay in the last-level cache for mid-sized problems.
_BLOCK_ELEMENTS = 1 << 25


def _channel_blocks(u: Tensor, A: Tensor, B: Tensor) -> List[Tuple[int, int, int]]:
    """Splits the channels into (group, first, last) blocks of at most ~_BLOCK_ELEMENTS states."""
    batch, channels, length = u.shape
    groups = B.shape[1]
    per_group = channels // groups
    chunk = _chunk_size(length, A.shape[1])
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

    Large problems are processed in blocks of channels (within one group); each block runs the
    chunked scan described in the module docstring.

    Args:
        u: [batch, K*D, L], fp32/bf16/fp16 (fp64 is computed in fp64, for gradcheck).
        delta: [batch, K*D, L], u's dtype.
        A: [K*D, N] fp32, entries <= 0.
        B, C: [batch, K, N, L].
        D: [K*D] fp32 or None.
        delta_bias: [K*D] fp32 or None.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        (y, saved): y is fp32 [batch, K*D, L] (fp64 for fp64 inputs). saved, in the compute
        dtype: for N = 1 the time steps after bias/softplus and the states, both in the step
        layout [T, batch, K*D, nc] (each as large as u); for N > 1 the states entering each
        chunk, [batch, K*D, N, nc] (the backward recomputes the others from them).
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
    dim = _saved_channel_dim(A.shape[1])
    return y, [torch.cat(parts, dim=dim) for parts in zip(*saved_blocks)]


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
        *saved: what ``torch_scan_forward`` returned as saved; may be empty, in which case
            everything is recomputed. Never modified.

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
        dim = _saved_channel_dim(A.shape[1])
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
                delta_softplus, *(t.narrow(dim, block[1], block[2] - block[1]) for t in saved),
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
