"""tools/gpu_check.sh and the benchmark it runs keep working without a GPU (smoke run)."""

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _gpu_bench():
    spec = importlib.util.spec_from_file_location(
        "gpu_bench", ROOT / "tools" / "analysis_tools" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_prints_a_row_per_scan_shape_and_the_backbone(capsys) -> None:
    assert _gpu_bench().main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for path in ("cross_scan+scan+merge", "ss2d_scan"):
        rows = [line for line in out.splitlines() if line.startswith(f"| {path} |")]
        assert len(rows) == 2, out
        for row in rows:
            # Times in ms, then GB/s and % of the copy: present and positive (their values mean
            # nothing on a CPU, and timings are never compared in a test).
            times = [float(v) for v in re.findall(r"\| ([0-9.]+) (?=\|)", row)]
            assert len(times) == 2 and min(times) > 0, row
            assert re.search(r"\| [0-9.]+ GB/s \| [0-9]+% \|$", row), row
    assert re.search(r"\| VMamba-T \(s1l8\) \| 64x64 b2 bf16 \| train [0-9]+ img/s", out), out
    assert "| copy (device to device) |" in out


def test_ideal_traffic_counts_inputs_once_and_the_gradients_in_the_backward() -> None:
    bench = _gpu_bench()
    inputs = bench.scan_inputs(1, 2, 3, 4, bench.torch.device("cpu"), bench.torch.float32, True)
    read = sum(v.numel() * v.element_size() for v in inputs.values())
    y = 1 * 2 * 3 * 4 * 4
    assert bench.ideal_bytes(inputs, backward=False) == read + y
    assert bench.ideal_bytes(inputs, backward=True) == 2 * (read + y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_the_full_run_refuses_in_one_line() -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_check.sh")])
    assert done.returncode == 0
    try:
        _gpu_bench().main([])
    except SystemExit as exit_info:
        assert str(exit_info.code).startswith("error: no CUDA device")
    else:
        raise AssertionError("the full run must refuse without CUDA")
