"""SS2D: the 2D selective-scan token mixer of VMamba.

The input is projected to D = int(ssm_ratio * C) channels, passed through a depthwise 3x3 conv and
SiLU, scanned by a selective state-space model along four routes over the image (row-major,
column-major and their reverses), the routes summed back at every position, normalised and
projected to C.

The scan is one op, ``vmamba_mm.ops.ss2d_scan``, on natural-order inputs: the per-route
projections (x_proj: delta's rank-R part, B, C; dt_proj) run once on x in channel-last order with
the four routes' weights stacked, where the official code applies them to four route-ordered
copies of x (cross-scan) and sums the routes' outputs afterwards (cross-merge). The products are
the same; only float rounding differs.

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

from ..ops import ss2d_scan
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
        scan_backend: the backend of ``vmamba_mm.ops.ss2d_scan``: "auto" (its fused Triton
            kernels on CUDA, pure PyTorch elsewhere), "triton", "torch" or "naive".
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
        # Channel-last view [B, H, W, D]: in place when the conv ran in channels_last memory
        # format (as it does after LayerNorm2d / nn.Linear); the scan reads any strides.
        xs = x.permute(0, 2, 3, 1)
        # The projections run once on x in natural order with the four routes' weights stacked
        # (one GEMM each): the same products as the official einsums over four route-ordered
        # copies of x. Written as einsums so that FLOP counters see the official ones' sizes
        # and count them alike (fvcore rounds einsum counts).
        x_dbl = torch.einsum("bhwd,kcd->bhwkc", xs, self.x_proj_weight)  # [B, H, W, K, R+2N]
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dts = torch.einsum("bhwkr,kdr->bhwkd", dts, self.dt_projs_weight)  # [B, H, W, K, D]
        if self.gated:
            # The vanilla models scan in float32 whatever the activation dtype.
            xs, dts, Bs, Cs = xs.float(), dts.float(), Bs.float(), Cs.float()
        else:
            # The v2 models scan in the activation dtype (fp16/bf16 under AMP); the projections
            # may come out of autocast in another dtype than xs.
            dts, Bs, Cs = dts.to(xs.dtype), Bs.to(xs.dtype), Cs.to(xs.dtype)
        y = ss2d_scan(
            xs, dts, -torch.exp(self.A_logs.float()), Bs, Cs, self.Ds.float(),
            self.dt_projs_bias.float().reshape(-1), delta_softplus=True, backend=self.scan_backend,
        )  # [B, H, W, D], float32
        if self.channel_first:
            y = y.permute(0, 3, 1, 2)
        # The scan output is float32; normalise it in float32 even in a bf16/fp16 model (whose
        # norm parameters are low precision), then return to the activation dtype.
        y = layer_norm_float32(self.out_norm, y).to(x.dtype)
        if z is not None:
            y = y * z
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"dt_rank={self.dt_rank}, gated={self.gated}, scan_backend={self.scan_backend!r}")
