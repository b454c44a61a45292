"""The kernel report's instruments: sector counting, the interpreter recorder, launch capture and
the compile report (``vmamba_mm.ops.kernel_analysis``, ``tools/analysis_tools/kernel_report.py``).

The sector arithmetic is checked on hand-made address lists; the recorder on a tiny kernel whose
addresses are known; the compile report compiles one small configuration of every kernel for
sm_90 in a child process (Triton's compiled mode; the tests run with the interpreter on).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vmamba_mm.ops import kernel_analysis as ka  # noqa: E402
from vmamba_mm.ops.triton_env import interpreter_enabled  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "analysis_tools" / "kernel_report.py"
SCAN_KERNELS = {"cross_scan_kernel", "cross_merge_kernel", "_scan_fwd_kernel", "_scan_bwd_kernel",
                "_chunk_local_kernel", "_propagate_kernel"}
needs_interpreter = pytest.mark.skipif(
    not interpreter_enabled(), reason="records accesses in Triton's interpreter (CPU only)")


def load_tool():
    spec = importlib.util.spec_from_file_location("vmamba_tools_kernel_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coalesced_fp32_warp_read_is_four_sectors_at_full_efficiency():
    base = 1 << 20
    stats = ka.warp_request_stats(base + 4 * np.arange(32), np.ones(32, bool), 4)
    assert (stats.requests, stats.lanes, stats.sectors) == (1, 32, 4)
    assert stats.bytes_requested == stats.bytes_used == 128
    assert stats.efficiency == 1.0


def test_strided_fp32_warp_read_is_32_sectors_at_one_eighth_efficiency():
    length = 3136  # one element from each of 32 rows of a [rows, L] tensor
    stats = ka.warp_request_stats(4 * length * np.arange(32), np.ones(32, bool), 4)
    assert (stats.requests, stats.sectors, stats.bytes_used) == (1, 32, 128)
    assert stats.efficiency == pytest.approx(0.125)


def test_requests_are_32_lane_warps_and_masked_lanes_issue_nothing():
    addresses = (4 * np.arange(96)).reshape(3, 32)  # row-major: one warp per row
    mask = np.zeros((3, 32), bool)
    mask[0, :8] = True  # first warp: 8 lanes, one sector
    mask[2, :] = True  # last warp full; the middle warp is fully masked off
    stats = ka.warp_request_stats(addresses, mask, 4)
    assert (stats.requests, stats.lanes, stats.sectors) == (2, 40, 1 + 4)
    assert stats.bytes_requested == 160


def test_broadcast_lanes_share_one_sector_and_count_their_bytes_once():
    stats = ka.warp_request_stats(np.full(32, 4096), np.ones(32, bool), 4)
    assert stats.bytes_requested == 128
    assert (stats.bytes_used, stats.sectors) == (4, 1)
    assert stats.efficiency == pytest.approx(4 / 32)


def test_misaligned_element_counts_both_sectors_it_straddles():
    stats = ka.warp_request_stats(np.array([30]), np.array([True]), 4)
    assert stats.sectors == 2


def test_access_log_counts_distinct_bytes_across_calls_and_per_range():
    log = ka.AccessLog()
    log.add(np.arange(0, 64, 4), np.ones(16, bool), 4)  # bytes [0, 64)
    log.add(np.arange(32, 96, 4), np.ones(16, bool), 4)  # bytes [32, 96), half already seen
    log.add(np.array([1000]), np.array([True]), 2)  # a bf16 element elsewhere
    totals = log.result()
    assert totals.distinct_bytes == 96 + 2
    assert totals.bytes_requested == 128 + 2
    assert log.distinct_bytes_within(48, 1001) == 48 + 1
    starts, ends = ka.union_segments(np.array([10, 0, 5, 30]), np.array([20, 6, 12, 31]))
    assert starts.tolist() == [0, 30] and ends.tolist() == [20, 31]


def test_ptx_accesses_are_counted_by_vector_and_bit_width():
    ptx = textwrap.dedent("""
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        @%p2 ld.global.L1::evict_last.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
        ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
        @%p3 st.global.v2.b32 [ %rd4 + 0 ], { %r9, %r10 };
        ld.shared.b32 %r11, [%r12];
        st.global.b32 [ %rd5 + 0 ], { %r13 };
    """)
    loads, stores = ka.ptx_global_accesses(ptx)
    assert loads == {"ld.global.v4.b32": 2, "ld.global.b16": 1}
    assert stores == {"st.global.v2.b32": 1, "st.global.b32": 1}
    assert ka.format_accesses(loads) == "ld.global.v4.b32 x2, ld.global.b16 x1"


def test_cuobjdump_resource_usage_is_parsed_per_function():
    text = textwrap.dedent("""
        Resource usage:
         Common:
          GLOBAL:0
         Function _scan_bwd_kernel:
          REG:126 STACK:8 SHARED:0 LOCAL:24 CONSTANT[0]:728 TEXTURE:0 SURFACE:0 SAMPLER:0
    """)
    usage = ka.parse_resource_usage(text)
    assert usage["_scan_bwd_kernel"]["REG"] == 126
    assert usage["_scan_bwd_kernel"]["LOCAL"] == 24
    assert usage["_scan_bwd_kernel"]["CONSTANT[0]"] == 728


def test_ideal_traffic_reads_inputs_once_and_writes_outputs_once():
    inputs = ka.make_path_inputs(2, 8, 3, 5, 4, device="meta")
    x, delta, bc, params = 2 * 8 * 15 * 4, 2 * 32 * 15 * 4, 2 * 4 * 4 * 15 * 4, (32 * 4 + 64) * 4
    read = x + delta + 2 * bc + params
    assert ka.ideal_traffic(inputs) == {"forward": (read, x), "backward": (read + x, read)}


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _strided_copy_kernel(src_ptr, dst_ptr, n, stride, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        keep = i < n
        tl.store(dst_ptr + i, tl.load(src_ptr + i * stride, mask=keep), mask=keep)


@pytest.mark.triton
@needs_interpreter
def test_recorder_sees_the_loads_and_stores_of_a_tiny_kernel_at_their_addresses():
    n, stride = 40, 8
    src = torch.arange(64 * stride, dtype=torch.float32)
    dst = torch.zeros(64, dtype=torch.float32)
    with ka.record_memory_accesses() as recorder, recorder.in_phase("copy"):
        _strided_copy_kernel[(1,)](src, dst, n, stride, BLOCK=64)
    torch.testing.assert_close(dst[:n], src[: n * stride : stride])

    (launch,) = recorder.launches
    assert (launch.kernel, launch.phase, launch.programs) == ("_strided_copy_kernel", "copy", 1)
    assert launch.arguments["src_ptr"] == (src.data_ptr(), src.data_ptr() + src.nbytes)
    assert launch.arguments["dst_ptr"] == (dst.data_ptr(), dst.data_ptr() + dst.nbytes)
    loads, stores = launch.loads.result(), launch.stores.result()
    # 40 active lanes in two warps; every load 32 bytes from the last: one sector each.
    assert (loads.requests, loads.lanes, loads.sectors) == (2, n, n)
    assert loads.distinct_bytes == loads.bytes_used == 4 * n
    assert loads.efficiency == pytest.approx(0.125)
    seg_starts, seg_ends = launch.loads.segments()
    expected = src.data_ptr() + 4 * stride * np.arange(n)
    assert seg_starts.tolist() == expected.tolist()
    assert (seg_ends - seg_starts).tolist() == [4] * n
    dst_sectors = {(lane // 32, (dst.data_ptr() + 4 * lane) // 32) for lane in range(n)}
    assert (stores.requests, stores.sectors) == (2, len(dst_sectors))
    assert stores.distinct_bytes == 4 * n
    assert launch.stores.distinct_bytes_within(dst.data_ptr(), dst.data_ptr() + dst.nbytes) == 160


def _launch_signature(launches):
    def describe(value):
        if isinstance(value, torch.Tensor):
            return (str(value.dtype), tuple(value.shape), tuple(value.stride()))
        return value

    return [(launch.name, tuple(launch.grid), tuple(map(describe, launch.args)),
             sorted((k, describe(v)) for k, v in launch.kwargs.items()))
            for launch in launches]


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("channel_last", [False, True], ids=["channel_first", "channel_last"])
def test_launcher_replay_launches_what_the_public_ops_launch(channel_last):
    # 9x9 = 81 steps: two chunks, so on a 132-SM GPU the scan takes the chunk-parallel schedule.
    path = ka.SEPARATE_OPS
    inputs = ka.make_path_inputs(1, 4, 9, 9, 2, channel_last=channel_last)
    leaves = [t.requires_grad_() for t in inputs.leaves()]
    with ka.capture_launches(132, path.sm_count_hooks) as public:
        out = path.run(inputs)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    with ka.capture_launches(132, path.sm_count_hooks) as replay:
        path.launch(inputs)
    assert {launch.name for launch in replay} == SCAN_KERNELS
    assert _launch_signature(replay) == _launch_signature(public)


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("height,width,num_sms", [(9, 9, 132), (40, 9, 4)],
                         ids=["sequential", "chunk_parallel"])
def test_fused_launcher_replay_launches_what_the_op_launches(height, width, num_sms):
    # 40x9 = 360 steps at 64-step tiles: 6 chunks, too few for the chunk-parallel schedule;
    # 8-step tiles (forced below) give 45, with 4 SMs it is chosen.
    from vmamba_mm.ops.ss2d_scan import triton_ss2d

    path = ka.FUSED
    inputs = ka.make_path_inputs(1, 4, height, width, 2)
    leaves = [t.requires_grad_() for t in inputs.leaves()]
    with mock.patch.object(triton_ss2d, "MAX_CHUNK", 8 if num_sms == 4 else 64):
        with ka.capture_launches(num_sms, path.sm_count_hooks) as public:
            out = path.run(inputs)
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        with ka.capture_launches(num_sms, path.sm_count_hooks) as replay:
            path.launch(inputs)
    names = [launch.name for launch in replay]
    # Chunk-parallel: carries, then one output launch per route pair (the second adds to the
    # first's y or dx); sequential: one output launch walking all four routes.
    carries = ["ss2d_chunk_state_kernel", "ss2d_propagate_kernel"]
    if num_sms == 4:
        assert names == carries + ["ss2d_forward_kernel"] * 2 + carries + [
            "ss2d_backward_kernel"] * 2
    else:
        assert names == ["ss2d_forward_kernel", "ss2d_backward_kernel"]
    assert _launch_signature(replay) == _launch_signature(public)


@pytest.mark.triton
@needs_interpreter
def test_fused_path_reads_near_the_ideal_with_coalesced_accesses():
    # The issue's second traffic shape; launchers choosing as on an H100.
    inputs = ka.make_path_inputs(1, 32, 12, 10, 4)
    result = ka.measure_traffic(ka.FUSED, inputs, "b1 12x10 D=32 N=4")
    assert [r.kernel for r in result.launches] == ["ss2d_forward_kernel", "ss2d_backward_kernel"]
    for phase in ("forward", "backward"):
        loads, stores = result.phase_totals(phase)
        ideal_read, ideal_write = result.ideal[phase]
        assert loads.distinct_bytes <= 1.5 * ideal_read, phase
        assert loads.efficiency >= 0.7 and stores.efficiency >= 0.7, phase
    # Stores: y and dx written once (one program walks the four routes), plus the checkpoints
    # and the dB/dC partials per channel block.
    for phase in ("forward", "backward"):
        _, stores = result.phase_totals(phase)
        assert stores.distinct_bytes <= 1.5 * result.ideal[phase][1], phase
    # x's bytes: read by the forward once per route pair program, never copied per route.
    forward = result.launches[0]
    x_start, x_end = forward.arguments["x_ptr"]
    assert forward.loads.distinct_bytes_within(x_start, x_end) == inputs.x.nbytes


@pytest.fixture(scope="module")
def tiny_traffic():
    inputs = ka.make_path_inputs(1, 4, 4, 4, 1)
    return inputs, ka.measure_traffic(ka.SEPARATE_OPS, inputs, "b1 4x4 D=4 N=1")


@pytest.mark.triton
@needs_interpreter
def test_traffic_of_todays_path_counts_the_materialised_routes(tiny_traffic):
    inputs, result = tiny_traffic
    x_bytes = inputs.x.nbytes
    assert [(r.phase, r.kernel) for r in result.launches] == [
        ("forward", "cross_scan_kernel"), ("forward", "_scan_fwd_kernel"),
        ("forward", "cross_merge_kernel"), ("backward", "cross_scan_kernel"),
        ("backward", "_scan_bwd_kernel"), ("backward", "cross_merge_kernel")]
    scan_in, scan, merge = result.launches[:3]
    # The cross-scan reads the image once and writes it four times (the routes).
    assert scan_in.loads.result().distinct_bytes == x_bytes
    assert scan_in.stores.result().distinct_bytes == 4 * x_bytes
    # The scan reads the routes, delta, B, C and its parameters, and writes y and a checkpoint.
    scan_reads = 4 * x_bytes + sum(t.nbytes for t in inputs.leaves()[1:])
    assert scan.loads.result().distinct_bytes == scan_reads
    assert scan.stores.result().distinct_bytes == 4 * x_bytes + 4 * inputs.A.numel()
    assert merge.stores.result().distinct_bytes == x_bytes
    loads, stores = result.phase_totals("forward")
    assert loads.distinct_bytes == x_bytes + scan_reads + 4 * x_bytes
    assert loads.distinct_bytes > result.ideal["forward"][0]
    assert stores.distinct_bytes > result.ideal["forward"][1]
    # One fp32 per channel row of length L = 16 per warp request: 4 of every 32 bytes used.
    assert scan.loads.result().efficiency < 0.2


@pytest.mark.triton
@needs_interpreter
def test_traffic_table_reports_every_launch_and_the_ideal(tiny_traffic):
    _, result = tiny_traffic
    table = load_tool().traffic_tables(result, markdown=True, by_tensor=True)
    assert table.count("| forward | ideal |") == 1 and "| backward | total / ideal |" in table
    assert "_scan_bwd_kernel" in table and "per tensor argument" in table


COMPILE_ONE_CONFIG = textwrap.dedent("""
    import json
    from vmamba_mm.ops import kernel_analysis as ka
    if ka.nvidia_tool("ptxas") is None or ka.nvidia_tool("cuobjdump") is None:
        print(json.dumps({"skip": "Triton's ptxas or cuobjdump is missing"}))
        raise SystemExit(0)
    inputs = ka.make_path_inputs(1, 8, 9, 9, 2, device="meta")
    specs = ka.collect_specializations([("tiny", ka.SEPARATE_OPS, inputs)], [90])
    rows = []
    for spec, labels in specs:
        c = ka.compile_specialization(spec)
        rows.append(dict(kernel=c.kernel, arch=c.arch, n_regs=c.n_regs, n_spills=c.n_spills,
                         shared=c.shared, num_warps=c.num_warps, loads=dict(c.loads),
                         stores=dict(c.stores), constexprs={k: str(v) for k, v in
                                                           c.constexprs.items()}))
    ptx_only = ka.compile_specialization(specs[0][0], ptx_only=True)
    print(json.dumps({"rows": rows, "ptx_only": [ptx_only.n_regs, dict(ptx_only.loads)]}))
