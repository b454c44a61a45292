"""The per-thread scratch pool of the pure-PyTorch scans."""

import threading

import pytest
import torch

from vmamba_mm.ops.selective_scan import scratch
from vmamba_mm.ops.selective_scan.scratch import Scratch, pooled_bytes


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    """Each test starts from an empty pool of the default size (other tests may have filled it)."""
    monkeypatch.setattr(scratch, "LIMIT_BYTES", 256 * 2**20)
    monkeypatch.setattr(scratch._local, "buffers", [], raising=False)


def test_scratch_hands_out_tensors_and_reuses_their_memory_after_the_block():
    with Scratch(torch.device("cpu")) as pool:
        first = pool.take((3, 5), torch.float32)
        other = pool.take((4,), torch.float64)
        assert first.shape == (3, 5) and first.dtype == torch.float32 and first.is_contiguous()
        assert other.shape == (4,) and other.dtype == torch.float64
        first_ptr = first.untyped_storage().data_ptr()
    assert pooled_bytes() == 3 * 5 * 4 + 4 * 8
    with Scratch(torch.device("cpu")) as pool:
        again = pool.take((15,), torch.float32)  # same bytes: the smallest buffer that fits
        assert again.untyped_storage().data_ptr() == first_ptr
        larger = pool.take((100,), torch.float32)  # nothing pooled fits: fresh memory
        assert larger.untyped_storage().data_ptr() != first_ptr


def test_scratch_pool_keeps_at_most_its_limit(monkeypatch):
    monkeypatch.setattr(scratch, "LIMIT_BYTES", 1000)
    with Scratch(torch.device("cpu")) as pool:
        pool.take((200,), torch.float32)  # 800 bytes
        pool.take((100,), torch.float32)  # 400 bytes
    assert pooled_bytes() <= 1000
    monkeypatch.setattr(scratch, "LIMIT_BYTES", 0)
    with Scratch(torch.device("cpu")) as pool:
        assert not pool.pooling
        pool.take((10,), torch.float32)
    assert pooled_bytes() <= 400  # nothing was added


def test_scratch_does_not_pool_other_devices():
    with Scratch(torch.device("meta")) as pool:
        assert not pool.pooling
        assert pool.take((2, 3), torch.float32).device.type == "meta"
    assert pooled_bytes() == 0


def test_scratch_pools_are_per_thread():
    with Scratch(torch.device("cpu")) as pool:
        pool.take((64,), torch.float32)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(pooled_bytes()))
    worker.start()
    worker.join()
    assert seen == [0] and pooled_bytes() == 256


def test_scratch_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("VMAMBA_MM_SCRATCH_MB", "1.5")
    assert scratch._limit_bytes() == int(1.5 * 2**20)
    monkeypatch.setenv("VMAMBA_MM_SCRATCH_MB", "lots")
    with pytest.raises(ValueError, match="VMAMBA_MM_SCRATCH_MB"):
        scratch._limit_bytes()
