"""ss2d_scan (four-route scan of a channel-last image) against cross_scan -> naive scan -> merge.

The oracle is the composition of the public ops this op replaces in SS2D: ``cross_scan`` of x,
route k of ``cross_scan`` of delta_k / B_k / C_k, ``selective_scan_naive`` over the four routes
as its K groups, and ``cross_merge``. Every backend is compared with it on the output and on all
seven gradients, with the inputs laid out as SS2D passes them: x a channel-last view of a
``channels_last`` tensor, delta / B / C views into one GEMM output.
"""

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vmamba_mm.models import SS2D
from vmamba_mm.ops import (
    cross_merge,
    cross_scan,
    cross_scan_channel_last,
    selective_scan_naive,
    ss2d_scan,
    ss2d_scan_naive,
)
from vmamba_mm.ops.cross_scan import interface as cross_interface
from vmamba_mm.ops.flops import SCAN_ACTIVATION_HANDLES, SCAN_FLOP_HANDLES, selective_scan_flops
from vmamba_mm.ops.selective_scan.scratch import Scratch
from vmamba_mm.ops.selective_scan.torch_scan_single_state import single_state_chunking
from vmamba_mm.ops.ss2d_scan import interface, routes, torch_ss2d

from .test_no_host_sync import assert_no_host_reads
from .test_selective_scan_torch import TOLERANCES, assert_close

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON = pytest.param("triton", marks=pytest.mark.triton)
if HAS_TRITON:
    from vmamba_mm.ops.ss2d_scan import triton_ss2d

K = 4
NAMES = ("x", "delta", "A", "B", "C", "D", "delta_bias")


def composition(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """The oracle: cross_scan -> selective_scan_naive -> cross_merge, y [batch, H, W, D]."""
    batch, height, width, dim = x.shape

    def route(image, k):  # [B, H, W, C] -> route k of its cross-scan, [B, C, L]
        return cross_scan(image.permute(0, 3, 1, 2), backend="torch")[:, k]

    xs = cross_scan(x.permute(0, 3, 1, 2), backend="torch").flatten(1, 2)  # [B, K*D, L]
    deltas = torch.cat([route(delta[:, :, :, k], k) for k in range(K)], dim=1)
    Bs = torch.stack([route(B[:, :, :, k], k) for k in range(K)], dim=1)  # [B, K, N, L]
    Cs = torch.stack([route(C[:, :, :, k], k) for k in range(K)], dim=1)
    ys = selective_scan_naive(xs, deltas, A, Bs, Cs, D, delta_bias, delta_softplus)
    y = cross_merge(ys.view(batch, K, dim, height, width), backend="torch")  # [B, D, L]
    return y.view(batch, dim, height, width).permute(0, 2, 3, 1)


def make_inputs(batch, height, width, dim, d_state, *, with_D=True, with_bias=True,
                dtype=torch.float32, seed=0):
    """Leaf tensors, and the scan's inputs as SS2D lays them out (views of the leaves).

    Returns:
        (leaves, inputs): ``leaves`` maps the names of NAMES to leaf tensors (x is a
        [B, D, H, W] channels_last tensor; delta, B and C share one [B, H, W, K, D + 2N] GEMM
        output, whose inputs are leaves); ``inputs`` maps them to what ss2d_scan receives.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, height, width, generator=gen)
    features = 8
    gemm_in = torch.randn(batch, height, width, features, generator=gen)
    weight = torch.randn(K * (dim + 2 * d_state), features, generator=gen) / features ** 0.5
    leaves = {
        "x": x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(),
        "gemm_in": gemm_in.to(dtype).requires_grad_(),
        "weight": weight.to(dtype).requires_grad_(),
        "A": (-torch.exp(torch.rand(K * dim, d_state, generator=gen) * 2 - 1)).requires_grad_(),
        "D": torch.randn(K * dim, generator=gen).requires_grad_() if with_D else None,
        "delta_bias": (torch.rand(K * dim, generator=gen) * 0.2 - 1).requires_grad_()
        if with_bias else None,
    }
    gemm = torch.nn.functional.linear(leaves["gemm_in"], leaves["weight"])
    gemm = gemm.view(batch, height, width, K, dim + 2 * d_state)
    delta, B, C = torch.split(gemm, [dim, d_state, d_state], dim=-1)
    inputs = {"x": leaves["x"].permute(0, 2, 3, 1), "delta": delta, "A": leaves["A"], "B": B,
              "C": C, "D": leaves["D"], "delta_bias": leaves["delta_bias"]}
    return leaves, inputs


def detached(inputs):
    """Contiguous leaf copies of the scan's inputs (None stays None)."""
    return {k: None if v is None else v.detach().contiguous().requires_grad_()
            for k, v in inputs.items()}


def output_and_grads(fn, inputs, dy):
    """fn(**inputs) and the gradients of <y, dy> with respect to every tensor input."""
    y = fn(**inputs)
    names = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(y, [inputs[k] for k in names], dy)
    return y, dict(zip(names, grads))


def assert_matches_composition(backend, inputs, rtol, atol, dy_seed=1):
    """ss2d_scan(backend=backend), or the callable ``backend``, against the composition."""
    reference = detached(inputs)
    y_ref = composition(**reference)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(dy_seed))
    y_ref, g_ref = output_and_grads(composition, reference, dy)
    fn = backend if callable(backend) else lambda **kw: ss2d_scan(**kw, backend=backend)
    y, grads = output_and_grads(fn, inputs, dy)
    assert y.dtype == torch.float32 and y.is_contiguous()
    assert_close(y, y_ref.contiguous(), rtol, atol, "y")
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_close(grads[name], g_ref[name], rtol, atol, "d" + name)