""")


@pytest.mark.triton
def test_compile_report_gives_registers_and_spills_of_every_kernel_on_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", COMPILE_ONE_CONFIG], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    rows = report["rows"]
    assert {row["kernel"] for row in rows} == SCAN_KERNELS
    for row in rows:
        assert row["arch"] == 90
        assert isinstance(row["n_regs"], int) and 0 < row["n_regs"] <= 255, row
        assert isinstance(row["n_spills"], int) and row["n_spills"] >= 0, row
        assert isinstance(row["shared"], int) and row["num_warps"] >= 1, row
        assert row["loads"] and row["stores"], row
    fwd = next(r for r in rows if r["kernel"] == "_scan_fwd_kernel")
    # What the launcher picks for N=2 on a 132-SM GPU at batch 1: chunk-parallel, NP=2.
    assert fwd["constexprs"]["FROM_CKPT"] == "True" and fwd["constexprs"]["NP"] == "2"
    regs, loads = report["ptx_only"]
    assert regs is None and loads


@pytest.mark.slow
@pytest.mark.triton
def test_kernel_report_cli_compiles_for_sm90_even_with_the_interpreter_switched_on(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_CACHE_DIR=str(tmp_path))
    # VMamba-T's settings alone still launch every kernel (both schedules of both paths).
    result = subprocess.run([sys.executable, str(TOOL), "--compile", "--archs", "90",
                             "--models", "tiny", "--markdown"], env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "## Compile report" in out and "sm_80" not in out
    assert "VMamba-T 224x224 b32" in out and "VMamba-S" not in out and "vanilla" not in out
    for kernel in SCAN_KERNELS:
        assert f"| {kernel} | sm_90 |" in out
    if "ptxas is missing" not in out and "cuobjdump is missing" not in out:
        assert "n/a" not in out
