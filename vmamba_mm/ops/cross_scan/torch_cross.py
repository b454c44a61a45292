"""Four-direction cross-scan and cross-merge in plain PyTorch.

For x of shape [B, D, H, W] and a position (h, w), with L = H * W:

    xs[:, 0, :, h*W + w]         = x[:, :, h, w]    row-major
    xs[:, 1, :, w*H + h]         = x[:, :, h, w]    column-major
    xs[:, 2, :, L - 1 - (h*W+w)] = x[:, :, h, w]    flip of route 0
    xs[:, 3, :, L - 1 - (w*H+h)] = x[:, :, h, w]    flip of route 1

Cross-merge adds the four routes back at (h, w); it is the adjoint of cross-scan, so each one is the
other's backward. These functions only move data and are differentiable through autograd.
"""

import torch


def cross_scan_torch(x: torch.Tensor) -> torch.Tensor:
    """Unfolds an image into four 1D routes.

    Args:
        x: [B, D, H, W].

    Returns:
        xs: [B, 4, D, H*W].
    """
    batch, dim, height, width = x.shape
    row_major = x.flatten(2)  # [B, D, L]
    col_major = x.transpose(2, 3).flatten(2)  # [B, D, L]
    forward = torch.stack([row_major, col_major], dim=1)  # [B, 2, D, L]
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge_torch(ys: torch.Tensor) -> torch.Tensor:
    """Sums four routes back onto the image grid.

    Args:
        ys: [B, 4, D, H, W], each route laid out in its own scan order over L = H*W.

    Returns:
        y: [B, D, H*W] in row-major order.
    """
    batch, routes, dim, height, width = ys.shape
    ys = ys.flatten(3)  # [B, 4, D, L]
    forward = ys[:, 0:2] + ys[:, 2:4].flip(-1)  # [B, 2, D, L]
    col = forward[:, 1].view(batch, dim, width, height).transpose(2, 3).flatten(2)
    return forward[:, 0] + col


def cross_scan_channel_last_torch(x: torch.Tensor) -> torch.Tensor:
    """cross_scan for channel-last images.

    Args:
        x: [B, H, W, D].

    Returns:
        xs: [B, 4, D, H*W], the same routes as ``cross_scan_torch(x.permute(0, 3, 1, 2))``.
    """
    return cross_scan_torch(x.permute(0, 3, 1, 2))


def cross_merge_channel_last_torch(ys: torch.Tensor) -> torch.Tensor:
    """cross_merge returning channel-last output.

    Args:
        ys: [B, 4, D, H, W].

    Returns:
        y: [B, H*W, D].
    """
    return cross_merge_torch(ys).transpose(1, 2)
