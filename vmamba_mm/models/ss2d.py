"""SS2D: the 2D selective-scan token mixer of VMamba.

The input is projected to D = int(ssm_ratio * C) channels, passed through a depthwise 3x3 conv and
SiLU, unfolded into four 1D routes over the image (row-major, column-major and their reverses),
scanned by a selective state-space model per route, folded back, normalised and projected to C.

Two variants are provided, both with the official parameter names and shapes:

* ``gated=False`` (all v2 checkpoints, official forward type "v05_noz"): no gate, conv without
  bias, scan inputs kept in the activation dtype;
* ``gated=True`` (vanilla checkpoints, official "v0"): ``in_proj`` also produces a gate z, the
  output is multiplied by SiLU(z), the conv has a bias, scan inputs are cast to float32.

Both run in the channel-first layout ([B, C, H, W]) or the channel-last one ([B, H, W, C]) with
identical math on the same state_dict.
"""

import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import cross_merge, cross_merge_channel_last, cross_scan, selective_scan
from .layers import layer_norm_float32, make_linear, make_norm

SCAN_BACKENDS = ("auto", "torch", "naive", "triton")

# Number of scan routes over the image.
K = 4


def resolve_dt_rank(dt_rank: Union[int, str], d_model: int) -> int:
    """Returns the rank of the delta projection: ceil(C / 16) for "auto", else ``dt_rank``."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}.")
    return dt_rank


class SS2D(nn.Module):
    """The four-route 2D selective-scan mixer.

    Args:
        d_model: block width C.
        d_state: SSM state size N.
        ssm_ratio: D = int(ssm_ratio * C).
        dt_rank: rank R of the delta projection, or "auto" for ceil(C / 16).
        gated: add the SiLU(z) gate of the vanilla models (in_proj then outputs 2D channels).
        conv_bias: bias on the depthwise conv.
        channel_first: layout of input and output ([B, C, H, W] if True, else [B, H, W, C]).
        scan_backend: backend of ``vmamba_mm.ops.selective_scan`` ("auto", "torch", "naive",
            "triton").
        d_conv: depthwise conv kernel size (3 in every released model).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: Union[int, str] = "auto",
        gated: bool = False,
        conv_bias: bool = False,
        channel_first: bool = True,
        scan_backend: str = "auto",
        d_conv: int = 3,
    ) -> None:
        super().__init__()
        if scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"scan_backend {scan_backend!r} is not one of {SCAN_BACKENDS}.")
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"d_conv must be a positive odd int, got {d_conv}.")
        d_inner = int(ssm_ratio * d_model)
        if d_inner < 1 or d_state < 1:
            raise ValueError(
                f"ssm_ratio * d_model and d_state must be >= 1, got {d_inner} and {d_state}.")
        self.d_model = d_model
        self.d_inner = d_inner
        self.d_state = d_state
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.gated = gated
        self.channel_first = channel_first
        self.scan_backend = scan_backend
        # The cross-scan follows the scan: Triton when asked for, PyTorch for the CPU reference
        # backends, and the ops' own choice for "auto".
        self.cross_backend = {"naive": "torch", "torch": "torch"}.get(scan_backend, scan_backend)

        proj_out = 2 * d_inner if gated else d_inner
        self.in_proj = make_linear(d_model, proj_out, bias=False, channel_first=channel_first)
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, bias=conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(K, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d_inner))
        self.out_norm = make_norm(d_inner, channel_first)
        self.out_proj = make_linear(d_inner, d_model, bias=False, channel_first=channel_first)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 0.001, dt_max: float = 0.1,
                             dt_init_floor: float = 1e-4) -> None:
        """Initialises the SSM parameters as the official "v0" init does.

        x_proj_weight: nn.Linear's default (kaiming-uniform, bound 1/sqrt(D)); dt_projs_weight
        U(+-R^-0.5); dt_projs_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max]
        (floored at dt_init_floor); A_logs = log(1..N) in every row; Ds = 1.
        """
        for k in range(K):
            nn.init.kaiming_uniform_(self.x_proj_weight[k], a=math.sqrt(5))
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_projs_weight, -bound, bound)
        dt = torch.exp(torch.rand(K, self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        # Inverse of softplus: softplus(dt + log(1 - exp(-dt))) == dt.
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(a).expand(K * self.d_inner, self.d_state))
        self.Ds.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mixes tokens over the image.

        Args:
            x: [B, C, H, W] (channel_first) or [B, H, W, C].

        Returns:
            The same shape and layout as ``x``.
        """
        x = self.in_proj(x)
        channel_dim = 1 if self.channel_first else -1
        z = None
        if self.gated:
            x, z = x.chunk(2, dim=channel_dim)
            z = F.silu(z)
        if not self.channel_first:
            x = x.permute(0, 3, 1, 2)
        x = F.silu(self.conv2d(x))  # [B, D, H, W]
        batch, d_inner, height, width = x.shape
        length = height * width

        xs = cross_scan(x, backend=self.cross_backend)  # [B, K, D, L]
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # [B, K, R+2N, L]
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # [B, K, D, L]
        xs = xs.reshape(batch, K * d_inner, length)
        dts = dts.reshape(batch, K * d_inner, length)
        if self.gated:
            # The vanilla models scan in float32 whatever the activation dtype.
            xs, dts, Bs, Cs = xs.float(), dts.float(), Bs.float(), Cs.float()
        else:
            # The v2 models scan in the activation dtype (fp16/bf16 under AMP); the projections
            # may come out of autocast in another dtype than xs.
            dts, Bs, Cs = dts.to(xs.dtype), Bs.to(xs.dtype), Cs.to(xs.dtype)
        ys = selective_scan(
            xs, dts, -torch.exp(self.A_logs.float()), Bs.contiguous(), Cs.contiguous(),
            self.Ds.float(), self.dt_projs_bias.float().reshape(-1), delta_softplus=True,
            backend=self.scan_backend,
        )  # [B, K*D, L], float32
        ys = ys.view(batch, K, d_inner, height, width)

        if self.channel_first:
            y = cross_merge(ys, backend=self.cross_backend).view(batch, d_inner, height, width)
        else:
            y = cross_merge_channel_last(ys, backend=self.cross_backend)  # [B, L, D]
            y = y.view(batch, height, width, d_inner)
        # The scan output is float32; normalise it in float32 even in a bf16/fp16 model (whose
        # norm parameters are low precision), then return to the activation dtype.
        y = layer_norm_float32(self.out_norm, y).to(x.dtype)
        if z is not None:
            y = y * z
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"dt_rank={self.dt_rank}, gated={self.gated}, scan_backend={self.scan_backend!r}")
