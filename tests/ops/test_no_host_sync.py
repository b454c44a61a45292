"""The ops' eager paths never read tensor values on the host (no host-device sync per call).

On a GPU, anything that brings a tensor's value to Python (``.item()``, ``bool(t)``, ``int(t)``,
``.tolist()``, ``.cpu()``, ``nonzero()``, boolean-mask indexing...) makes the host wait for the
GPU's queue to drain; in VMamba that would happen in every SS2D of every step.

On CPU, ``HostReads`` replaces those Tensor methods and torch functions with wrappers that record
who called them (the first caller outside torch's own modules), then the forward and backward of
every op run on each CPU backend ("torch", "naive", and "triton" in the interpreter): the
selective scan, the cross-scan and cross-merge, and ``ss2d_scan``, the four-route 2D scan that
SS2D runs (its host-read tests on every backend are in test_ss2d_scan.py; here its Triton kernels'
chunk-parallel schedule). Nothing is excluded: Triton's CPU interpreter copies kernel arguments
through their storages, not through these methods, so it records nothing of its own. With a
GPU, the same ops run under ``torch.cuda.set_sync_debug_mode("error")``, which turns every
synchronisation into an error: each backend ("torch", "triton", "auto").

The one value check, A <= 0 in ``selective_scan`` and ``ss2d_scan``, runs only with
``VMAMBA_MM_DEBUG_CHECKS=1``; a test below shows that the recorder sees it then, i.e. that it
would see it if it ran by default.
"""

import contextlib
import os
import sys
from typing import Callable, Dict, Iterator, List

import pytest
import torch

from vmamba_mm.models.ss2d import SS2D
from vmamba_mm.models.vss_block import VSSBlock
from vmamba_mm.ops import (
    cross_merge,
    cross_merge_channel_last,
    cross_scan,
    cross_scan_channel_last,
    selective_scan,
    ss2d_scan,
)
from vmamba_mm.ops.debug import ENV_VAR, value_checks_enabled
from vmamba_mm.ops.selective_scan import torch_scan

from .test_selective_scan_torch import make_inputs

# Tensor methods that read values on the host (tensor printing and ``in`` go through these).
HOST_READ_METHODS = (
    "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
    "__complex__", "__array__", "nonzero", "argwhere", "masked_select", "unique",
    "unique_consecutive", "equal", "allclose", "is_nonzero",
)
# torch functions whose result size or value depends on the data.
HOST_READ_FUNCTIONS = (
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose",
    "is_nonzero",
)
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class HostReads:
    """Records calls that read tensor values on the host, with the caller's file and line."""

    def __init__(self) -> None:
        self.calls: List[str] = []

    def record(self, what: str) -> None:
        frame = sys._getframe(2)  # the caller of the wrapper
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
            frame = frame.f_back
        where = "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"
        self.calls.append(f"{what} from {where}")

    def wrap(self, what: str, real: Callable, reads: Callable = lambda *a, **k: True) -> Callable:
        def wrapper(*args, **kwargs):
            if reads(*args, **kwargs):
                self.record(what)
            return real(*args, **kwargs)

        return wrapper


def _mask_index(index: object) -> bool:
    """Whether a __getitem__/__setitem__ index holds a boolean mask (a nonzero() in disguise)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, torch.Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts
    )


@contextlib.contextmanager
def host_reads() -> Iterator[HostReads]:
    """Within the block, every host read of a tensor's values is recorded in ``.calls``."""
    reads = HostReads()
    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READ_METHODS:
            patch.setattr(torch.Tensor, name, reads.wrap(f"Tensor.{name}",
                                                         getattr(torch.Tensor, name)))
        for name in HOST_READ_FUNCTIONS:
            patch.setattr(torch, name, reads.wrap(f"torch.{name}", getattr(torch, name)))
        patch.setattr(torch.cuda, "synchronize", reads.wrap("torch.cuda.synchronize",
                                                            torch.cuda.synchronize))
        for name in ("__getitem__", "__setitem__"):
            patch.setattr(torch.Tensor, name, reads.wrap(
                f"Tensor.{name} with a boolean mask", getattr(torch.Tensor, name),
                lambda self, index, *rest: _mask_index(index)))
        yield reads


def assert_no_host_reads(run: Callable[[], None]) -> None:
    """Runs ``run`` twice (the first call may build caches) and fails on any host read."""
    run()
    with host_reads() as reads:
        run()
    assert reads.calls == [], "host reads of tensor values:\n" + "\n".join(reads.calls)


def _scan_inputs(d_state: int, with_optional: bool, length: int = 7):
    values, _ = make_inputs(2, 4, 2, length, d_state, with_D=with_optional,
                            with_bias=with_optional, softplus=True)
    return {k: v.requires_grad_() for k, v in values.items() if v is not None}


