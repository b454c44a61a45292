"""Fast pure-PyTorch selective scan: a chunked three-level scan with a hand-written backward.

A one-dimensional state (d_state N = 1, every VMamba v2 model) has its own, leaner module,
``torch_scan_single_state``, to which ``torch_scan_forward``/``torch_scan_backward`` hand it. What
follows describes the path for N > 1 (the vanilla models' N = 16).

The recurrence h_t = a_t * h_{t-1} + x_t (a_t = exp(delta_t * A), x_t = delta_t * B_t * u_t) is
evaluated in chunks of T steps. The time axis [L] is laid out as [T, nc] (nc = ceil(L / T) chunks)
with the time-in-chunk axis first, [T, batch, K*D, nc], so that step t of every chunk of every
channel is one contiguous slice and one Python step advances all chunks at once:

1. level 1: a scan inside every chunk from a zero state, keeping only the running state (T steps);
2. level 2: a scan over the chunk ends that yields the true state entering each chunk (nc steps on
   [batch, K*D, N], with the whole-chunk decay exp(A * sum(delta)));
3. level 3: the scan inside every chunk again, now from the true entering states, which gives the
   true state h_t at every step; y_t = sum_n C_t h_t is reduced on the spot.

Every loop takes about sqrt(L) Python steps, and every operation inside them works on one
step's slice [batch, K*D, N, nc], which stays in the CPU caches. This matters for N = 16, where a
full [batch, K*D, N, L] buffer is 16 times larger than u: the forward materialises one such
buffer (the decays a_t, written by level 1 as it forms them and read back by level 3), the
backward two (the decays and a_t * h_{t-1}); everything else (the inputs dt*B*u, y, the adjoint
and every gradient) is formed and reduced step by step. The buffers are scratch memory reused
from call to call (``scratch.Scratch``): a fresh one would cost a page fault per 4 KiB. The
backward runs level 3 again (which also builds, forwards in time, the chunk-local adjoint
that each chunk passes back to the previous one), then a reverse chunk-level scan, then the
adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} in reverse time from the true values arriving at each
chunk's end. Large problems run in blocks of channels, one after the other, each taking its
scratch memory (``scratch.Scratch``) from what the block before it returned.

Nothing ever divides by a decay: decays may underflow to zero (very negative A, large delta) and
the result stays finite; the backward reads h_{t-1} from the recomputed states. The state is
float32 whatever the input dtype (float64 for float64 inputs, for gradcheck).

Saved for the backward: only the states entering each chunk ([batch, K*D, N, nc], 1/T of a state
buffer), from which the backward recomputes the rest.
"""

import math
from typing import List, Optional, Tuple

import torch

from .scratch import Scratch
from .step_layout import (
    LOG2E,
    chunk_scan,
    chunking,
    compute_dtype,
    from_steps,
    input_grads,
    load_steps,
    store_steps,
)
from .torch_scan_single_state import (
    single_state_backward,
    single_state_forward,
    single_state_saved_shapes,
)

Tensor = torch.Tensor


