"""SS2D against a direct transcription of the official equations (spec sections 2 and 3).

The reference below is written independently of the module: explicit index maps for the four
routes, a per-token loop for the scan, and the merge as a sum of four gathers.
"""

import pytest
import torch
import torch.nn.functional as F
from vmamba_test_utils import randomize_, seeded_randn

from vmamba_mm.models import SS2D


def reference_ss2d(op: SS2D, x: torch.Tensor) -> torch.Tensor:
    """Official SS2D on channel-last x [B, H, W, C] using op's parameters."""
    batch, height, width, _ = x.shape
    d, n, r, length = op.d_inner, op.d_state, op.dt_rank, height * width
    xz = x @ op.in_proj.weight.t()
    if op.gated:  # v0: x first, then z; z through SiLU
        xi, z = xz[..., :d], F.silu(xz[..., d:])
    else:
        xi, z = xz, None
    xi = xi.permute(0, 3, 1, 2)
    xi = F.silu(F.conv2d(xi, op.conv2d.weight, op.conv2d.bias, padding=1, groups=d))
    flat = xi.flatten(2)  # position p = h*W + w
    hh, ww = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    row, col = (hh * width + ww).flatten(), (ww * height + hh).flatten()
    xs = torch.zeros(batch, 4, d, length)
    xs[:, 0][:, :, row] = flat
    xs[:, 1][:, :, col] = flat
    xs[:, 2][:, :, length - 1 - row] = flat
    xs[:, 3][:, :, length - 1 - col] = flat

    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, op.x_proj_weight)
    dts, Bs, Cs = x_dbl[:, :, :r], x_dbl[:, :, r:r + n], x_dbl[:, :, r + n:]
    dts = torch.einsum("bkrl,kdr->bkdl", dts, op.dt_projs_weight)
    A = -torch.exp(op.A_logs).view(4, d, n)
    Dskip = op.Ds.view(4, d)
    delta = F.softplus(dts + op.dt_projs_bias[None, :, :, None])  # [B, 4, D, L]
    h = torch.zeros(batch, 4, d, n)
    ys = []
    for t in range(length):
        dt = delta[..., t]  # [B, 4, D]
        h = torch.exp(dt[..., None] * A) * h \
            + dt[..., None] * Bs[:, :, None, :, t] * xs[..., t, None]
        ys.append((h * Cs[:, :, None, :, t]).sum(-1) + Dskip * xs[..., t])
    ys = torch.stack(ys, dim=-1)  # [B, 4, D, L]
    y = ys[:, 0][..., row] + ys[:, 1][..., col] + ys[:, 2][..., length - 1 - row] \
        + ys[:, 3][..., length - 1 - col]  # [B, D, L] at positions p
    y = y.transpose(1, 2).reshape(batch, height, width, d)
    y = F.layer_norm(y, (d,), op.out_norm.weight, op.out_norm.bias, 1e-5)
    if z is not None:
        y = y * z
    return y @ op.out_proj.weight.t()


CASES = [
    dict(d_model=8, d_state=1, ssm_ratio=1.0, gated=False, conv_bias=False),  # v05_noz, s1
    dict(d_model=8, d_state=1, ssm_ratio=2.0, gated=False, conv_bias=False),  # v05_noz, s2
    dict(d_model=8, d_state=4, ssm_ratio=2.0, gated=True, conv_bias=True),  # v0
]


@pytest.mark.parametrize("case", CASES, ids=["noz-s1", "noz-s2", "v0-gated"])
@pytest.mark.parametrize("channel_first", [False, True])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_ss2d_matches_transcribed_official_equations(case, channel_first, backend):
    op = randomize_(SS2D(**case, channel_first=channel_first, scan_backend=backend), seed=3)
    x = seeded_randn(2, 7, 9, 8, seed=1)  # [B, H, W, C], H != W to catch transposes
    with torch.no_grad():
        expected = reference_ss2d(op, x)
        if channel_first:
            out = op(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            out = op(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gated_in_proj_has_two_halves_and_conv_bias():
    op = SS2D(16, d_state=16, ssm_ratio=2.0, gated=True, conv_bias=True)
    assert op.in_proj.weight.shape == (64, 16)
    assert op.conv2d.bias.shape == (32,)
    noz = SS2D(16, d_state=1, ssm_ratio=2.0)
    assert noz.in_proj.weight.shape == (32, 16) and noz.conv2d.bias is None


def test_ss2d_rejects_unknown_scan_backend():
    with pytest.raises(ValueError, match="scan_backend"):
        SS2D(8, scan_backend="cuda")
