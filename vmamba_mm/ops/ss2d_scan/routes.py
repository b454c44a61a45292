"""The four scan routes over an image, and the layout changes between the routes and the image.

Route k visits the L = H * W positions of an image (row-major, p = h * W + w) in its own order,
the order of ``vmamba_mm.ops.cross_scan``: step s of route 0 visits p = s (row-major), step s of
route 1 the position (h, w) with s = w * H + h (column-major), and routes 2 and 3 walk routes 0
and 1 backwards (their step s visits what step L - 1 - s of route 0 / 1 visits).

The routes' inputs are taken from the image by gathers of whole C-vectors at any list of
(batch, row, column[, route]) places: one ``index_select`` over a strided row view of the tensor
(``row_offsets``, ``gather_rows``), which reads the tensor where it lies, so a channel-last view or
a view into a GEMM's output is gathered without being copied first, and a route walked backwards
costs no flip. Route-major results [B, K, C, L] (L innermost, ``selective_scan``'s layout) go back
to the image by strided copies (``merge_routes`` sums the routes, ``from_routes`` keeps them
apart).
"""

from typing import Optional

import torch

Tensor = torch.Tensor

ROUTES = 4


def route_positions(height: int, width: int, device: torch.device) -> Tensor:
    """The natural position each route visits at each step.

    Args:
        height, width: the image size H, W.
        device: where to build the map.

    Returns:
        pos, int64 [K, L]: step s of route k visits position pos[k, s] = h * W + w.
    """
    steps = torch.arange(height * width, device=device)
    row = steps
    col = (steps % height) * width + steps // height
    return torch.stack([row, col, row.flip(0), col.flip(0)])


def merge_routes(routes: Tensor, height: int, width: int) -> Tensor:
    """Sums the four routes back onto the image (``cross_merge``, channel-last output).

    Args:
        routes: [B, K, C, L], each route in its step order; any strides.
        height, width: the image size (H * W = L).

    Returns:
        [B, H, W, C], contiguous, routes' dtype.
    """
    batch, _, channels, _ = routes.shape
    # Each backward route is added to its forward twin in step order, so that only two
    # transposing passes remain.
    forward = routes[:, :2] + routes[:, 2:].flip(-1)  # [B, 2, C, L]
    out = routes.new_empty((batch, height, width, channels))
    out.permute(0, 3, 1, 2).copy_(forward[:, 0].view(batch, channels, height, width))
    out.permute(0, 3, 2, 1).add_(forward[:, 1].view(batch, channels, width, height))
    return out


def from_routes(routes: Tensor, height: int, width: int) -> Tensor:
    """Puts every route's values back at the positions it visited, one slot per route.

    The inverse of taking route k of ``cross_scan`` of ``image[:, :, :, k]`` for every k.

    Args:
        routes: [B, K, C, L], each route in its step order; any strides.
        height, width: the image size (H * W = L).

    Returns:
        [B, H, W, K, C], contiguous, routes' dtype.
    """
    batch, _, channels, _ = routes.shape
    backward = routes[:, 2:].flip(-1)
    out = routes.new_empty((batch, height, width, ROUTES, channels))
    for k, route in enumerate((routes[:, 0], routes[:, 1], backward[:, 0], backward[:, 1])):
        if k % 2 == 0:  # row-major
            out[:, :, :, k].permute(0, 3, 1, 2).copy_(route.view(batch, channels, height, width))
        else:  # column-major
            out[:, :, :, k].permute(0, 3, 2, 1).copy_(route.view(batch, channels, width, height))
    return out


def row_offsets(
    tensor: Tensor, batch: Tensor, row: Tensor, col: Tensor, route: Optional[Tensor] = None
) -> Tensor:
    """Element offsets, from ``tensor``'s first element, of the C-vectors at the given places.

    Args:
        tensor: [B, H, W, C] or [B, H, W, K, C], any strides.
        batch, row, col, route: int64 index tensors that broadcast together; ``route`` only for
            the five-dimensional form.

    Returns:
        int64 offsets, flattened, in the broadcast order of the indices.
    """
    strides = tensor.stride()
    offsets = row * strides[1] + col * strides[2]
    offsets = offsets + batch * strides[0]
    if route is not None:
        offsets = offsets + route * strides[3]
    return offsets.reshape(-1)


def gather_rows(tensor: Tensor, offsets: Tensor, out: Tensor) -> Tensor:
    """Copies the C-vectors of ``tensor`` that start at ``offsets`` into ``out``, in order.

    ``tensor`` is read through a row view whose row i starts i elements after its first element
    (the rows overlap; only whole C-vectors are ever selected), so it is never copied first.
    With a unit channel stride and a matching dtype every row is one ``memcpy``.

    Args:
        tensor: [..., C], any strides.
        offsets: int64 [M], from ``row_offsets``.
        out: a contiguous tensor of M * C elements, any float dtype (cast on the way).

    Returns:
        ``out``.
    """
    channels = tensor.shape[-1]
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    rows = tensor.as_strided((span - (channels - 1) * tensor.stride(-1), channels),
                             (1, tensor.stride(-1)))
    flat = out.view(-1, channels)
    if rows.dtype == out.dtype:
        torch.index_select(rows, 0, offsets, out=flat)
    else:
        flat.copy_(rows.index_select(0, offsets))
    return out