def _chunking(length: int) -> Tuple[int, int]:
    """(T, nc) for N > 1: T about sqrt(L).

    That measured best: longer chunks make the innermost, contiguous nc axis too short to
    vectorise well, shorter ones add Python steps on the large [b, K, D, N, nc] slices.
    """
    return chunking(length, math.sqrt(length))


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

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus, scratch: Scratch):
        batch, channels, length = u.shape
        groups, d_state = B.shape[1], A.shape[1]
        per_group = channels // groups
        self.shape = (batch, channels, length, groups, per_group, d_state)
        self.chunk, self.n_chunks = chunk, n_chunks = _chunking(length)
        self.dtype = dtype = compute_dtype(u)
        self.state_shape = (batch, groups, per_group, d_state, n_chunks)
        self.A_g = A.to(dtype).reshape(1, groups, per_group, d_state, 1)
        self.A_log2 = self.A_g * LOG2E
        self.scratch = scratch  # every step-layout tensor here is scratch memory

        def steps(x: Tensor) -> Tensor:  # [b, X.., L] -> [T, b, X.., nc]
            return load_steps(x, scratch.take((chunk, *x.shape[:-1], n_chunks), dtype))

        self.u_l = steps(u)  # [T, b, K*D, nc]
        dt_l = steps(delta)
        if delta_bias is not None:
            dt_l.add_(delta_bias.to(dtype)[None, None, :, None])
        if delta_softplus:
            torch.ops.aten.softplus.out(dt_l, 1, 20, out=dt_l)  # in place; threshold 20
        # Padded steps must be exact no-ops: dt = 0 gives a = 1 and x = 0.
        dt_l[length - (n_chunks - 1) * chunk :, :, :, -1] = 0
        self.dt_l = dt_l
        self.dtu_l = torch.mul(dt_l, self.u_l, out=scratch.take(dt_l.shape, dtype))
        self.B_l = steps(B)  # [T, b, K, N, nc]
        self.C_l = steps(C)

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
        """An uninitialised scratch buffer of every step's state slice, [T, b, K, D, N, nc]."""
        return self.scratch.take((self.chunk, *self.state_shape), self.dtype)

    def per_channel_buffer(self) -> Tensor:
        """An uninitialised scratch tensor [T, b, K*D, nc]."""
        return self.scratch.take(self.u_l.shape, self.dtype)

    def decay(self, t: int, out: Tensor) -> Tensor:
        """a_t = exp(dt_t * A) of step t (of every chunk), written into ``out`` [b, K, D, N, nc].

        Evaluated as exp2(dt_t * A log2(e)): exp2 is markedly cheaper than exp on CPUs, and the
        extra rounding of A * log2(e) is far below the scan's tolerances.
        """
        return torch.mul(self.per_channel(self.dt_l)[t], self.A_log2, out=out).exp2_()

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
    # h holds the chunk-local end states; level 3 steps on the result: keep it contiguous.
    return chunk_scan(h.movedim(-1, 0), prep.chunk_decays(), reverse=False).contiguous()


def _level3_forward(prep: _Prepared, entering: Tensor, decays: Tensor, y_l: Tensor) -> None:
    """Level 3 of the forward: the true states from the entering ones, and y, step by step.

    Args:
        prep: the prepared inputs.
        entering: the true state entering each chunk, [b, K, D, N, nc].
        decays: a_t of every step, [T, b, K, D, N, nc] (from level 1).
        y_l: receives y_t = sum_n C_t h_t, [T, b, K*D, nc].
    """
    dtu_g, B_g, C_g = prep.per_channel(prep.dtu_l), prep.per_group(prep.B_l), prep.per_group(
        prep.C_l
    )
    batch, _, _, groups, per_group, _ = prep.shape
    scratch = prep.state()
    h = entering.clone()
    for t in range(prep.chunk):
        h.mul_(decays[t]).addcmul_(dtu_g[t], B_g[t])
        _contract(h, C_g[t], 3, y_l[t].view(batch, groups, per_group, -1), scratch)


