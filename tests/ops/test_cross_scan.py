"""Tests of the four-direction cross-scan / cross-merge ops on both backends.

The oracle is the index definition (one pixel at a time) of VMAMBA_SPEC section 2.3. Cross-scan only
moves data, so every backend must reproduce it exactly; cross-merge adds four numbers, so backends
agree exactly on integer-valued inputs and to fp rounding order otherwise.
"""

import functools

import pytest
import torch

from vmamba_mm.ops.cross_scan import (
    cross_merge,
    cross_merge_channel_last,
    cross_scan,
    cross_scan_channel_last,
    interface,
)

# (B, D, H, W): single pixel, a single row, odd and non-square images, a single column.
SHAPES = [(1, 1, 1, 1), (1, 2, 1, 5), (2, 3, 7, 9), (1, 4, 3, 4), (2, 3, 5, 1)]
# Tiles larger than 1x1 in every direction and ragged in H, W and D for both layouts.
RAGGED = (1, 37, 33, 9)
CUDA_SHAPES = [(1, 1, 1, 1), (2, 96, 56, 56), (1, 40, 33, 9), (2, 192, 28, 28), (1, 7, 200, 37)]


def index_cross_scan(x: torch.Tensor) -> torch.Tensor:
    batch, dim, height, width = x.shape
    length = height * width
    xs = torch.zeros(batch, 4, dim, length, dtype=x.dtype)
    for h in range(height):
        for w in range(width):
            xs[:, 0, :, h * width + w] = x[:, :, h, w]
            xs[:, 1, :, w * height + h] = x[:, :, h, w]
            xs[:, 2, :, length - 1 - (h * width + w)] = x[:, :, h, w]
            xs[:, 3, :, length - 1 - (w * height + h)] = x[:, :, h, w]
    return xs


def index_cross_merge(ys: torch.Tensor) -> torch.Tensor:
    batch, _, dim, height, width = ys.shape
    length = height * width
    routes = ys.reshape(batch, 4, dim, length)
    y = torch.zeros(batch, dim, length, dtype=ys.dtype)
    for h in range(height):
        for w in range(width):
            row, col = h * width + w, w * height + h
            y[:, :, row] = (
                routes[:, 0, :, row]
                + routes[:, 1, :, col]
                + routes[:, 2, :, length - 1 - row]
                + routes[:, 3, :, length - 1 - col]
            )
    return y