# (batch, H, W, D, N, with_D, with_bias): odd maps, one and sixteen states, with and without the
# optional inputs. 2 x 19 pads the last chunk of the step path (checked below), 1 x 7 too.
CASES = [
    (2, 3, 5, 4, 1, True, True),
    (1, 3, 5, 3, 16, False, True),
    (2, 9, 1, 3, 1, True, False),
    (2, 9, 1, 2, 16, True, True),
    (1, 1, 7, 3, 1, False, False),
    (2, 1, 7, 3, 16, True, True),
    (1, 13, 11, 3, 1, True, True),
    (2, 13, 11, 2, 16, True, True),
    (2, 2, 19, 3, 1, True, True),
]


@pytest.mark.parametrize("backend", ["torch", "naive", TRITON])
@pytest.mark.parametrize("batch,height,width,dim,d_state,with_D,with_bias", CASES)
def test_backend_matches_the_composition_in_output_and_every_gradient(
    backend, batch, height, width, dim, d_state, with_D, with_bias
):
    _, inputs = make_inputs(batch, height, width, dim, d_state, with_D=with_D,
                            with_bias=with_bias)
    assert inputs["x"]._is_view() and inputs["x"].stride(-1) == 1
    assert not inputs["delta"].is_contiguous() and inputs["delta"].stride(-1) == 1
    assert_matches_composition(backend, inputs, 1e-4, 1e-4)


def test_cases_cover_a_padded_chunk_of_the_step_path_on_a_2d_map():
    def pads(length):
        chunk, n_chunks = single_state_chunking(length)
        return chunk * n_chunks > length

    assert any(n == 1 and h > 1 and w > 1 and pads(h * w) for _, h, w, _, n, _, _ in CASES)


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_state", [1, 16])
def test_low_precision_inputs_match_the_composition(backend, dtype, d_state):
    _, inputs = make_inputs(2, 5, 7, 3, d_state, dtype=dtype)
    assert_matches_composition(backend, inputs, *TOLERANCES[dtype])


@pytest.mark.triton
@pytest.mark.parametrize("d_state", [1, 4])
def test_triton_chunk_parallel_schedule_matches_the_composition(monkeypatch, d_state):
    # The schedule a GPU picks for few programs and long routes; forced here, with 8-step
    # chunks so that the 9 x 13 map has 15 of them (the last one partial).
    monkeypatch.setattr(triton_ss2d, "use_chunk_parallel", lambda *args: True)
    monkeypatch.setattr(triton_ss2d, "MAX_CHUNK", 8)
    assert triton_ss2d.tile_sizes(3, d_state, 9 * 13)[0] == 8
    _, inputs = make_inputs(2, 9, 13, 3, d_state)
    assert_matches_composition("triton", inputs, 1e-4, 1e-4)