def _level3_backward(prep: _Prepared, entering: Tensor, dy_g: Tensor, decays: Tensor,
                     decayed_prev: Tensor, dC_l: Tensor) -> Tensor:
    """Level 3 recomputed in the backward, which also gathers what the adjoint scan needs.

    Args:
        prep: the prepared inputs.
        entering: the true state entering each chunk, [b, K, D, N, nc].
        dy_g: the output gradient, [T, b, K, D, 1, nc].
        decays: [T, b, K, D, N, nc], receives a_t of every step (the adjoint scan reads them).
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
    y: Tensor,
    saved: Tensor,
) -> None:
    """Forward of one block of channels (all of them when the problem is small).

    Args: as ``torch_scan_forward``, plus where the block's results go: ``y`` [b, K*D, L] and
    ``saved``, the states entering each chunk, [b, K*D, N, nc].
    """
    with Scratch(u.device) as scratch:
        prep = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus, scratch)
        decays = prep.states()
        entering = _entering_states(prep, decays)
        y_l = prep.per_channel_buffer()  # [T, b, K*D, nc]
        _level3_forward(prep, entering, decays, y_l)
        if D is not None:
            y_l.addcmul_(prep.u_l, D.to(prep.dtype)[None, None, :, None])
        store_steps(y_l, y)
        saved.copy_(entering.flatten(1, 2))


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
    dtype = compute_dtype(u)
    # The chunking depends on L's value: specialise on it.
    if d_state == 1:
        shapes = single_state_saved_shapes(u)
    else:
        n_chunks = _chunking(int(length))[1]
        shapes = [(batch, channels, d_state, n_chunks)]
    return u.new_empty(u.shape, dtype=dtype), [u.new_empty(s, dtype=dtype) for s in shapes]


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
    du: Tensor,
    ddelta: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Backward of one block of channels (all of them when the problem is small).

    Args:
        dy: gradient of y, [batch, K*D, L] (any float dtype).
        u, delta, A, B, C, D, delta_bias, delta_softplus: the forward's inputs.
        *saved: what ``torch_scan_forward`` returned as saved; may be empty, in which case
            everything is recomputed. Never modified.
        du, ddelta: receive those gradients, [batch, K*D, L] (any float dtype).

    Returns:
        (dA, dB, dC, dD, ddelta_bias) in the compute dtype: [K*D, N], [batch, K, N, L] twice,
        then [K*D] (or None when the input was None) twice.
    """
    with Scratch(u.device) as scratch:
        prep = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus, scratch)
        length, chunk, d_state = prep.shape[2], prep.chunk, prep.shape[5]
        dy_l = load_steps(dy, prep.per_channel_buffer())  # [T, b, K*D, nc]
        dy_g = prep.per_channel(dy_l)
        dtu_g, B_g, C_g = prep.per_channel(prep.dtu_l), prep.per_group(prep.B_l), prep.per_group(
            prep.C_l
        )
        dt_g = prep.per_channel(prep.dt_l)

        # Two full buffers: the decays a_t and the decayed previous states a_t h_{t-1}.
        decays, decayed_prev = prep.states(), prep.states()
        group_shape = (chunk, *prep.state_shape[:2], d_state, prep.n_chunks)  # [T, b, K, N, nc]
        dC_l = scratch.take(group_shape, prep.dtype)
        if saved:
            entering = saved[0].view(prep.state_shape)
        else:
            entering = _entering_states(prep, decays)
        starts = _level3_backward(prep, entering, dy_g, decays, decayed_prev, dC_l)

        # The adjoint, step by step in reverse, with every gradient reduced on the spot.
        # The adjoint arriving at each chunk's last step from the later chunks: a_s g_s at the
        # first step s of the next chunk, zero for the last chunk.
        g = chunk_scan(starts.movedim(-1, 0), prep.chunk_decays(), reverse=True).contiguous()
        dB_l = scratch.take(group_shape, prep.dtype)
        ddtu_l, ddt_l = prep.per_channel_buffer(), prep.per_channel_buffer()
        dA_acc = torch.zeros(prep.state_shape, dtype=prep.dtype, device=u.device)
        product, dlog = prep.state(), prep.state()
        for t in range(chunk - 1, -1, -1):
            if t < chunk - 1:
                g.mul_(decays[t + 1])
            g.addcmul_(C_g[t], dy_g[t])
            _contract(g, dtu_g[t], 2, dB_l[t], product)
            _contract(g, B_g[t], 3, prep.per_channel(ddtu_l)[t].squeeze(3), product)
            # d/d(dt*A) of the loss: g_t * a_t * h_{t-1}.
            torch.mul(g, decayed_prev[t], out=dlog)
            dA_acc.addcmul_(dlog, dt_g[t])
            _contract(dlog, prep.A_g, 3, prep.per_channel(ddt_l)[t].squeeze(3), product)
        dA = dA_acc.sum((0, 4)).flatten(0, 1)  # [K*D, N]

        # Every gradient is formed in the step layout (contiguous passes) and changes layout
        # once; dt*u is no longer needed, its buffer is the spare one.
        dD, ddelta_bias = input_grads(
            ddtu_l, ddt_l, prep.u_l, prep.dt_l, dy_l, prep.dtu_l, D, delta_softplus,
            delta_bias is not None, du, ddelta,
        )
        dB = from_steps(dB_l, length, prep.dtype)
        dC = from_steps(dC_l, length, prep.dtype)
    return dA, dB, dC, dD, ddelta_bias


