"""Measures the Triton kernels of ``vmamba_mm.ops`` without a GPU: compile report and traffic model.

DESIGN.md ("Kernels") names what decides a kernel's speed on a GPU: coalescing, traffic, enough
parallel programs and no spills. This package measures what a CPU-only machine can see of them;
``tools/analysis_tools/kernel_report.py`` prints the tables.

* ``paths``: the scan-block paths (``SCAN_PATHS``: today's three ops and the fused
  ``ss2d_scan``), their inputs and their ideal traffic.
* ``launches``: captures the launches a path's host launchers make, on ``meta`` tensors.
* ``compile_report``: compiles each distinct launch for sm_80/sm_90 and reads registers, spills,
  shared memory and the widths of the PTX global loads/stores.
* ``sectors``: warp requests, 32-byte sectors and distinct bytes of recorded accesses.
* ``traffic``: records every ``tl.load``/``tl.store`` of the interpreted kernels.

Nothing here imports Triton at import time, and ``vmamba_mm.ops`` does not import this package.
The compile report needs Triton's compiled mode (``TRITON_INTERPRET`` unset when Triton is first
imported); the traffic model needs the interpreter (``TRITON_INTERPRET=1``): run them in separate
processes.
"""

from .compile_report import (
    CompiledConfig,
    Specialization,
    collect_specializations,
    compile_specialization,
    cubin_resource_usage,
    format_accesses,
    nvidia_tool,
    parse_resource_usage,
    ptx_global_accesses,
    specialize_launch,
)
from .launches import CapturedLaunch, capture_launches, reported_sm_count
from .paths import (
    FUSED,
    GPU_SMS,
    ROUTES,
    SCAN_PATHS,
    SEPARATE_OPS,
    PathInputs,
    ScanPath,
    ideal_traffic,
    make_path_inputs,
    natural_order,
)
from .sectors import (
    SECTOR_BYTES,
    WARP_SIZE,
    AccessLog,
    AccessTotals,
    union_segments,
    warp_request_stats,
)
from .traffic import (
    LaunchRecord,
    MemoryRecorder,
    TrafficResult,
    measure_traffic,
    record_memory_accesses,
)

__all__ = [
    "GPU_SMS",
    "ROUTES",
    "FUSED",
    "SCAN_PATHS",
    "SECTOR_BYTES",
    "SEPARATE_OPS",
    "WARP_SIZE",
    "AccessLog",
    "AccessTotals",
    "CapturedLaunch",
    "CompiledConfig",
    "LaunchRecord",
    "MemoryRecorder",
    "PathInputs",
    "ScanPath",
    "Specialization",
    "TrafficResult",
    "capture_launches",
    "collect_specializations",
    "compile_specialization",
    "cubin_resource_usage",
    "format_accesses",
    "ideal_traffic",
    "make_path_inputs",
    "natural_order",
    "measure_traffic",
    "nvidia_tool",
    "parse_resource_usage",
    "ptx_global_accesses",
    "record_memory_accesses",
    "reported_sm_count",
    "specialize_launch",
    "union_segments",
    "warp_request_stats",
]