@pytest.mark.triton
def test_triton_chunk_parallel_schedule_reads_strided_parameter_vectors(monkeypatch):
    # D and delta_bias as every-other-element views: every kernel of the schedule, the chunk
    # states included, must see their values, not the memory next to them.
    monkeypatch.setattr(triton_ss2d, "use_chunk_parallel", lambda *args: True)
    monkeypatch.setattr(triton_ss2d, "MAX_CHUNK", 8)
    _, inputs = make_inputs(1, 9, 13, 3, 1)
    for name in ("D", "delta_bias"):
        doubled = torch.stack([inputs[name].detach(), torch.full_like(inputs[name], 5.0)], -1)
        inputs[name] = doubled.flatten()[::2].requires_grad_()
        assert inputs[name].stride() == (2,)
    assert_matches_composition("triton", inputs, 1e-4, 1e-4)


@pytest.mark.triton
def test_triton_backend_is_bitwise_repeatable():
    _, inputs = make_inputs(2, 5, 7, 3, 2)
    dy = torch.randn(2, 5, 7, 3, generator=torch.Generator().manual_seed(3))
    first = output_and_grads(lambda **kw: ss2d_scan(**kw, backend="triton"), inputs, dy)
    second = output_and_grads(lambda **kw: ss2d_scan(**kw, backend="triton"), inputs, dy)
    assert torch.equal(first[0], second[0])
    for name, grad in first[1].items():
        assert torch.equal(grad, second[1][name]), name


@pytest.mark.triton
@pytest.mark.parametrize("d_state", [1, 2])
def test_route_major_path_around_the_triton_scan_matches_the_composition(monkeypatch, d_state):
    # What "auto" runs on CUDA today: the torch backend's route-major path around
    # selective_scan's Triton kernels (here in the interpreter; tiny shapes).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, inputs = make_inputs(1, 2, 3, 2, d_state)

    def run(**kw):
        args = [kw[k] for k in NAMES]
        return torch.ops.vmamba_mm.ss2d_scan_fwd(*args, True, "torch", "triton", True)[0]

    assert_matches_composition(run, inputs, *TOLERANCES[torch.float32])


def _op_with_gradcheck(backend_args):
    def run(*tensors):
        return torch.ops.vmamba_mm.ss2d_scan_fwd(*tensors, True, *backend_args)[0]

    return run


