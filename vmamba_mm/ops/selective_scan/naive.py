"""Reference selective scan: the float32 per-token recurrence, written as the equations.

This is the specification and the test oracle for every faster backend. It loops over time in
Python, so it is only meant for tests and for tiny shapes.

Per batch b, channel c (group k = c // D_per_group), state n and time t, with h_{-1} = 0:

    delta_t  = softplus(delta[c, t] + delta_bias[c])          (softplus optional)
    h_t[n]   = exp(delta_t * A[c, n]) * h_{t-1}[n] + delta_t * B[k, n, t] * u[c, t]
    y[c, t]  = sum_n C[k, n, t] * h_t[n] + D[c] * u[c, t]
"""

from typing import Optional

import torch
import torch.nn.functional as F


def selective_scan_naive(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Runs the selective scan token by token in float32.

    Args:
        u: input, [batch, K*D, L].
        delta: time steps before bias/softplus, [batch, K*D, L].
        A: state decay rates (<= 0), [K*D, N].
        B: input projections, [batch, K, N, L]; channel c uses group c // D.
        C: output projections, [batch, K, N, L].
        D: skip weights, [K*D], or None.
        delta_bias: added to delta before the softplus, [K*D], or None.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        y, float32 [batch, K*D, L].
    """
    batch, channels, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as in the CUDA/Triton kernels
    # Give every channel its group's B and C: [batch, K*D, N, L].
    B = B.float().repeat_interleave(channels // groups, dim=1)
    C = C.float().repeat_interleave(channels // groups, dim=1)
    A = A.float()

    h = u.new_zeros(batch, channels, d_state)  # [batch, K*D, N]
    ys = []
    # unbind keeps the backward linear in L (indexing x[..., t] under autograd is quadratic).
    for u_t, delta_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(delta_t[..., None] * A)  # [batch, K*D, N]
        h = decay * h + (delta_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))  # [batch, K*D]
    y = torch.stack(ys, dim=-1)  # [batch, K*D, L]
    if D is not None:
        y = y + u * D.float()[None, :, None]
    return y
