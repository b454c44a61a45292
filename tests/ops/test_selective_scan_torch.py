"""The "torch" selective-scan backend against the naive reference: output and every gradient."""

import math

import pytest
import torch

from vmamba_mm.ops.selective_scan import selective_scan, selective_scan_naive
from vmamba_mm.ops.selective_scan.step_layout import chunking
from vmamba_mm.ops.selective_scan.torch_scan import (
    torch_scan_backward,
    torch_scan_forward,
    torch_scan_forward_fake,
)
from vmamba_mm.ops.selective_scan.torch_scan_single_state import single_state_chunking

GRAD_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")
# Tolerances as mamba_ssm's tests use them; atol is relative to the reference's largest entry,
# since gradients are sums over many steps.
TOLERANCES = {
    torch.float32: (6e-4, 2e-3),
    torch.bfloat16: (3e-2, 5e-2),
    torch.float16: (3e-3, 5e-3),
}


def make_inputs(
    batch, groups, per_group, length, d_state, *, with_D, with_bias, softplus,
    dtype=torch.float32, seed=0,
):
    """Random scan inputs shaped like VMamba's: A = -exp(.), positive time steps."""
    gen = torch.Generator().manual_seed(seed)
    channels = groups * per_group

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if softplus:
        delta = randn(batch, channels, length) * 0.5 - 1.0
    else:
        delta = torch.rand(batch, channels, length, generator=gen) * 0.5
    inputs = {
        "u": randn(batch, channels, length).to(dtype),
        "delta": delta.to(dtype),
        "A": -torch.exp(torch.rand(channels, d_state, generator=gen) * 2.0 - 1.0),
        "B": randn(batch, groups, d_state, length).to(dtype),
        "C": randn(batch, groups, d_state, length).to(dtype),
        "D": randn(channels) if with_D else None,
        "delta_bias": (torch.rand(channels, generator=gen) * 0.2) if with_bias else None,
    }
    return inputs, softplus


def grads_of(fn, inputs, softplus, dy):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    y = fn(**args, delta_softplus=softplus)
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy)
    return y, dict(zip(names, grads))