@pytest.mark.parametrize("batch,height,width,d_state,keep", [
    (2, 3, 2, 1, True),  # step path
    (1, 1, 7, 1, True),  # step path with a padded chunk
    (1, 2, 3, 1, False),  # step path, the backward recomputing the states
    (1, 2, 3, 2, True),  # route-major path around the selective scan's torch backend
])
def test_torch_backend_float64_gradcheck(batch, height, width, d_state, keep):
    # The public function accepts fp32/bf16/fp16 only; the custom op it calls computes float64
    # inputs in float64, which is what gradcheck needs.
    _, inputs = make_inputs(batch, height, width, 2, d_state, dtype=torch.float64)
    args = [inputs[k].detach().double().contiguous().requires_grad_() for k in NAMES]
    assert torch.autograd.gradcheck(_op_with_gradcheck(("torch", "torch", keep)), args,
                                    eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("d_state,keep", [(1, True), (1, False), (3, True), (3, False)])
def test_forward_and_fake_agree_on_shapes_and_dtypes(backend, d_state, keep):
    _, inputs = make_inputs(2, 3, 5, 4, d_state)
    values = {k: v.detach() for k, v in inputs.items()}
    module = torch_ss2d if backend == "torch" else triton_ss2d
    forward = getattr(module, f"{backend}_ss2d_forward")
    fake = getattr(module, f"{backend}_ss2d_forward_fake")
    y, saved = forward(*values.values(), True, "torch", keep)
    meta = [v.to("meta") for v in values.values()]
    y_fake, saved_fake = fake(*meta, True, "torch", keep)
    assert (y.shape, y.dtype) == (y_fake.shape, y_fake.dtype) == ((2, 3, 5, 4), torch.float32)
    assert [(t.shape, t.dtype) for t in saved] == [(t.shape, t.dtype) for t in saved_fake]
    assert bool(saved) == keep


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("d_state", [1, 3])
def test_backward_with_and_without_saved_tensors_agree(backend, d_state):
    _, inputs = make_inputs(2, 6, 5, 3, d_state)
    values = [v.detach() for v in inputs.values()]
    dy = torch.randn(2, 6, 5, 3)
    module = torch_ss2d if backend == "torch" else triton_ss2d
    forward = getattr(module, f"{backend}_ss2d_forward")
    backward = getattr(module, f"{backend}_ss2d_backward")
    _, saved = forward(*values, True, "torch", True)
    copies = [t.clone() for t in saved]
    with_saved = backward(dy, *values, True, "torch", *saved)
    recomputed = backward(dy, *values, True, "torch")
    for got, want in zip(with_saved, recomputed):
        torch.testing.assert_close(got, want)
    for before, after in zip(copies, saved):
        assert torch.equal(before, after), "the backward modified a saved tensor"


class _Recorder(TorchDispatchMode):
    """Records the aten ops that read a given storage (other than through views)."""

    VIEWS = ("view", "as_strided", "permute", "select", "slice", "split", "unsqueeze", "t",
             "transpose", "alias", "detach", "expand")

    def __init__(self, storages):
        super().__init__()
        self.storages = storages
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if name not in self.VIEWS and any(
            t.untyped_storage().data_ptr() in self.storages for t in tensors
        ):
            self.reads.append(name)
        return func(*args, **kwargs)


def test_step_path_reads_the_views_where_they_lie():
    # x (a channels_last view) and delta/B/C (views into one GEMM output) are read by the
    # gathers into the step layout, never copied whole first.
    _, inputs = make_inputs(1, 4, 6, 3, 1)
    values = {k: v.detach() for k, v in inputs.items()}
    storages = {values[k].untyped_storage().data_ptr() for k in ("x", "delta")}
    with _Recorder(storages) as recorder:
        torch_ss2d.torch_ss2d_forward(*values.values(), True, "torch", False)
    assert set(recorder.reads) <= {"index_select", "addcmul_"}, recorder.reads
    assert recorder.reads.count("index_select") == 4  # x, delta, B, C: one gather each


def test_route_layout_helpers_move_data_exactly_like_cross_scan_and_merge():
    ys = torch.randn(2, K, 4, 15)
    merged = cross_merge(ys.view(2, K, 4, 5, 3), backend="torch")  # [B, C, L]
    assert torch.equal(routes.merge_routes(ys, 5, 3), merged.view(2, 4, 5, 3).permute(0, 2, 3, 1))
    per_route = torch.randn(2, 5, 3, K, 4)  # [B, H, W, K, C]
    there = torch.stack([cross_scan_channel_last(per_route[:, :, :, k], backend="torch")[:, k]
                         for k in range(K)], dim=1)  # route k of cross_scan of slot k
    assert torch.equal(routes.from_routes(there, 5, 3), per_route)
    image = per_route[:, :, :, 0]
    with Scratch(image.device) as scratch:
        assert torch.equal(torch_ss2d._in_route_order(per_route, scratch), there.transpose(2, 3))
        assert torch.equal(torch_ss2d._in_route_order(image, scratch),
                           cross_scan_channel_last(image, backend="torch").transpose(2, 3))


def test_auto_backend_on_cpu_runs_the_torch_backend_around_the_torch_scan(monkeypatch):
    calls = []
    real = torch_ss2d.torch_ss2d_forward

    def spy(*args):
        calls.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(torch_ss2d, "torch_ss2d_forward", spy)
    _, inputs = make_inputs(1, 3, 4, 2, 1)
    with torch.no_grad():
        y = ss2d_scan(**inputs)
    assert calls == [("torch", False)]
    torch.testing.assert_close(y, ss2d_scan_naive(**inputs), rtol=1e-5, atol=1e-5)


def test_naive_backend_is_the_reference():
    _, inputs = make_inputs(2, 3, 4, 2, 2)
    with torch.no_grad():
        assert torch.equal(ss2d_scan(**inputs, backend="naive"), ss2d_scan_naive(**inputs))


def _bad(name, fn):
    return pytest.param(fn, name, id=name)


BAD_INPUTS = [
    _bad("x", lambda v: v.update(x=v["x"][0])),
    _bad("x", lambda v: v.update(x=v["x"].tolist())),
    _bad("x", lambda v: v.update(x=v["x"][:, :0])),
    _bad("x", lambda v: v.update(x=v["x"].double(), delta=v["delta"].double(),
                                 B=v["B"].double(), C=v["C"].double())),
    _bad("delta", lambda v: v.update(delta=v["delta"][:, :, :, :3])),
    _bad("delta", lambda v: v.update(delta=v["delta"][..., 0])),
    _bad("delta", lambda v: v.update(delta=v["delta"].half())),
    _bad("A", lambda v: v.update(A=v["A"][:-1])),
    _bad("A", lambda v: v.update(A=v["A"].double())),
    _bad("B", lambda v: v.update(B=v["B"][:, :-1])),
    _bad("B", lambda v: v.update(B=v["B"].bfloat16())),
    _bad("C", lambda v: v.update(C=v["C"][..., :1].expand(*v["C"].shape[:-1], 3))),
    _bad("D", lambda v: v.update(D=v["D"][:-1])),
    _bad("D", lambda v: v.update(D=v["D"].half())),
    _bad("delta_bias", lambda v: v.update(delta_bias=v["delta_bias"][None])),
    _bad("delta_softplus", lambda v: v.update(delta_softplus=1)),
    _bad("delta", lambda v: v.update(delta=v["delta"].to("meta"))),
]


@pytest.mark.parametrize("corrupt,name", BAD_INPUTS)
def test_bad_inputs_raise_an_error_naming_the_argument(corrupt, name):
    _, inputs = make_inputs(1, 3, 4, 2, 2)
    values = {k: v.detach() for k, v in inputs.items()}
    corrupt(values)
    with pytest.raises((ValueError, TypeError), match=name):
        ss2d_scan(**values)


def test_unknown_backend_is_rejected():
    _, inputs = make_inputs(1, 3, 4, 2, 1)
    with pytest.raises(ValueError, match="backend"):
        ss2d_scan(**inputs, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "naive", TRITON])
