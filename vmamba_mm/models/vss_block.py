"""VSSBlock: the pre-norm residual block of VMamba (SS2D mixer, then an optional MLP)."""

from typing import Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

from .layers import DropPath, Mlp, make_norm
from .ss2d import SS2D


class VSSBlock(nn.Module):
    """Pre-norm residual block: ``x + drop_path(op(norm(x)))``, then an optional MLP branch.

    The MLP branch, present when mlp_ratio > 0, is ``x + drop_path(mlp(norm2(x)))``.

    Parameter names follow the official checkpoints: ``norm``, ``op`` (SS2D), ``norm2``, ``mlp``.

    Args:
        dim: block width C.
        drop_path: stochastic-depth rate of both residual branches.
        d_state: SSM state size N.
        ssm_ratio: SS2D inner width ratio.
        dt_rank: delta projection rank, or "auto" (ceil(C / 16)).
        gated: SS2D with the SiLU(z) gate (vanilla models).
        conv_bias: bias on SS2D's depthwise conv.
        mlp_ratio: MLP hidden width ratio; 0 means no MLP (vanilla models).
        channel_first: layout ([B, C, H, W] if True, else [B, H, W, C]).
        scan_backend: selective-scan backend passed to SS2D.
        with_cp: recompute the block in backward (activation checkpointing) to save memory.
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: Union[int, str] = "auto",
        gated: bool = False,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        channel_first: bool = True,
        scan_backend: str = "auto",
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0, got {mlp_ratio}.")
        self.with_cp = with_cp
        self.norm = make_norm(dim, channel_first)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, gated=gated,
                       conv_bias=conv_bias, channel_first=channel_first, scan_backend=scan_backend)
        self.drop_path = DropPath(drop_path)
        self.has_mlp = mlp_ratio > 0
        if self.has_mlp:
            self.norm2 = make_norm(dim, channel_first)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), channel_first)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.has_mlp:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, C, H, W] or [B, H, W, C]. Returns: the same shape."""
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)