# States of one [batch, channels, N, L] buffer per channel block. The loops' per-step slices stay
# small whatever the block; blocks bound the full-size scratch buffers (128 MB each in fp32),
# which the blocks of one call reuse. 2^25 (one block per group at the vanilla VMamba-T stage-1
# shape) measured faster than 2^21 to 2^23 and than 2^26 (a single block there).
_BLOCK_ELEMENTS = 1 << 25


def _channel_blocks(u: Tensor, A: Tensor, B: Tensor) -> List[Tuple[int, int, int]]:
    """Splits the channels into (group, first, last) blocks of at most ~_BLOCK_ELEMENTS states."""
    batch, channels, length = u.shape
    groups = B.shape[1]
    per_group = channels // groups
    chunk, n_chunks = _chunking(length)
    per_channel = batch * A.shape[1] * chunk * n_chunks
    if channels * per_channel <= _BLOCK_ELEMENTS:
        return []  # one block: no slicing at all
    size = max(1, min(per_group, _BLOCK_ELEMENTS // per_channel))
    size = math.ceil(per_group / math.ceil(per_group / size))  # equal blocks, same count
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

    N = 1 runs ``single_state_forward``. For N > 1, large problems are processed in blocks of
    channels (within one group); each block runs the chunked scan described in the module
    docstring.

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
        dtype: for N = 1 u, the time steps after bias/softplus and the states, in the step
        layout [T, batch, K*D, nc] (each as large as u); for N > 1 the states entering each
        chunk, [batch, K*D, N, nc] (the backward recomputes the others from them).
    """
    if A.shape[1] == 1:
        return single_state_forward(u, delta, A, B, C, D, delta_bias, delta_softplus)
    dtype = compute_dtype(u)
    y = torch.empty(u.shape, dtype=dtype, device=u.device)
    n_chunks = _chunking(u.shape[2])[1]
    saved = torch.empty((*u.shape[:2], A.shape[1], n_chunks), dtype=dtype, device=u.device)
    blocks = _channel_blocks(u, A, B)
    if not blocks:
        _forward_block(u, delta, A, B, C, D, delta_bias, delta_softplus, y, saved)
    for block in blocks:
        part = slice(block[1], block[2])
        _forward_block(*_block_args(block, u, delta, A, B, C, D, delta_bias), delta_softplus,
                       y[:, part], saved[:, part])
    return y, [saved]


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
    if A.shape[1] == 1:
        return single_state_backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, *saved)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
    blocks = _channel_blocks(u, A, B)
    if not blocks:
        dA, dB, dC, dD, ddelta_bias = _backward_block(
            dy, u, delta, A, B, C, D, delta_bias, delta_softplus, *saved, du=du, ddelta=ddelta
        )
    else:
        dtype = compute_dtype(u)
        dA = torch.empty(A.shape, dtype=dtype, device=u.device)
        dB = torch.zeros(B.shape, dtype=dtype, device=u.device)
        dC = torch.zeros(C.shape, dtype=dtype, device=u.device)
        dD = None if D is None else torch.empty(D.shape, dtype=dtype, device=u.device)
        ddelta_bias = None if delta_bias is None else torch.empty(
            u.shape[1], dtype=dtype, device=u.device
        )
        for block in blocks:
            k, part = block[0], slice(block[1], block[2])
            dA[part], dB_part, dC_part, dD_part, ddelta_bias_part = _backward_block(
                dy[:, part], *_block_args(block, u, delta, A, B, C, D, delta_bias),
                delta_softplus, *(t[:, part] for t in saved), du=du[:, part],
                ddelta=ddelta[:, part],
            )
            dB[:, k : k + 1] += dB_part  # B and C are shared by the channels of a group
            dC[:, k : k + 1] += dC_part
            if dD is not None:
                dD[part] = dD_part
            if ddelta_bias is not None:
                ddelta_bias[part] = ddelta_bias_part
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, ddelta_bias