def integer_valued(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Random small integers: every sum of four is exact, whatever the summation order."""
    return torch.randint(-50, 50, shape).to(dtype=dtype, device=device)


def routes_of(x_shape) -> tuple:
    batch, dim, height, width = x_shape
    return (batch, 4, dim, height, width)


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_cross_scan_matches_index_definition(shape):
    x = torch.randn(shape)
    assert torch.equal(cross_scan(x, backend="torch"), index_cross_scan(x))


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_cross_merge_matches_index_definition(shape):
    ys = integer_valued(*routes_of(shape))
    assert torch.equal(cross_merge(ys, backend="torch"), index_cross_merge(ys))
    ys = torch.randn(routes_of(shape), dtype=torch.float64)
    torch.testing.assert_close(cross_merge(ys, backend="torch"), index_cross_merge(ys))


def test_cross_merge_is_the_adjoint_of_cross_scan():
    # <scan(x), ys> == <x, merge(ys)> for every x and ys.
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    ys = torch.randn(2, 4, 3, 7, 9, dtype=torch.float64)
    lhs = (cross_scan(x, backend="torch") * ys.flatten(3)).sum()
    rhs = (x.flatten(2) * cross_merge(ys, backend="torch")).sum()
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_channel_last_variants_equal_channel_first(shape):
    x = torch.randn(shape)
    x_last = x.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(cross_scan_channel_last(x_last, backend="torch"), cross_scan(x))
    ys = torch.randn(routes_of(shape))
    merged = cross_merge(ys, backend="torch")
    assert torch.equal(cross_merge_channel_last(ys, backend="torch"), merged.transpose(1, 2))


def test_torch_backward_of_scan_is_merge_and_of_merge_is_scan():
    x = torch.randn(2, 3, 7, 9, requires_grad=True)
    grad_xs = integer_valued(2, 4, 3, 63)
    cross_scan(x, backend="torch").backward(grad_xs)
    assert torch.equal(x.grad, index_cross_merge(grad_xs.view(2, 4, 3, 7, 9)).view(2, 3, 7, 9))

    ys = torch.randn(2, 4, 3, 7, 9, requires_grad=True)
    grad_y = torch.randn(2, 3, 63)
    cross_merge(ys, backend="torch").backward(grad_y)
    assert torch.equal(ys.grad, index_cross_scan(grad_y.view(2, 3, 7, 9)).view(2, 4, 3, 7, 9))


@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (2, 1, 1, 5)])
def test_torch_gradcheck_float64(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(routes_of(shape), dtype=torch.float64, requires_grad=True)
    x_last = x.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: cross_scan(t, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, backend="torch"), (ys,))
    assert torch.autograd.gradcheck(
        lambda t: cross_scan_channel_last(t, backend="torch"), (x_last,)
    )
    assert torch.autograd.gradcheck(lambda t: cross_merge_channel_last(t, backend="torch"), (ys,))


def test_torch_gradgradcheck_float64():
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(1, 4, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: cross_scan(t, backend="torch"), (x,))
    assert torch.autograd.gradgradcheck(lambda t: cross_merge(t, backend="torch"), (ys,))


def test_torch_reads_strided_views_and_integer_tensors():
    x = torch.randn(2, 7, 9, 3).permute(0, 3, 1, 2)  # [B, D, H, W] view of channel-last memory
    assert torch.equal(cross_scan(x, backend="torch"), index_cross_scan(x))
    ints = torch.randint(-9, 9, (2, 4, 3, 5, 4))
    assert torch.equal(cross_merge(ints, backend="torch"), index_cross_merge(ints))
    assert torch.equal(cross_scan(ints[:, 0], backend="torch"), index_cross_scan(ints[:, 0]))


def test_empty_tensors_keep_their_shapes():
    assert cross_scan(torch.randn(0, 3, 4, 5), backend="torch").shape == (0, 4, 3, 20)
    assert cross_merge(torch.randn(2, 4, 0, 4, 5), backend="torch").shape == (2, 0, 20)


def test_auto_backend_uses_torch_for_cpu_tensors(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("auto must not launch Triton for CPU tensors")

    monkeypatch.setattr(interface, "cross_scan_triton", refuse)
    monkeypatch.setattr(interface, "cross_merge_triton", refuse)
    x = torch.randn(1, 2, 3, 4)
    assert torch.equal(cross_scan(x), index_cross_scan(x))
    ys = integer_valued(1, 4, 2, 3, 4)
    assert torch.equal(cross_merge(ys), index_cross_merge(ys))
    assert torch.equal(cross_merge_channel_last(ys), index_cross_merge(ys).transpose(1, 2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: cross_scan(torch.zeros(2, 3, 4)), "x must have 4 dimensions"),
        (lambda: cross_scan_channel_last(torch.zeros(1, 2, 3, 4, 5)), "x must have 4 dimensions"),
        (lambda: cross_merge(torch.zeros(1, 4, 2, 9)), "ys must have 5 dimensions"),
        (lambda: cross_merge(torch.zeros(1, 2, 3, 4, 5)), "ys must hold 4 routes"),
        (lambda: cross_merge_channel_last(torch.zeros(1, 3, 3, 4, 5)), "ys must hold 4 routes"),
        (lambda: cross_scan(torch.zeros(1, 2, 3, 4), backend="cuda"), "backend must be one of"),
        (lambda: cross_merge(torch.zeros(1, 4, 2, 3, 4), backend=None), "backend must be one of"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_tensor_input_raises_type_error():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        cross_scan([[1.0]])
    with pytest.raises(TypeError, match="ys must be a torch.Tensor"):
        cross_merge_channel_last(None)


@pytest.mark.triton
def test_triton_on_cpu_without_interpreter_raises_value_error(monkeypatch):
    assert interface.triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs x on a CUDA device"):
        cross_scan(torch.zeros(1, 2, 3, 4), backend="triton")
    with pytest.raises(ValueError, match="needs ys on a CUDA device"):
        cross_merge(torch.zeros(1, 4, 2, 3, 4), backend="triton")


@pytest.mark.triton
def test_triton_rejects_integer_tensors():
    with pytest.raises(TypeError, match="backend='triton' supports float"):
        cross_scan(torch.zeros(1, 2, 3, 4, dtype=torch.int64), backend="triton")


def _interpreted(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.triton
@pytest.mark.parametrize("shape", SHAPES + [RAGGED])
def test_triton_cross_scan_equals_torch_exactly(shape, monkeypatch):
    _interpreted(monkeypatch)
    x = torch.randn(shape)
    expected = cross_scan(x, backend="torch")
    assert torch.equal(cross_scan(x, backend="triton"), expected)
    x_last = x.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(cross_scan_channel_last(x_last, backend="triton"), expected)
    # Strided views are read in place: a channel-first view of channel-last memory, and back.
    assert torch.equal(cross_scan(x_last.permute(0, 3, 1, 2), backend="triton"), expected)
    assert torch.equal(cross_scan_channel_last(x.permute(0, 2, 3, 1), backend="triton"), expected)


@pytest.mark.triton
@pytest.mark.parametrize("shape", SHAPES + [RAGGED])
def test_triton_cross_merge_equals_torch(shape, monkeypatch):
    _interpreted(monkeypatch)
    ys = integer_valued(*routes_of(shape))
    expected = cross_merge(ys, backend="torch")
    assert torch.equal(cross_merge(ys, backend="triton"), expected)
    assert torch.equal(cross_merge_channel_last(ys, backend="triton"), expected.transpose(1, 2))
    ys = torch.randn(routes_of(shape))
    torch.testing.assert_close(
        cross_merge(ys, backend="triton"), index_cross_merge(ys), rtol=1e-6, atol=1e-6
    )


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_triton_keeps_the_input_dtype(dtype, monkeypatch):
    _interpreted(monkeypatch)
    x = torch.randn(2, 3, 5, 4).to(dtype)
    xs = cross_scan(x, backend="triton")
    assert xs.dtype == dtype and torch.equal(xs, index_cross_scan(x))
    ys = integer_valued(2, 4, 3, 5, 4, dtype=dtype)
    y = cross_merge(ys, backend="triton")
    assert y.dtype == dtype and torch.equal(y, index_cross_merge(ys))


@pytest.mark.triton
def test_triton_accepts_a_non_contiguous_merge_input(monkeypatch):
    _interpreted(monkeypatch)
    ys = integer_valued(2, 3, 4, 7, 9).transpose(1, 2)  # [B, 4, D, H, W] view
    assert torch.equal(cross_merge(ys, backend="triton"), index_cross_merge(ys))


@pytest.mark.triton
@pytest.mark.parametrize("channel_last", [False, True])
def test_triton_backward_of_scan_is_merge_and_of_merge_is_scan(channel_last, monkeypatch):
    _interpreted(monkeypatch)
    batch, dim, height, width = 2, 3, 7, 9
    scan = cross_scan_channel_last if channel_last else cross_scan
    merge = cross_merge_channel_last if channel_last else cross_merge
    image_shape = (batch, height, width, dim) if channel_last else (batch, dim, height, width)

    x = torch.randn(image_shape, requires_grad=True)
    grad_xs = integer_valued(batch, 4, dim, height * width)
    scan(x, backend="triton").backward(grad_xs)
    expected = merge(grad_xs.view(batch, 4, dim, height, width), backend="torch")
    assert torch.equal(x.grad, expected.reshape(image_shape))

    ys = torch.randn(batch, 4, dim, height, width, requires_grad=True)
    grad_y = torch.randn(merge(ys.detach(), backend="torch").shape)
    merge(ys, backend="triton").backward(grad_y)
    expected = scan(grad_y.reshape(image_shape), backend="torch")
    assert torch.equal(ys.grad, expected.view(ys.shape))


@pytest.mark.triton
def test_triton_gradcheck_float64(monkeypatch):
    _interpreted(monkeypatch)
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(1, 4, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    # fast_mode checks random projections of the Jacobian: far fewer interpreted launches.
    check = functools.partial(torch.autograd.gradcheck, fast_mode=True)
    assert check(lambda t: cross_scan(t, backend="triton"), (x,))
    assert check(lambda t: cross_merge(t, backend="triton"), (ys,))
    assert check(lambda t: cross_merge_channel_last(t, backend="triton"), (ys,))


@pytest.mark.triton
def test_triton_handles_empty_tensors(monkeypatch):
    _interpreted(monkeypatch)
    assert cross_scan(torch.randn(0, 3, 4, 5), backend="triton").shape == (0, 4, 3, 20)
    assert cross_merge(torch.randn(2, 4, 0, 4, 5), backend="triton").shape == (2, 0, 20)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_torch(shape, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    expected = cross_scan(x, backend="torch")
    assert torch.equal(cross_scan(x), expected)  # auto picks Triton on CUDA
    x_last = x.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(cross_scan_channel_last(x_last, backend="triton"), expected)

    ys = integer_valued(*routes_of(shape), dtype=dtype, device="cuda")
    merged = cross_merge(ys, backend="torch")
    assert torch.equal(cross_merge(ys, backend="triton"), merged)
    assert torch.equal(cross_merge_channel_last(ys, backend="triton"), merged.transpose(1, 2))
    ys = torch.randn(routes_of(shape), device="cuda")
    torch.testing.assert_close(
        cross_merge(ys, backend="triton"), cross_merge(ys, backend="torch"), rtol=1e-6, atol=1e-6
    )


@pytest.mark.gpu
def test_cuda_auto_backend_launches_triton(monkeypatch):
    calls = []
    real = interface.cross_scan_triton
    monkeypatch.setattr(interface, "cross_scan_triton", lambda *a: calls.append(1) or real(*a))
    cross_scan(torch.randn(1, 2, 3, 4, device="cuda"))
    assert calls == [1]


@pytest.mark.gpu
def test_cuda_triton_backward_and_gradcheck():
    x = torch.randn(2, 8, 13, 17, device="cuda", requires_grad=True)
    grad_xs = torch.randn(2, 4, 8, 13 * 17, device="cuda")
    cross_scan(x, backend="triton").backward(grad_xs)
    expected = cross_merge(grad_xs.view(2, 4, 8, 13, 17), backend="torch").view(x.shape)
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6)
    x64 = torch.randn(1, 2, 3, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    ys64 = torch.randn(1, 4, 2, 3, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cross_scan(t, backend="triton"), (x64,))
    assert torch.autograd.gradcheck(lambda t: cross_merge(t, backend="triton"), (ys64,))