def assert_close(actual, expected, rtol, atol, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs() - rtol * expected.abs()
    worst = err.max().item()
    assert worst <= atol * scale, f"{what}: max error {worst:.3g} > {atol * scale:.3g}"


def torch_backend(**kw):
    return selective_scan(**kw, backend="torch")


# (batch, length, d_state, with_D, with_bias, softplus): every L in the list appears with
# both state sizes, and the optional inputs are switched on and off across the cases.
CASES = [
    (1, 1, 1, True, True, True),
    (2, 1, 16, False, False, False),
    (2, 2, 1, False, True, True),
    (1, 2, 16, True, False, True),
    (1, 63, 1, True, False, False),
    (2, 63, 16, True, True, True),
    (2, 100, 1, True, True, True),
    (1, 100, 16, False, True, False),
    (2, 257, 1, False, False, True),
    (1, 257, 16, True, True, True),
]


@pytest.mark.parametrize("batch,length,d_state,with_D,with_bias,softplus", CASES)
def test_torch_backend_matches_naive_output_and_every_gradient(
    batch, length, d_state, with_D, with_bias, softplus
):
    inputs, softplus = make_inputs(
        batch, 4, 3, length, d_state, with_D=with_D, with_bias=with_bias, softplus=softplus
    )
    dy = torch.randn(batch, 12, length, generator=torch.Generator().manual_seed(1))
    y_ref, g_ref = grads_of(selective_scan_naive, inputs, softplus, dy)
    y, g = grads_of(torch_backend, inputs, softplus, dy)
    rtol, atol = TOLERANCES[torch.float32]
    assert_close(y, y_ref, rtol, atol, "y")
    assert set(g) == set(g_ref) and len(g) == 5 + with_D + with_bias
    for name in g_ref:
        assert_close(g[name], g_ref[name], rtol, atol, "d" + name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length,d_state", [(63, 16), (100, 1)])
def test_torch_backend_low_precision_inputs_match_naive(dtype, length, d_state):
    inputs, softplus = make_inputs(
        2, 4, 3, length, d_state, with_D=True, with_bias=True, softplus=True, dtype=dtype
    )
    dy = torch.randn(2, 12, length, generator=torch.Generator().manual_seed(2))
    y_ref, g_ref = grads_of(selective_scan_naive, inputs, softplus, dy)
    y, g = grads_of(torch_backend, inputs, softplus, dy)
    assert y.dtype == torch.float32
    rtol, atol = TOLERANCES[dtype]
    assert_close(y, y_ref, rtol, atol, "y")
    for name in g_ref:
        assert g[name].dtype == inputs[name].dtype
        assert_close(g[name], g_ref[name], rtol, atol, "d" + name)


class _TorchScan(torch.autograd.Function):
    """The backend's two functions wired as an autograd Function (float64 gradcheck)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus):
        ctx.softplus = softplus
        y, saved = torch_scan_forward(u, delta, A, B, C, D, delta_bias, softplus)
        ctx.n_inputs = 7
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        inputs, saved = ctx.saved_tensors[:7], ctx.saved_tensors[7:]
        return (*torch_scan_backward(dy, *inputs, ctx.softplus, *saved), None)


@pytest.mark.parametrize("batch,length,d_state,softplus", [(2, 7, 3, True), (1, 10, 1, False)])
def test_torch_backend_float64_gradcheck(batch, length, d_state, softplus):
    inputs, softplus = make_inputs(
        batch, 2, 3, length, d_state, with_D=True, with_bias=True, softplus=softplus,
        dtype=torch.float64,
    )
    args = [
        inputs[k].double().requires_grad_()
        for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")
    ]
    assert torch.autograd.gradcheck(
        lambda *a: _TorchScan.apply(*a, softplus), args, eps=1e-6, atol=1e-5, fast_mode=True
    )


def test_torch_backend_is_finite_and_exact_on_long_sequences_with_vanishing_decay():
    """L = 16384 with decays that underflow to exactly 0 and others that barely decay."""
    length = 16384
    inputs, softplus = make_inputs(
        1, 4, 1, length, 16, with_D=True, with_bias=True, softplus=True, seed=3
    )
    A = -torch.exp(torch.linspace(-6.0, 6.0, 4 * 16)).view(4, 16)  # from -0.0025 to -403
    A[0, 0] = 0.0  # no decay at all
    inputs["A"] = A
    inputs["delta"] = inputs["delta"] * 4 + 6  # time steps up to ~10: exp(dt * A) hits 0
    dy = torch.randn(1, 4, length, generator=torch.Generator().manual_seed(4))
    y, g = grads_of(torch_backend, inputs, softplus, dy)
    assert bool(torch.isfinite(y).all())
    for name, grad in g.items():
        assert bool(torch.isfinite(grad).all()), f"d{name} is not finite"
    with torch.no_grad():
        y_ref = selective_scan_naive(**inputs, delta_softplus=softplus)
    assert_close(y, y_ref, *TOLERANCES[torch.float32], "y")


@pytest.mark.parametrize("length,d_state", [(37, 4), (37, 1), (1, 1)])
def test_torch_backend_forward_and_fake_agree_on_shapes_and_dtypes(length, d_state):
    inputs, softplus = make_inputs(
        2, 4, 3, length, d_state, with_D=True, with_bias=False, softplus=True
    )
    y, saved = torch_scan_forward(**inputs, delta_softplus=softplus)
    meta = {k: (v.to("meta") if v is not None else None) for k, v in inputs.items()}
    y_fake, saved_fake = torch_scan_forward_fake(**meta, delta_softplus=softplus)
    assert y.shape == y_fake.shape == (2, 12, length)
    assert y.dtype == y_fake.dtype == torch.float32
    assert [(t.shape, t.dtype) for t in saved] == [(t.shape, t.dtype) for t in saved_fake]
    assert len(saved) == (2 if d_state == 1 else 1)


def test_torch_backend_backward_with_and_without_saved_tensors_agree():
    inputs, softplus = make_inputs(2, 4, 3, 50, 1, with_D=True, with_bias=True, softplus=True)
    dy = torch.randn(2, 12, 50)
    _, saved = torch_scan_forward(**inputs, delta_softplus=softplus)
    copies = [t.clone() for t in saved]
    with_saved = torch_scan_backward(dy, *inputs.values(), softplus, *saved)
    recomputed = torch_scan_backward(dy, *inputs.values(), softplus)
    for got, want in zip(with_saved, recomputed):
        torch.testing.assert_close(got, want)
    for before, after in zip(copies, saved):
        assert torch.equal(before, after), "the backward modified a saved tensor"


@pytest.mark.parametrize("d_state", [1, 16])
def test_torch_backend_accepts_non_contiguous_inputs(d_state):
    inputs, softplus = make_inputs(2, 4, 3, 40, d_state, with_D=True, with_bias=True,
                                   softplus=True)
    # Same values, strided storage: every other element of a twice-as-long last axis.
    def spread(x):
        return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]

    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    args.update({k: spread(leaves[k]) for k in ("u", "delta", "B", "C")})
    assert not args["u"].is_contiguous() and not args["B"].is_contiguous()
    dy = torch.randn(2, 12, 40, generator=torch.Generator().manual_seed(4))
    y = torch_backend(**args, delta_softplus=softplus)
    grads = torch.autograd.grad(y, list(leaves.values()), spread(dy))
    y_ref, g_ref = grads_of(torch_backend, inputs, softplus, dy)
    torch.testing.assert_close(y, y_ref)
    for name, got in zip(leaves, grads):
        torch.testing.assert_close(got, g_ref[name])


def test_torch_backend_does_not_modify_its_inputs():
    inputs, softplus = make_inputs(1, 4, 2, 30, 16, with_D=True, with_bias=True, softplus=True)
    before = {k: v.clone() for k, v in inputs.items()}
    dy = torch.randn(1, 8, 30)
    y, _ = torch_scan_forward(**inputs, delta_softplus=softplus)
    torch_scan_backward(dy, *inputs.values(), softplus)
    for name, value in inputs.items():
        assert torch.equal(value, before[name]), f"{name} was modified"


@pytest.mark.parametrize("d_state", [2, 16])
def test_torch_backend_in_channel_blocks_matches_naive(monkeypatch, d_state):
    """Large N > 1 problems run block by block (channels within one group); force tiny blocks."""
    from vmamba_mm.ops.selective_scan import torch_scan

    monkeypatch.setattr(torch_scan, "_BLOCK_ELEMENTS", 2 * d_state * 40)
    inputs, softplus = make_inputs(2, 4, 5, 33, d_state, with_D=True, with_bias=True,
                                   softplus=True)
    assert len(torch_scan._channel_blocks(inputs["u"], inputs["A"], inputs["B"])) > 4
    dy = torch.randn(2, 20, 33, generator=torch.Generator().manual_seed(5))
    y_ref, g_ref = grads_of(selective_scan_naive, inputs, softplus, dy)
    y, g = grads_of(torch_backend, inputs, softplus, dy)
    rtol, atol = TOLERANCES[torch.float32]
    assert_close(y, y_ref, rtol, atol, "y")
    for name in g_ref:
        assert_close(g[name], g_ref[name], rtol, atol, "d" + name)


def test_torch_backend_with_one_state_is_finite_and_exact_with_vanishing_decay():
    """N = 1 keeps the forward's states for the backward: same extreme decays as above."""
    length = 4099  # not a multiple of the chunk length: the last chunk is padded
    inputs, softplus = make_inputs(
        1, 4, 2, length, 1, with_D=True, with_bias=True, softplus=True, seed=6
    )
    inputs["A"] = -torch.exp(torch.linspace(-6.0, 6.0, 8)).view(8, 1)
    inputs["A"][3, 0] = 0.0
    inputs["delta"] = inputs["delta"] * 4 + 6
    dy = torch.randn(1, 8, length, generator=torch.Generator().manual_seed(7))
    y_ref, g_ref = grads_of(selective_scan_naive, inputs, softplus, dy)
    y, g = grads_of(torch_backend, inputs, softplus, dy)
    rtol, atol = TOLERANCES[torch.float32]
    assert_close(y, y_ref, rtol, atol, "y")
    for name in g_ref:
        assert bool(torch.isfinite(g[name]).all()), f"d{name} is not finite"
        assert_close(g[name], g_ref[name], rtol, atol, "d" + name)


def _naive_states(inputs, length, d_state):
    """Every step's state of the recurrence, [batch, K*D, N, L], and the time steps dt."""
    with torch.no_grad():
        A, dt = inputs["A"], torch.nn.functional.softplus(
            inputs["delta"] + inputs["delta_bias"][None, :, None]
        )
        B = inputs["B"].repeat_interleave(3, dim=1)
        h = torch.zeros(2, 12, d_state)
        states = []
        for t in range(length):
            h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * inputs["u"][..., t])[
                ..., None
            ] * B[..., t]
            states.append(h)
    return torch.stack(states, -1), dt


def test_torch_backend_saves_the_entering_states_for_more_than_one_state():
    """N > 1 saves only the states entering each chunk, [batch, K*D, N, nc]."""
    from vmamba_mm.ops.selective_scan import torch_scan

    length, d_state = 90, 16
    inputs, softplus = make_inputs(2, 4, 3, length, d_state, with_D=True, with_bias=True,
                                   softplus=True)
    _, saved = torch_scan_forward(**inputs, delta_softplus=softplus)
    chunk, n_chunks = torch_scan._chunking(length)
    assert n_chunks > 1
    (entering,) = saved
    assert entering.shape == (2, 12, d_state, n_chunks)
    assert bool((entering[..., 0] == 0).all()), "nothing enters the first chunk"
    # The state entering chunk j is the naive recurrence's state just before its first step.
    states, _ = _naive_states(inputs, length, d_state)
    want = states[..., chunk - 1 : -1 : chunk]
    torch.testing.assert_close(entering[..., 1:], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [90, 97])
def test_torch_backend_saves_dt_and_every_state_for_one_state(length):
    """N = 1 saves dt and the states in the step layout [T, batch, K*D, nc], zero-padded."""
    from vmamba_mm.ops.selective_scan import step_layout

    inputs, softplus = make_inputs(2, 4, 3, length, 1, with_D=True, with_bias=True,
                                   softplus=True)
    _, saved = torch_scan_forward(**inputs, delta_softplus=softplus)
    chunk, n_chunks = single_state_chunking(length)
    assert n_chunks > 1 and chunk * n_chunks >= length
    assert [tuple(t.shape) for t in saved] == [(chunk, 2, 12, n_chunks)] * 2
    states, dt = _naive_states(inputs, length, 1)

    def natural(x_l):  # [T, b, K*D, nc] -> [b, K*D, L]
        return step_layout.from_steps(x_l, length, x_l.dtype)

    dt_l, h_l = saved
    torch.testing.assert_close(natural(dt_l), dt)
    torch.testing.assert_close(natural(h_l), states[:, :, 0], rtol=1e-4, atol=1e-5)
    padded = chunk * n_chunks - length  # the padded steps are exact no-ops
    assert bool((dt_l[chunk - padded :, ..., -1] == 0).all())


@pytest.mark.parametrize("length", [1, 2, 5, 49, 63, 196, 257, 784, 3136, 16384])
def test_chunking_covers_the_sequence_with_chunks_near_the_target(length):
    for target, chunks in ((length**0.5, chunking(length, length**0.5)),
                           (1.2 * length ** (1 / 3), single_state_chunking(length))):
        chunk, n_chunks = chunks
        assert 1 <= chunk <= length
        assert (n_chunks - 1) * chunk < length <= chunk * n_chunks
        assert chunk <= max(1, 2 * target) and (chunk >= target / 2 or chunk == length)
        if length in (49, 196, 784, 3136, 16384):  # a divisor near the target: no padding
            assert chunk * n_chunks == length


def test_torch_backend_blocks_reuse_scratch_memory_without_stale_values(monkeypatch):
    """Blocks of different sizes share scratch buffers; results still match unblocked ones."""
    from vmamba_mm.ops.selective_scan import scratch, torch_scan

    inputs, softplus = make_inputs(1, 2, 7, 45, 16, with_D=False, with_bias=True, softplus=False)
    dy = torch.randn(1, 14, 45, generator=torch.Generator().manual_seed(9))
    y_one, saved_one = torch_scan_forward(**inputs, delta_softplus=softplus)
    grads_one = torch_scan_backward(dy, *inputs.values(), softplus, *saved_one)
    taken = []
    real_take = scratch.Scratch.take

    def spy(self, shape, dtype):
        out = real_take(self, shape, dtype)
        taken.append(out.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(scratch.Scratch, "take", spy)
    monkeypatch.setattr(torch_scan, "_BLOCK_ELEMENTS", 3 * 16 * math.prod(torch_scan._chunking(45)))
    blocks = torch_scan._channel_blocks(inputs["u"], inputs["A"], inputs["B"])
    assert [last - first for _, first, last in blocks] == [3, 3, 1, 3, 3, 1]
    monkeypatch.setattr(scratch._local, "buffers", [], raising=False)  # an empty pool
    y, saved = torch_scan_forward(**inputs, delta_softplus=softplus)
    # Every block takes the same buffers: the later ones reuse the first one's memory.
    assert len(taken) % len(blocks) == 0
    assert len(set(taken)) <= len(taken) // len(blocks)
    taken.clear()
    grads = torch_scan_backward(dy, *inputs.values(), softplus, *saved)
    assert len(set(taken)) <= len(taken) // len(blocks)
    torch.testing.assert_close(y, y_one)
    for got, want in zip(grads, grads_one):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want)
