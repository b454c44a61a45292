"""Reference four-route 2D selective scan: the routes, the float32 per-token scan, the merge.

This is the specification and the test oracle of ``ss2d_scan``'s faster backends. It builds each
route's inputs with plain reshapes and flips, runs ``selective_scan_naive`` (a Python loop over
time) on the four routes as its K = 4 groups, and sums the routes back at every position, so it
is only meant for tests and tiny images.

For an image of H x W positions p = h * W + w (L = H * W) and route k:

    route 0 visits p at step h * W + w          (row-major)
    route 1 visits p at step w * H + h          (column-major)
    route 2 visits p at step L - 1 - (h * W + w)
    route 3 visits p at step L - 1 - (w * H + h)

Route k scans x with its own delta_k, A_k, B_k, C_k, D_k, delta_bias_k (rows k*D .. k*D + D - 1 of
A, D and delta_bias), and y[p] = sum over k of route k's output at the step where it visits p.
"""

from typing import List, Optional

import torch

from ..selective_scan import selective_scan_naive

Tensor = torch.Tensor

ROUTES = 4


def _route_orders(image: Tensor) -> List[Tensor]:
    """[B, H, W, C] -> the four routes' [B, C, L], each in its own step order."""
    row_major = image.permute(0, 3, 1, 2).flatten(2)
    col_major = image.permute(0, 3, 2, 1).flatten(2)
    return [row_major, col_major, row_major.flip(-1), col_major.flip(-1)]


def _to_image(route: Tensor, k: int, height: int, width: int) -> Tensor:
    """Route k's [B, C, L] in step order -> [B, H, W, C] at the positions it visited."""
    batch, channels, _ = route.shape
    if k >= 2:  # routes 2 and 3 walk routes 0 and 1 backwards
        route = route.flip(-1)
    if k % 2 == 0:
        return route.view(batch, channels, height, width).permute(0, 2, 3, 1)
    return route.view(batch, channels, width, height).permute(0, 3, 2, 1)


def ss2d_scan_naive(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True,
) -> Tensor:
    """Runs the four-route scan token by token in float32 and merges the routes.

    Args:
        x: [B, H, W, D].
        delta: [B, H, W, K, D]; route k reads delta[:, :, :, k].
        A: [K*D, N]; route k uses rows k*D .. k*D + D - 1.
        B, C: [B, H, W, K, N]; route k reads B[:, :, :, k], C[:, :, :, k].
        D, delta_bias: [K*D] or None.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        y, float32 [B, H, W, D]: the sum of the four routes' outputs at each position.
    """
    batch, height, width, _ = x.shape
    x, delta, B, C = x.float(), delta.float(), B.float(), C.float()
    xs = _route_orders(x)
    u = torch.cat(xs, dim=1)  # [B, K*D, L]: route k's copy of x in channels k*D ..
    deltas = torch.cat([_route_orders(delta[:, :, :, k])[k] for k in range(ROUTES)], dim=1)
    Bs = torch.stack([_route_orders(B[:, :, :, k])[k] for k in range(ROUTES)], dim=1)
    Cs = torch.stack([_route_orders(C[:, :, :, k])[k] for k in range(ROUTES)], dim=1)
    ys = selective_scan_naive(u, deltas, A, Bs, Cs, D, delta_bias, delta_softplus)
    routes = ys.chunk(ROUTES, dim=1)  # route k's [B, D, L]
    return sum(_to_image(routes[k], k, height, width) for k in range(ROUTES)).contiguous()