def _ss2d_inputs(batch: int = 1, height: int = 9, width: int = 9, dim: int = 4,
                 d_state: int = 1) -> Dict[str, torch.Tensor]:
    """Leaf inputs of ``ss2d_scan``: x [B, H, W, D], delta [B, H, W, 4, D], A [4D, N] (< 0),
    B and C [B, H, W, 4, N], D and delta_bias [4D]."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    routes = 4
    values = {
        "x": randn(batch, height, width, dim), "delta": randn(batch, height, width, routes, dim),
        "A": -torch.exp(randn(routes * dim, d_state)),
        "B": randn(batch, height, width, routes, d_state),
        "C": randn(batch, height, width, routes, d_state),
        "D": randn(routes * dim), "delta_bias": randn(routes * dim) * 0.1,
    }
    return {k: v.requires_grad_() for k, v in values.items()}


def _scan_forward_backward(values, backend: str) -> Callable[[], None]:
    def run() -> None:
        y = selective_scan(**values, delta_softplus=True, backend=backend)
        y.backward(torch.ones_like(y))

    return run


def test_host_reads_records_each_kind_of_read_and_where_it_came_from() -> None:
    t = torch.tensor([1.0, -2.0])
    with host_reads() as reads:
        bool((t > 0).any())
        t.sum().item()
        int(t[0])
        t.tolist()
        t[t > 0] = 0.0
        torch.nonzero(t)
        t.cpu()
        f"{t}"  # printing reads every value
        t[0] = 1.0  # not a read: indexing with ints
    kinds = [call.split(" from ")[0] for call in reads.calls]
    assert kinds[:7] == ["Tensor.__bool__", "Tensor.item", "Tensor.__int__", "Tensor.tolist",
                         "Tensor.__setitem__ with a boolean mask", "torch.nonzero", "Tensor.cpu"]
    assert len(kinds) > 7 and not any(k.startswith("Tensor.__setitem__") for k in kinds[7:])
    assert all(f"{__file__}:" in call for call in reads.calls)


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("d_state,with_optional", [(1, True), (3, False), (16, True)])
def test_selective_scan_forward_and_backward_read_no_values(backend, d_state, with_optional):
    assert_no_host_reads(_scan_forward_backward(_scan_inputs(d_state, with_optional), backend))


def test_torch_scan_in_channel_blocks_reads_no_values(monkeypatch) -> None:
    # Large problems run block by block and gather the blocks' gradients: the same path at a
    # tiny size with a tiny block budget.
    monkeypatch.setattr(torch_scan, "_BLOCK_ELEMENTS", 64)
    values = _scan_inputs(4, True)
    assert torch_scan._channel_blocks(values["u"], values["A"], values["B"])
    assert_no_host_reads(_scan_forward_backward(values, "torch"))


@pytest.mark.triton
@pytest.mark.parametrize("d_state", [1, 3])
def test_triton_selective_scan_reads_no_values(monkeypatch, d_state) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert_no_host_reads(_scan_forward_backward(_scan_inputs(d_state, True, length=5), "triton"))


@pytest.mark.triton
def test_triton_chunk_parallel_schedule_reads_no_values(monkeypatch) -> None:
    # The GPU's schedule for batch 1 and long sequences (never picked in the interpreter).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from vmamba_mm.ops.selective_scan import triton_scan

    v = {k: t.detach() for k, t in _scan_inputs(2, True, length=5).items()}
    args = (v["u"], v["delta"], v["A"], v["B"], v["C"], v["D"], v["delta_bias"], True)

    def run() -> None:
        y, saved = triton_scan.triton_scan_forward(*args, chunk_size=2, chunk_parallel=True)
        assert saved[0].shape[-1] == 3  # three chunks
        triton_scan.triton_scan_backward(torch.ones_like(y), *args, *saved, chunk_parallel=True)

    assert_no_host_reads(run)


@pytest.mark.triton
def test_triton_ss2d_scan_chunk_parallel_schedule_reads_no_values(monkeypatch) -> None:
    # The GPU's schedule for few programs and long routes, forced: 8-step chunks make the 7 x 9
    # map 8 chunks a route (the last one partial).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from vmamba_mm.ops.ss2d_scan import triton_ss2d

    picked: List[tuple] = []
    monkeypatch.setattr(triton_ss2d, "use_chunk_parallel", lambda *a: picked.append(a) or True)
    monkeypatch.setattr(triton_ss2d, "MAX_CHUNK", 8)
    assert triton_ss2d.tile_sizes(4, 1, 7 * 9)[0] == 8
    values = _ss2d_inputs(1, 7, 9, 4, 1)

    def run() -> None:
        y = ss2d_scan(**values, backend="triton")
        y.backward(torch.ones_like(y))

    assert_no_host_reads(run)
    assert picked and all(n_chunks == 8 for _, n_chunks, _ in picked), picked


CROSS_OPS = [
    pytest.param(cross_scan, (2, 3, 4, 5), id="cross_scan"),
    pytest.param(cross_scan_channel_last, (2, 4, 5, 3), id="cross_scan_channel_last"),
    pytest.param(cross_merge, (2, 4, 3, 4, 5), id="cross_merge"),
    pytest.param(cross_merge_channel_last, (2, 4, 3, 4, 5), id="cross_merge_channel_last"),
]


@pytest.mark.parametrize("backend", [
    "torch", "auto", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("op,shape", CROSS_OPS)
def test_cross_scan_and_merge_forward_and_backward_read_no_values(
    monkeypatch, op, shape, backend
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(shape, requires_grad=True)

    def run() -> None:
        out = op(x, backend=backend)
        out.backward(torch.ones_like(out))

    assert_no_host_reads(run)


@pytest.mark.parametrize("backend", [
    "torch", "naive", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("channel_first", [True, False])
def test_vss_block_forward_and_backward_read_no_values(monkeypatch, backend, channel_first):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    block = VSSBlock(8, drop_path=0.1, d_state=2, mlp_ratio=2.0, channel_first=channel_first,
                     scan_backend=backend)
    x = torch.randn((1, 8, 3, 4) if channel_first else (1, 3, 4, 8), requires_grad=True)

    def run() -> None:
        block(x).square().sum().backward()

    assert_no_host_reads(run)


# Each scan op with 16 entries of A: selective_scan's [K*D, N] = [8, 2], ss2d_scan's [16, 1].
DEBUG_CHECKED_OPS = {
    "selective_scan": (selective_scan, lambda: _scan_inputs(2, True), "u"),
    "ss2d_scan": (ss2d_scan, lambda: _ss2d_inputs(1, 3, 3, 4, 1), "x"),
}


@pytest.mark.parametrize("op_name", sorted(DEBUG_CHECKED_OPS))
def test_debug_checks_read_A_and_refuse_positive_A(monkeypatch, op_name: str) -> None:
    # The recorder sees the A check when it is switched on: it would see it if it ran by default.
    op, make_inputs, first = DEBUG_CHECKED_OPS[op_name]
    values = make_inputs()
    assert values["A"].numel() == 16

    def run() -> torch.Tensor:
        return op(**values, delta_softplus=True, backend="torch")

    monkeypatch.setenv(ENV_VAR, "0")
    run()
    with host_reads() as reads:
        run()
    assert reads.calls == [], "A is read only with the debug checks on"
    monkeypatch.setenv(ENV_VAR, "1")
    with host_reads() as reads:
        run()
    assert reads.calls and all("interface.py" in call for call in reads.calls), reads.calls
    with torch.no_grad():
        values["A"][0, 0] = 0.5
        values["A"][1, -1] = float("nan")
    with pytest.raises(ValueError, match=r"A must be <= 0.* 2 of its 16 entries .*" + ENV_VAR):
        run()
    monkeypatch.setenv(ENV_VAR, "0")
    assert run().shape == values[first].shape


@pytest.mark.parametrize("value,enabled", [
    (None, False), ("", False), ("0", False), ("off", False), ("1", True), (" TRUE ", True),
    ("yes", True),
])
def test_debug_checks_flag_values(monkeypatch, value, enabled) -> None:
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    assert value_checks_enabled() is enabled


def test_debug_checks_flag_refuses_a_typo(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "ture")
    with pytest.raises(ValueError, match=ENV_VAR):
        value_checks_enabled()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_cuda_ops_and_block_run_without_any_synchronisation(backend) -> None:
    """Forward and backward of every op and of a block raise no sync under "error" mode."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    scan = {k: v.detach().to(device).requires_grad_()
            for k, v in _scan_inputs(16, True, length=50).items()}
    # ss2d_scan at batch 2 and at batch 1 on a 32 x 32 map (16 chunks a route: the Triton
    # kernels' chunk-parallel schedule on a GPU).
    ss2d = [{k: v.detach().to(device).requires_grad_() for k, v in _ss2d_inputs(*sizes).items()}
            for sizes in ((2, 7, 9, 16, 16), (1, 32, 32, 16, 1))]
    image = torch.randn(2, 16, 7, 9, device=device, requires_grad=True)
    image_last = torch.randn(2, 7, 9, 16, device=device, requires_grad=True)
    routes = torch.randn(2, 4, 16, 7, 9, device=device, requires_grad=True)
    blocks = [
        VSSBlock(16, drop_path=0.1, d_state=d_state, channel_first=channel_first,
                 scan_backend=backend).to(device)
        for d_state, channel_first in ((1, True), (16, False))
    ]
    mixer = SS2D(16, d_state=16, gated=True, scan_backend=backend).to(device)
    block_inputs = [torch.randn(2, 16, 7, 9, device=device, requires_grad=True),
                    torch.randn(2, 7, 9, 16, device=device, requires_grad=True)]

    def step() -> None:
        y = selective_scan(**scan, delta_softplus=True, backend=backend)
        y.backward(torch.ones_like(y))
        for values in ss2d:
            y = ss2d_scan(**values, backend=backend)
            y.backward(torch.ones_like(y))
        for op, x in ((cross_scan, image), (cross_scan_channel_last, image_last),
                      (cross_merge, routes), (cross_merge_channel_last, routes)):
            out = op(x, backend=backend)
            out.backward(torch.ones_like(out))
        for block, x in zip(blocks, block_inputs):
            block(x).square().sum().backward()
        mixer(block_inputs[0]).sum().backward()

    step()  # compiles the kernels and fills the allocator's cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(image.grad).all() and torch.isfinite(scan["A"].grad).all()
    assert all(torch.isfinite(values["A"].grad).all() for values in ss2d)
