"""The Triton selective scan (forward and backward kernels) against the naive reference.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is imported), which executes every kernel step in Python: the shapes here are tiny
and the cases are chosen so each one exercises something different (ragged chunks, several
chunks in both schedules, several channel blocks per group, the persistent backward grid, every
optional input, every input dtype). ``gpu`` cases repeat the comparison at real sizes on CUDA.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from vmamba_mm.ops.selective_scan.naive import selective_scan_naive  # noqa: E402
from vmamba_mm.ops.selective_scan.triton_scan import (  # noqa: E402
    triton_scan_backward,
    triton_scan_forward,
    triton_scan_forward_fake,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(rtol=6e-4, atol=2e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=5e-2),
    torch.float16: dict(rtol=3e-2, atol=5e-2),
}
GRAD_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")


def make_inputs(batch, groups, d_group, d_state, length, dtype, with_d, with_bias, softplus,
                seed=0, device=DEVICE, a_scale=1.0, delta_shift=0.0):
    """Random scan inputs with A < 0; u/delta/B/C in `dtype`, A/D/delta_bias fp32.

    Without softplus, delta and delta_bias are made non-negative (a negative time step would make
    the recurrence grow without bound, in the reference too).
    """
    gen = torch.Generator().manual_seed(seed)
    channels = groups * d_group

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift)

    u = rand(batch, channels, length).to(dtype)
    delta = rand(batch, channels, length, scale=0.5, shift=delta_shift)
    delta = (delta if softplus else delta.abs()).to(dtype)
    A = -torch.exp(rand(channels, d_state)) * a_scale
    B = rand(batch, groups, d_state, length).to(dtype)
    C = rand(batch, groups, d_state, length).to(dtype)
    D = rand(channels) if with_d else None
    bias = rand(channels, scale=0.5) if with_bias else None
    if bias is not None and not softplus:
        bias = bias.abs()
    dy = rand(batch, channels, length)
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=bias)
    tensors = {k: (v.to(device) if v is not None else None) for k, v in tensors.items()}
    return tensors, dy.to(device)


def naive_with_grads(inputs, dy, softplus):
    """Output and gradients of the reference, each gradient in its input's dtype."""
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = selective_scan_naive(**leaves, delta_softplus=softplus)
    keys = [k for k in ("u", "delta", "A", "B", "C", "D", "delta_bias") if leaves[k] is not None]
    grads = torch.autograd.grad(y, [leaves[k] for k in keys], dy)
    by_key = dict(zip(keys, grads))
    ordered = [by_key.get(k) for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    return y.detach(), ordered


def triton_with_grads(inputs, dy, softplus, fwd_kwargs=None, bwd_kwargs=None):
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    y, saved = triton_scan_forward(*args, softplus, **(fwd_kwargs or {}))
    grads = triton_scan_backward(dy, *args, softplus, *saved, **(bwd_kwargs or {}))
    return y, saved, grads


def assert_matches_naive(inputs, dy, softplus, dtype, fwd_kwargs=None, bwd_kwargs=None):
    y_ref, grads_ref = naive_with_grads(inputs, dy, softplus)
    y, saved, grads = triton_with_grads(inputs, dy, softplus, fwd_kwargs, bwd_kwargs)
    tol = TOL[dtype]
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **tol)
    expected_dtypes = dict(
        du=inputs["u"].dtype, ddelta=inputs["delta"].dtype, dA=torch.float32,
        dB=inputs["B"].dtype, dC=inputs["C"].dtype, dD=torch.float32, ddelta_bias=torch.float32,
    )
    for name, got, ref in zip(GRAD_NAMES, grads, grads_ref):
        if ref is None:
            assert got is None, f"{name} should be None when its input is None"
            continue
        assert got.dtype == expected_dtypes[name], name
        assert got.shape == ref.shape, name
        torch.testing.assert_close(
            got.float(), ref.float(), **tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    return y, saved, grads


# (batch, d_group, d_state, L, dtype, with_d, with_bias, softplus, fwd kwargs, bwd kwargs)
INTERPRETER_CASES = {
    "L1_state16_fp32_all_options": (
        2, 3, 16, 1, torch.float32, True, True, True, {}, {}),
    "L2_state1_fp16_no_options": (
        1, 3, 1, 2, torch.float16, False, False, False, {}, {}),
    "L63_state16_fp32_sequential_chunks": (
        1, 3, 16, 63, torch.float32, True, True, True, dict(chunk_size=16), {}),
    "L63_state1_bf16_parallel_chunks_odd_grid": (
        1, 5, 1, 63, torch.bfloat16, True, False, False,
        dict(chunk_size=16, chunk_parallel=True), dict(chunk_parallel=True, max_programs=3)),
    "L100_state16_bf16_25_sequential_chunks": (
        1, 3, 16, 100, torch.bfloat16, False, True, True, dict(chunk_size=4), {}),
    "L257_state1_fp32_sequential_chunks": (
        1, 3, 1, 257, torch.float32, True, True, True, dict(chunk_size=16), {}),
    "L9_state16_fp16_two_channel_blocks_per_group": (
        2, 3, 16, 9, torch.float16, True, True, False,
        dict(chunk_size=4, chunk_parallel=True, block_channels=2),
        dict(chunk_parallel=True, block_channels=2, max_programs=5)),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", list(INTERPRETER_CASES), ids=list(INTERPRETER_CASES))
def test_triton_forward_and_every_gradient_match_naive(case):
    batch, d_group, d_state, length, dtype, with_d, with_bias, softplus, fkw, bkw = (
        INTERPRETER_CASES[case]
    )
    inputs, dy = make_inputs(batch, 4, d_group, d_state, length, dtype, with_d, with_bias, softplus)
    assert_matches_naive(inputs, dy, softplus, dtype, fkw, bkw)


@pytest.mark.triton
def test_triton_checkpoints_match_the_state_at_each_chunk_start():
    inputs, _ = make_inputs(1, 4, 2, 3, 20, torch.float32, False, True, True)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    _, (seq,) = triton_scan_forward(*args, True, chunk_size=8, chunk_parallel=False)
    _, (par,) = triton_scan_forward(*args, True, chunk_size=8, chunk_parallel=True)
    assert seq.shape == (1, 8, 3, 3)
    # State after t steps = the naive output with C selecting state n and no skip term.
    u, delta, A, B = inputs["u"], inputs["delta"], inputs["A"], inputs["B"]
    for n in range(3):
        onehot = torch.zeros_like(B)
        onehot[:, :, n] = 1.0
        states = selective_scan_naive(u, delta, A, B, onehot, None, inputs["delta_bias"], True)
        expected = torch.stack(
            [torch.zeros_like(states[..., 0]), states[..., 7], states[..., 15]], dim=-1
        )
        torch.testing.assert_close(seq[:, :, n], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(par[:, :, n], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_triton_stays_finite_and_exact_with_vanishing_decay():
    # exp(delta * A) underflows to exactly 0 (A down to -1e4, delta up to ~40 through the linear
    # part of softplus): a backward that divided by the decay would produce inf/NaN here.
    inputs, dy = make_inputs(
        1, 4, 2, 4, 48, torch.float32, True, True, True, a_scale=3e3, delta_shift=2.0, seed=3
    )
    inputs["delta"][..., ::7] += 40.0
    y, _, grads = assert_matches_naive(
        inputs, dy, True, torch.float32,
        dict(chunk_size=8, chunk_parallel=True), dict(chunk_parallel=True),
    )
    assert torch.isfinite(y).all()
    for name, grad in zip(GRAD_NAMES, grads):
        assert torch.isfinite(grad).all(), name


@pytest.mark.triton
def test_triton_accepts_non_contiguous_inputs():
    inputs, dy = make_inputs(1, 4, 3, 2, 12, torch.float32, True, False, False)
    # Same values, strided storage: transposed copies viewed back.
    strided = {
        k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and v.dim() > 1
            else v)
        for k, v in inputs.items()
    }
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    y_ref, _, grads_ref = triton_with_grads(inputs, dy, False)
    y, _, grads = triton_with_grads(strided, dy.transpose(-1, -2).contiguous().transpose(-1, -2),
                                    False)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for name, got, ref in zip(GRAD_NAMES, grads, grads_ref):
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=name)


@pytest.mark.triton
def test_triton_fake_forward_matches_real_shapes():
    for length, chunk in ((1, None), (20, 8), (200, None)):
        inputs, _ = make_inputs(2, 4, 3, 5, length, torch.bfloat16, True, True, True)
        args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
        kwargs = {} if chunk is None else dict(chunk_size=chunk)
        y_fake, saved_fake = triton_scan_forward_fake(*args, True, **kwargs)
        assert y_fake.shape == (2, 12, length) and y_fake.dtype == torch.float32
        if length <= 20:
            y, saved = triton_scan_forward(*args, True, **kwargs)
            assert y.shape == y_fake.shape
            assert [s.shape for s in saved] == [s.shape for s in saved_fake]
            assert [s.dtype for s in saved] == [s.dtype for s in saved_fake]
        else:
            assert saved_fake[0].shape == (2, 12, 5, 4)


@pytest.mark.triton
def test_triton_rejects_chunk_sizes_that_are_not_powers_of_two():
    inputs, _ = make_inputs(1, 4, 1, 1, 8, torch.float32, False, False, False)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    with pytest.raises(ValueError, match="chunk_size"):
        triton_scan_forward(*args, False, chunk_size=12)
    with pytest.raises(ValueError, match="not a multiple"):
        triton_scan_forward(inputs["u"][:, :3], *args[1:], False)


@pytest.mark.triton
def test_triton_backend_through_public_selective_scan_with_gradients():
    interface = pytest.importorskip("vmamba_mm.ops.selective_scan.interface")
    inputs, dy = make_inputs(1, 4, 2, 2, 5, torch.float32, True, True, True, seed=7)
    y_ref, grads_ref = naive_with_grads(inputs, dy, True)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = interface.selective_scan(**leaves, delta_softplus=True, backend="triton")
    y.backward(dy)
    torch.testing.assert_close(y.detach(), y_ref, **TOL[torch.float32])
    for name, key, ref in zip(GRAD_NAMES, leaves, grads_ref):
        torch.testing.assert_close(leaves[key].grad, ref, **TOL[torch.float32], msg=name)


# Compiles the kernels the way a Hopper GPU would run them (Triton frontend, LLVM and the ptxas
# bundled with Triton), which needs no GPU: it catches what the interpreter does not check, such
# as loop-carried type changes or illegal ops in compiled code.
COMPILE_FOR_HOPPER = textwrap.dedent("""
    import importlib, inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    m = importlib.import_module("vmamba_mm.ops.selective_scan.triton_scan")
    low = {n: "*bf16" for n in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "du_ptr", "ddelta_ptr",
                                "x_ptr", "M_ptr")}
    def build(fn, consts, ptrs):
        names = list(inspect.signature(fn.fn).parameters)
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "*fp32") if n.endswith("_ptr")
               else "i32" for n in names}
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert kernel.asm["cubin"], fn
        return kernel.asm["ptx"]
    flags = dict(HAS_BIAS=True, SOFTPLUS=True)
    build(m._chunk_local_kernel, dict(REVERSE=True, BLOCK_C=16, NP=16, **flags), low)
    build(m._propagate_kernel, dict(REVERSE=False, BLOCK_C=32, NP=1), {})
    build(m._scan_fwd_kernel, dict(HAS_D=True, FROM_CKPT=False, BLOCK_C=16, NP=16, **flags), low)
    for np_ in (1, 16):
        ptx = build(m._scan_bwd_kernel,
                    dict(HAS_D=True, HAS_GCK=True, BLOCK_C=16, NP=np_, **flags), low)
        # The workspace handoff between the two phases of a chunk needs a CTA barrier.
        assert "bar.sync" in ptx
    print("compiled")
""")


@pytest.mark.triton
def test_triton_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout


GPU_CASES = {
    "vmamba_v2_stage1": (1, 96, 1, 3136, torch.float32, True, True, True),
    "vmamba_vanilla_state16_bf16": (2, 48, 16, 1000, torch.bfloat16, True, True, True),
    "batch4_fp16_odd_length": (4, 24, 4, 777, torch.float16, False, True, False),
}


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
@pytest.mark.parametrize("chunk_parallel", [False, True], ids=["sequential", "chunk_parallel"])
def test_triton_on_gpu_matches_naive(case, chunk_parallel):
    batch, d_group, d_state, length, dtype, with_d, with_bias, softplus = GPU_CASES[case]
    inputs, dy = make_inputs(batch, 4, d_group, d_state, length, dtype, with_d, with_bias, softplus)
    kw = dict(chunk_parallel=chunk_parallel)
    assert_matches_naive(inputs, dy, softplus, dtype, kw, kw)


@pytest.mark.gpu
@pytest.mark.triton
def test_triton_on_gpu_long_sequence_is_finite():
    inputs, dy = make_inputs(
        1, 4, 96, 1, 16384, torch.bfloat16, True, True, True, a_scale=100.0, delta_shift=3.0
    )
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    y, saved = triton_scan_forward(*args, True)
    grads = triton_scan_backward(dy, *args, True, *saved)
    assert torch.isfinite(y).all()
    for name, grad in zip(GRAD_NAMES, grads):
        assert torch.isfinite(grad.float()).all(), name
