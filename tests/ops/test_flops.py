"""FLOP formula of the selective scan and its counter handles for traced graphs."""

import pytest
import torch

from vmamba_mm.ops import (
    SCAN_FLOP_HANDLES,
    register_mmengine_flop_handles,
    selective_scan,
    selective_scan_flops,
)

analysis = pytest.importorskip("mmengine.analysis")


def test_formula_is_nine_bldn_plus_the_d_skip():
    # VMamba-T stage 1 at 224: B=1, L=56*56, D=4*192, N=1.
    assert selective_scan_flops(1, 3136, 768, 1) == 9 * 3136 * 768 + 3136 * 768
    assert selective_scan_flops(2, 100, 12, 16, with_D=False) == 9 * 2 * 100 * 12 * 16
    assert selective_scan_flops(2, 100, 12, 16) - selective_scan_flops(
        2, 100, 12, 16, with_D=False
    ) == 2 * 100 * 12


class TwoScans(torch.nn.Module):
    """Calls the scan twice: once with the D skip, once without."""

    def __init__(self, channels=12, groups=4, d_state=3):
        super().__init__()
        self.groups, self.d_state = groups, d_state
        self.A_log = torch.nn.Parameter(torch.zeros(channels, d_state))
        self.D = torch.nn.Parameter(torch.ones(channels))

    def forward(self, u):
        batch, _, length = u.shape
        bc = u[:, : self.groups * self.d_state].reshape(batch, self.groups, self.d_state, length)
        A = -torch.exp(self.A_log)
        y = selective_scan(u, u, A, bc, bc, self.D, None, delta_softplus=True)
        return selective_scan(y, u, A, bc, bc)


def test_flop_handle_counts_the_formula_for_a_module_calling_selective_scan():
    u = torch.randn(2, 12, 20)
    analyzer = analysis.FlopAnalyzer(TwoScans(), (u,)).set_op_handle(**SCAN_FLOP_HANDLES)
    expected = selective_scan_flops(2, 20, 12, 3) + selective_scan_flops(2, 20, 12, 3, False)
    assert analyzer.total() == expected
    assert analyzer.by_operator()["selective_scan_fwd"] == expected
    assert "vmamba_mm::selective_scan_fwd" not in analyzer.unsupported_ops()


def test_registered_handles_make_get_model_complexity_info_count_the_scan():
    u = torch.randn(1, 12, 7)
    register_mmengine_flop_handles()
    info = analysis.get_model_complexity_info(
        TwoScans(), inputs=(u,), show_table=False, show_arch=False
    )
    assert info["flops"] == selective_scan_flops(1, 7, 12, 3) + selective_scan_flops(
        1, 7, 12, 3, with_D=False
    )
    assert info["activations"] >= 2 * 12 * 7
