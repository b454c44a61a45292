"""Pure-PyTorch selective scan for a one-dimensional state (d_state N = 1, every VMamba v2 model).

With N = 1 the state h_t = a_t h_{t-1} + x_t (a_t = exp(dt_t A), x_t = dt_t B_t u_t) has u's size,
so every step's state can simply be kept. The time axis [L] is cut into nc chunks of T steps
(T about 1.2 L^(1/3)) and laid out time-in-chunk first, [T, b, K*D, nc]: step t of every chunk of
every channel is one contiguous slice, and one Python step advances all chunks at once.

Forward, with x_t formed for all steps in two whole-tensor passes:

1. level 1: a running state through every chunk from zero, which leaves each chunk's local end
   state (T steps of one ``addcmul`` each);
2. level 2: the scan over the chunk ends, with the whole-chunk decays exp(A sum_t dt_t), gives the
   true state entering each chunk (nc small steps);
3. level 3: the recurrence again, in place on x, starting from the entering states: x becomes the
   true state of every step (T steps of one ``addcmul_`` each). y = C h + D u is then a
   whole-tensor pass.

The backward runs the same three levels in reverse time for the adjoint
g_t = C_t dy_t + a_{t+1} g_{t+1}, in place on C dy, and forms every gradient in whole-tensor
passes: d(dt A) = g_t a_t h_{t-1} (a_t times the kept previous state: nothing is ever divided by
a decay, so decays that underflow to zero are harmless), dB and dC as sums over the D channels of
a group, and softplus' derivative from the kept time steps.

Saved for the backward, in the step layout and the compute dtype: the time steps dt (after bias
and softplus) and the states, two tensors as large as u. The layout changes at the edges
are the copies of ``step_layout``.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .scratch import Scratch
from .step_layout import (
    LOG2E,
    chunk_scan,
    chunking,
    compute_dtype,
    from_steps,
    input_grads,
    load_steps,
    staging,
    store_staged,
    to_steps,
)

Tensor = torch.Tensor

def single_state_chunking(length: int) -> Tuple[int, int]:
    """(T, nc) for N = 1: T about 1.2 L^(1/3).

    The loops over a chunk's steps cost T Python steps on [b, K*D, nc] slices, the chunk-level
    scans nc cheap ones; shorter chunks make the slices larger and split better across threads.
    Measured at VMamba-T's shapes (2 threads): T = 7 at L = 196, 14 to 16 at 784 and 3136
    (5 to 18% faster than T = 56 at 3136), 32 at 16384.
    """
    return chunking(length, 1.2 * length ** (1 / 3))


class _Steps:
    """The inputs in the step layout and the compute dtype, shared by the forward and backward.

    Per-channel tensors are [T, b, K*D, nc], read per group through [T, b, K, D, nc] views;
    B and C are [T, b, K, 1, nc], broadcast over the D channels of their group.
    """

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus, scratch, saved=()):
        batch, channels, length = u.shape
        groups = B.shape[1]
        self.length = length
        self.group_shape = (batch, groups, channels // groups)
        self.chunk, self.n_chunks = chunk, n_chunks = single_state_chunking(length)
        self.dtype = dtype = compute_dtype(u)
        self.device = u.device
        self.shape = (chunk, batch, channels, n_chunks)
        self.A = A.to(dtype).view(channels, 1)
        self.A_log2 = self.A * LOG2E
        self.B_l = self.load(B.squeeze(2)).unsqueeze(3)  # [T, b, K, 1, nc]
        self.C_l = self.load(C.squeeze(2)).unsqueeze(3)
        # u in the step layout is not kept for the backward, which copies it again: a copy
        # into reused scratch memory costs less than the page faults of a fresh tensor.
        self.u_l = load_steps(u, scratch.take(self.shape, dtype))
        if saved:
            self.dt_l, self.h_l = saved
            return
        # Before softplus, dt is only an intermediate: scratch memory will do.
        dt_l = load_steps(delta, scratch.take(self.shape, dtype)) if delta_softplus else self.load(
            delta
        )
        if delta_bias is not None:
            dt_l.add_(delta_bias.to(dtype).view(channels, 1))
        if delta_softplus:
            dt_l = F.softplus(dt_l)  # threshold 20, as the kernels
        rest = length - (n_chunks - 1) * chunk
        dt_l[rest:, ..., -1] = 0  # padded steps must be no-ops: a = 1, x = 0
        self.dt_l = dt_l
        self.h_l = None  # the states, once the forward has run

    def load(self, x: Tensor) -> Tensor:
        """A fresh [T, *lead, nc] step-layout copy of x [*lead, L] in the compute dtype."""
        return to_steps(x, self.chunk, self.n_chunks, self.dtype)

    def per_group(self, x: Tensor) -> Tensor:
        """[T, b, K*D, nc] -> view [T, b, K, D, nc]."""
        return x.view(self.chunk, *self.group_shape, self.n_chunks)

    def decays(self, out: Tensor) -> Tensor:
        """a_t = exp(dt_t A) of every step, written into ``out`` [T, b, K*D, nc]."""
        return torch.mul(self.dt_l, self.A_log2, out=out).exp2_()

    def chunk_decays(self) -> Tensor:
        """exp(A sum_t dt_t), the decay over each whole chunk, as [nc, b, K*D]."""
        return torch.exp2(self.dt_l.sum(0).mul_(self.A_log2)).movedim(-1, 0).contiguous()


def _states(steps: _Steps, a: Tensor, x: Tensor) -> None:
    """Turns x (the inputs dt B u, [T, b, K*D, nc]) into the states h, in place.

    Args:
        steps: the prepared inputs.
        a: the decays of every step, [T, b, K*D, nc].
        x: dt_t B_t u_t of every step; receives h_t.
    """
    h = x[0].clone()
    for t in range(1, steps.chunk):  # level 1: chunk-local end states
        torch.addcmul(x[t], a[t], h, out=h)
    entering = chunk_scan(h.movedim(-1, 0), steps.chunk_decays(), reverse=False)
    x[0].addcmul_(a[0], entering)
    for t in range(1, steps.chunk):  # level 3: the true states
        x[t].addcmul_(a[t], x[t - 1])


def _forward_states(steps: _Steps, scratch: Scratch) -> Tuple[Tensor, Tensor]:
    """Runs the recurrence; returns (states, decays), both [T, b, K*D, nc].

    The decays are in ``scratch`` memory.
    """
    x = torch.mul(steps.dt_l, steps.u_l)
    steps.per_group(x).mul_(steps.B_l)
    a = steps.decays(scratch.take(x.shape, x.dtype))
    _states(steps, a, x)
    return x, a


def single_state_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tuple[Tensor, List[Tensor]]:
    """Selective scan forward for N = 1 (no autograd); arguments as ``torch_scan_forward``.

    Returns:
        (y, saved): y [batch, K*D, L] in the compute dtype; saved = [dt, h], each
        [T, batch, K*D, nc] in the step layout and the compute dtype.
    """
    with Scratch(u.device) as scratch:
        steps = _Steps(u, delta, A, B, C, delta_bias, delta_softplus, scratch)
        h, a = _forward_states(steps, scratch)
        y_l = staging(a)  # the decays are spent: y is formed in their buffer, staged to leave
        torch.mul(steps.per_group(h), steps.C_l, out=steps.per_group(y_l))
        if D is not None:
            y_l.addcmul_(steps.u_l, D.to(steps.dtype).view(-1, 1))
        y = store_staged(y_l, torch.empty(u.shape, dtype=steps.dtype, device=u.device))
    return y, [steps.dt_l, h]


def single_state_saved_shapes(u: Tensor) -> List[Tuple[int, ...]]:
    """Shapes of what ``single_state_forward`` saves, for fake tensors."""
    batch, channels, length = u.shape
    chunk, n_chunks = single_state_chunking(int(length))
    return [(chunk, batch, channels, n_chunks)] * 2


def _adjoint(steps: _Steps, a: Tensor, g: Tensor) -> None:
    """Turns g (C_t dy_t, [T, b, K*D, nc]) into the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}.

    In place, in reverse time, with the same three levels as the forward.
    """
    last = steps.chunk - 1
    local = g[last].clone()
    for t in range(last - 1, -1, -1):  # level 1: each chunk's adjoint at its first step
        torch.addcmul(g[t], a[t + 1], local, out=local)
    passed_back = local.mul_(a[0]).movedim(-1, 0)  # what a chunk hands to the previous one
    g[last].add_(chunk_scan(passed_back, steps.chunk_decays(), reverse=True))
    for t in range(last - 1, -1, -1):  # level 3: the true adjoint
        g[t].addcmul_(a[t + 1], g[t + 1])


def single_state_backward(
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
    """Gradients for N = 1 (no autograd); arguments and results as ``torch_scan_backward``.

    ``saved`` is what the forward returned, or empty (the states are then recomputed); it is
    never modified. du/ddelta/dB/dC come in the inputs' dtypes, dA/dD/ddelta_bias in the compute
    dtype.
    """
    with Scratch(u.device) as scratch:
        steps = _Steps(u, delta, A, B, C, delta_bias, delta_softplus, scratch, saved)
        if steps.h_l is None:
            steps.h_l, a = _forward_states(steps, scratch)
        else:
            a = steps.decays(scratch.take(steps.shape, steps.dtype))
        u_l, dt_l, h = steps.u_l, steps.dt_l, steps.h_l
        dy_l = load_steps(dy, scratch.take(steps.shape, steps.dtype))
        g = scratch.take(steps.shape, steps.dtype)
        torch.mul(steps.per_group(dy_l), steps.C_l, out=steps.per_group(g))
        _adjoint(steps, a, g)

        # a_t h_{t-1}: the previous state of a chunk's first step is the last of the chunk before.
        a[1:].mul_(h[:-1])
        a[0, ..., 1:].mul_(h[-1, ..., :-1])
        a[0, ..., 0].zero_()
        dlog = a.mul_(g)  # d loss / d(dt_t A)
        spare = torch.mul(dlog, dt_l, out=scratch.take(steps.shape, steps.dtype))
        dA = spare.sum((0, 1, 3)).unsqueeze(1)
        batch, groups, _ = steps.group_shape
        group_l = torch.empty((steps.chunk, batch, groups, steps.n_chunks), dtype=steps.dtype,
                              device=steps.device)
        dC = from_steps(torch.sum(steps.per_group(torch.mul(dy_l, h, out=spare)), 3, out=group_l),
                        steps.length, C.dtype)
        torch.mul(dt_l, u_l, out=spare).mul_(g)
        dB = from_steps(torch.sum(steps.per_group(spare), 3, out=group_l), steps.length, B.dtype)
        ddtu = steps.per_group(g).mul_(steps.B_l).view(steps.shape)  # d loss / d(dt u), in g
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
        dD, ddelta_bias = input_grads(
            ddtu, dlog.mul_(steps.A), u_l, dt_l, dy_l, spare, D, delta_softplus,
            delta_bias is not None, du, ddelta,
        )
    return du, ddelta, dA, dB.unsqueeze(2), dC.unsqueeze(2), dD, ddelta_bias