@pytest.mark.parametrize("d_state", [1, 16])
def test_forward_and_backward_read_no_tensor_values_on_the_host(backend, d_state):
    def run():
        _, inputs = make_inputs(2, 3, 5, 2, d_state)
        y = ss2d_scan(**inputs, backend=backend)
        y.backward(torch.ones_like(y))

    assert_no_host_reads(run)


@pytest.mark.triton
def test_route_major_path_around_the_triton_scan_reads_no_tensor_values(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def run():
        _, inputs = make_inputs(1, 2, 3, 2, 2)
        args = [inputs[k] for k in NAMES]
        y = torch.ops.vmamba_mm.ss2d_scan_fwd(*args, True, "torch", "triton", True)[0]
        y.backward(torch.ones_like(y))

    assert_no_host_reads(run)


@pytest.mark.parametrize("channel_first", [True, False])
def test_ss2d_forward_and_backward_read_no_tensor_values_on_the_host(channel_first):
    op = SS2D(8, d_state=1, channel_first=channel_first, scan_backend="torch")
    x = torch.randn((1, 8, 3, 4) if channel_first else (1, 3, 4, 8), requires_grad=True)
    assert_no_host_reads(lambda: op(x).square().sum().backward())


def test_ss2d_runs_neither_cross_scan_nor_cross_merge(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("SS2D called cross_scan / cross_merge")

    monkeypatch.setattr(cross_interface, "_dispatch", refuse)
    for channel_first, d_state in ((True, 1), (False, 4)):
        op = SS2D(8, d_state=d_state, channel_first=channel_first, scan_backend="auto")
        x = torch.randn((1, 8, 3, 4) if channel_first else (1, 3, 4, 8), requires_grad=True)
        op(x).sum().backward()
        assert x.grad is not None


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("channel_first,gated,d_state", [(True, False, 1), (False, True, 4)])
def test_compiled_ss2d_with_fullgraph_matches_eager_in_output_and_gradients(
    backend, channel_first, gated, d_state
):
    torch.manual_seed(0)
    op = SS2D(8, d_state=d_state, gated=gated, channel_first=channel_first, scan_backend=backend)
    x = torch.randn((2, 8, 5, 7) if channel_first else (2, 5, 7, 8))
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    compiled_grads = [p.grad.clone() for p in op.parameters()]
    op.zero_grad()
    ref = op(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip(compiled_grads, (p.grad for p in op.parameters())):
        torch.testing.assert_close(got, want)


def test_export_records_the_four_route_scan_as_one_custom_op():
    op = SS2D(8, d_state=1, channel_first=True, scan_backend="torch").eval()
    x = torch.randn(1, 8, 4, 6)
    program = torch.export.export(op, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if "scan" in t] == ["vmamba_mm.ss2d_scan_fwd.default"]
    assert not any("cross" in t or "flip" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), op(x))


def test_backends_table_maps_every_public_name():
    _, inputs = make_inputs(1, 2, 2, 2, 1)
    x = inputs["x"]
    assert interface._resolve_backend("torch", x) == ("torch", "torch")
    assert interface._resolve_backend("auto", x) == ("torch", "torch")  # CPU: the torch scan
    assert interface._resolve_backend("naive", x) == ("naive", "")
    if HAS_TRITON:  # the interpreter is on for the test session
        assert interface._resolve_backend("triton", x) == ("triton", "")


@pytest.mark.gpu
@pytest.mark.parametrize("d_state", [1, 16])
def test_auto_backend_on_cuda_matches_the_composition(d_state):
    _, inputs = make_inputs(2, 9, 7, 4, d_state)
    cuda = {k: None if v is None else v.detach().cuda().requires_grad_()
            for k, v in inputs.items()}
    assert interface._resolve_backend("auto", cuda["x"]) == ("triton", "")
    dy = torch.randn(2, 9, 7, 4, device="cuda")
    y, grads = output_and_grads(lambda **kw: ss2d_scan(**kw, backend="auto"), cuda, dy)
    again = output_and_grads(lambda **kw: ss2d_scan(**kw, backend="auto"), cuda, dy)
    assert torch.equal(y, again[0]), "the fused kernels must be bitwise repeatable"
    assert all(torch.equal(grads[k], again[1][k]) for k in grads)
    reference = detached(inputs)
    y_ref, g_ref = output_and_grads(composition, reference, dy.cpu())
    assert_close(y.cpu(), y_ref.contiguous(), *TOLERANCES[torch.float32], "y")
    for name in g_ref:
        assert_close(grads[name].cpu(), g_ref[name], *TOLERANCES[torch.float32], "d" + name)


@pytest.mark.gpu
@pytest.mark.parametrize("d_state", [1, 16])
def test_chunk_parallel_schedule_on_cuda_matches_the_composition(monkeypatch, d_state):
    # One channel block at batch 1 leaves the GPU idle; 24 x 24 = 576 positions give 9 (N = 1)
    # or 72 (N = 16) route chunks, so the launcher picks the chunk-parallel schedule itself.
    chosen = []
    original = triton_ss2d.use_chunk_parallel
    monkeypatch.setattr(triton_ss2d, "use_chunk_parallel",
                        lambda *args: chosen.append(original(*args)) or chosen[-1])
    _, inputs = make_inputs(1, 24, 24, 16, d_state)
    cuda = {k: None if v is None else v.detach().cuda().requires_grad_()
            for k, v in inputs.items()}
    dy = torch.randn(1, 24, 24, 16, device="cuda")
    y, grads = output_and_grads(lambda **kw: ss2d_scan(**kw, backend="triton"), cuda, dy)
    assert chosen and all(chosen), "the chunk-parallel schedule was not chosen"
    y_ref, g_ref = output_and_grads(composition, detached(inputs), dy.cpu())
    assert_close(y.cpu(), y_ref.contiguous(), *TOLERANCES[torch.float32], "y")
    for name in g_ref:
        assert_close(grads[name].cpu(), g_ref[name], *TOLERANCES[torch.float32], "d" + name)


def test_flop_and_activation_handles_count_the_four_routes_under_the_scan_operator():
    analysis = pytest.importorskip("mmengine.analysis")
    op = SS2D(8, d_state=2, ssm_ratio=2.0, channel_first=False, scan_backend="torch").eval()
    x = torch.randn(1, 5, 3, 8)
    flops = analysis.FlopAnalyzer(op, (x,)).set_op_handle(**SCAN_FLOP_HANDLES)
    flops.unsupported_ops_warnings(False)
    # The scan over K*D = 4 * 16 channels and L = 15 positions, with the D skip.
    assert flops.by_operator()["selective_scan_fwd"] == selective_scan_flops(1, 15, 64, 2)
    assert "vmamba_mm::ss2d_scan_fwd" not in flops.unsupported_ops()
    acts = analysis.ActivationAnalyzer(op, (x,)).set_op_handle(**SCAN_ACTIVATION_HANDLES)
    acts.unsupported_ops_warnings(False)
    assert acts.by_operator()["selective_scan_fwd"] == 64 * 15
