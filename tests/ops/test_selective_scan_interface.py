"""Public selective_scan: input checks, backend dispatch, torch.compile and torch.export."""

import pytest
import torch

from vmamba_mm.ops import selective_scan, selective_scan_naive
from vmamba_mm.ops.selective_scan import interface, torch_scan

from .test_selective_scan_torch import TOLERANCES, assert_close, grads_of, make_inputs


@pytest.fixture
def inputs():
    values, _ = make_inputs(2, 4, 3, 11, 2, with_D=True, with_bias=True, softplus=True)
    return values


def call(values, **overrides):
    kwargs = dict(values, delta_softplus=True)
    kwargs.update(overrides)
    return selective_scan(**kwargs)


def test_public_names_are_exported():
    import vmamba_mm.ops as ops

    for name in ("selective_scan", "selective_scan_naive", "cross_scan", "cross_merge",
                 "cross_scan_channel_last", "cross_merge_channel_last", "selective_scan_flops"):
        assert callable(getattr(ops, name)), name


def test_auto_backend_on_cpu_runs_the_torch_backend(inputs, monkeypatch):
    calls = []
    real = torch_scan.torch_scan_forward

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch_scan, "torch_scan_forward", spy)
    y = call(inputs)
    assert calls == [inputs["u"].shape]
    assert y.dtype == torch.float32 and y.shape == inputs["u"].shape
    assert_close(y, selective_scan_naive(**inputs, delta_softplus=True), 6e-4, 2e-3, "y")


def test_naive_backend_is_the_reference(inputs):
    y = call(inputs, backend="naive")
    assert torch.equal(y, selective_scan_naive(**inputs, delta_softplus=True))


def test_bf16_inputs_give_fp32_output_and_input_dtype_gradients():
    values, softplus = make_inputs(1, 4, 2, 9, 16, with_D=True, with_bias=True, softplus=True,
                                   dtype=torch.bfloat16)
    dy = torch.ones(1, 8, 9)
    y, grads = grads_of(selective_scan, values, softplus, dy)
    assert y.dtype == torch.float32
    for name, grad in grads.items():
        assert grad.dtype == values[name].dtype, name
    y_ref, grads_ref = grads_of(selective_scan_naive, values, softplus, dy)
    rtol, atol = TOLERANCES[torch.bfloat16]
    for name in grads:
        assert_close(grads[name], grads_ref[name], rtol, atol, "d" + name)


def _bad(name, fn):
    return pytest.param(fn, name, id=name)


# Only checks of host values (shapes, dtypes, devices); A's sign is an opt-in value check, tested
# in test_no_host_sync.py.
BAD_INPUTS = [
    _bad("delta", lambda v: v.update(delta=v["delta"][..., :-1])),
    _bad("A", lambda v: v.update(A=v["A"].double())),
    _bad("A", lambda v: v.update(A=v["A"][:-1])),
    _bad("B", lambda v: v.update(B=v["B"][..., :-1])),
    _bad("B", lambda v: v.update(B=v["B"][:, :, :1])),
    _bad("C", lambda v: v.update(C=v["C"][:1])),
    _bad("D", lambda v: v.update(D=v["D"].half())),
    _bad("D", lambda v: v.update(D=v["D"][:-1])),
    _bad("delta_bias", lambda v: v.update(delta_bias=v["delta_bias"].bfloat16())),
    _bad("delta_bias", lambda v: v.update(delta_bias=v["delta_bias"][None])),
    _bad("u", lambda v: v.update(u=v["u"].double(), delta=v["delta"].double(),
                                 B=v["B"].double(), C=v["C"].double())),
    _bad("u", lambda v: v.update(u=v["u"][0])),
    _bad("u", lambda v: v.update(u=v["u"].tolist())),
    _bad("B", lambda v: v.update(B=v["B"].half())),
    _bad("K", lambda v: v.update(B=v["B"][:, :, :, :].repeat(1, 2, 1, 1)[:, :5],
                                 C=v["C"].repeat(1, 2, 1, 1)[:, :5])),
]


@pytest.mark.parametrize("corrupt,name", BAD_INPUTS)
def test_bad_inputs_raise_an_error_naming_the_argument(inputs, corrupt, name):
    corrupt(inputs)
    with pytest.raises((ValueError, TypeError), match=name):
        call(inputs)


def test_unknown_backend_is_rejected(inputs):
    with pytest.raises(ValueError, match="backend"):
        call(inputs, backend="cuda")


def test_triton_backend_on_cpu_without_the_interpreter_is_rejected(inputs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(interface, "triton_available", lambda: True)
    with pytest.raises(ValueError, match="backend"):
        call(inputs, backend="triton")


def test_triton_backend_without_triton_is_rejected(inputs, monkeypatch):
    monkeypatch.setattr(interface, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton"):
        call(inputs, backend="triton")
    # "auto" quietly falls back to the torch backend.
    assert call(inputs, backend="auto").shape == inputs["u"].shape


@pytest.mark.triton
def test_triton_backend_through_the_custom_op_matches_naive(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    values, softplus = make_inputs(1, 2, 2, 5, 2, with_D=True, with_bias=True, softplus=True)
    dy = torch.randn(1, 4, 5)
    y, grads = grads_of(lambda **kw: selective_scan(**kw, backend="triton"), values, softplus, dy)
    y_ref, grads_ref = grads_of(selective_scan_naive, values, softplus, dy)
    rtol, atol = TOLERANCES[torch.float32]
    assert_close(y, y_ref, rtol, atol, "y")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], rtol, atol, "d" + name)


class ScanModule(torch.nn.Module):
    """A tiny token mixer: projections around one selective scan."""

    def __init__(self, channels=8, groups=4, d_state=2):
        super().__init__()
        self.groups, self.d_state = groups, d_state
        self.proj = torch.nn.Linear(channels, channels + 2 * groups * d_state)
        self.A_log = torch.nn.Parameter(torch.randn(channels, d_state) * 0.1)
        self.D = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # x [batch, L, channels]
        batch, length, channels = x.shape
        z = self.proj(x).transpose(1, 2)  # [batch, channels + 2*K*N, L]
        u = z[:, :channels].contiguous()
        bc = z[:, channels:].reshape(batch, 2, self.groups, self.d_state, length)
        y = selective_scan(u, u, -torch.exp(self.A_log), bc[:, 0].contiguous(),
                           bc[:, 1].contiguous(), self.D, self.bias, delta_softplus=True)
        return y.transpose(1, 2)


def test_compiled_module_with_fullgraph_matches_eager_in_output_and_gradients():
    torch.manual_seed(0)
    module = ScanModule()
    x = torch.randn(2, 13, 8)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    compiled_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    ref = module(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip(compiled_grads, (p.grad for p in module.parameters())):
        torch.testing.assert_close(got, want)


def test_export_records_the_scan_as_one_custom_op():
    module = ScanModule()
    program = torch.export.export(module, (torch.randn(1, 10, 8),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    scans = [t for t in targets if "selective_scan" in t]
    assert scans == ["vmamba_mm.selective_scan_fwd.default"]
    assert not any("exp" in t and "scan" not in t for t in targets[targets.index(scans[0]):])
