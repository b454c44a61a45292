"""Compile report and traffic model of the Triton kernels of ``vmamba_mm.ops``, without a GPU.

Two parts (the instruments live in ``vmamba_mm.ops.kernel_analysis``; its docstring defines every
figure precisely):

``--compile``
    Captures the launches the host launchers make for VMamba-T/S/B (v2: d_state 1, ssm_ratio 1)
    and the vanilla VMamba-T/S/B (d_state 16, ssm_ratio 2) at 224x224 batch 32, 512x512 batch 4
    and 1344x800 batch 2, stages 1-4 (strides 4, 8, 16, 32), fp32 and bf16 (AMP) activations,
    channel-first and channel-last SS2D, on ``meta`` tensors and with the SM count of each target
    GPU (sm_80: A100, 108 SMs; sm_90: H100, 132 SMs), deduplicates the specialisations the JIT
    would build, compiles each with ``triton.compile`` for a ``GPUTarget``, and prints registers,
    spills, shared memory, warps and the widths of the PTX global loads/stores. ``--models tiny``
    (comma-separated architecture names) limits the settings to those models.
``--traffic``
    Runs each path of ``SCAN_PATHS`` (cross_scan -> selective_scan -> cross_merge, and the fused
    ss2d_scan, both with backend "triton") forward and backward in Triton's interpreter with
    every ``tl.load`` and ``tl.store`` recorded, and prints per kernel launch the distinct bytes,
    bytes requested, 32-byte sectors requested and the sector efficiency, with the ideal traffic
    of the block to compare.
    Shapes: batch 1, 16x16 map, D=64, N=1 and batch 1, 12x10 map (H=12, W=10), D=32, N=4, fp32.

The compile part needs Triton's compiled mode and the traffic part its interpreter, so when both
run (or the current process already imported Triton in the other mode) each runs in its own
child process.

Usage:
    python tools/analysis_tools/kernel_report.py                      # both parts
    python tools/analysis_tools/kernel_report.py --compile --archs 80,90 --markdown
    python tools/analysis_tools/kernel_report.py --compile --archs 90 --models tiny
    python tools/analysis_tools/kernel_report.py --traffic --markdown --by-tensor
"""

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from vmamba_mm.ops import kernel_analysis as ka
from vmamba_mm.ops.triton_env import interpreter_enabled

MODELS = {
    "tiny": "VMamba-T",
    "small": "VMamba-S",
    "base": "VMamba-B",
    "vanilla-tiny": "vanilla VMamba-T",
    "vanilla-small": "vanilla VMamba-S",
    "vanilla-base": "vanilla VMamba-B",
}
# (label, batch, height, width)
INPUT_SHAPES = (("224x224 b32", 32, 224, 224), ("512x512 b4", 4, 512, 512),
                ("1344x800 b2", 2, 800, 1344))
STAGE_STRIDES = (4, 8, 16, 32)
ACTIVATION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (label, batch, D, H, W, N)
TRAFFIC_SHAPES = (("b1 16x16 D=64 N=1", 1, 64, 16, 16, 1), ("b1 12x10 D=32 N=4", 1, 32, 12, 10, 4))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   markdown: bool = True) -> str:
    """Formats rows as a Markdown table, or as aligned plain text when ``markdown`` is False."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compile_cases(paths: Sequence[ka.ScanPath], models: Sequence[str] = tuple(MODELS),
                  ) -> List[Tuple[str, ka.ScanPath, ka.PathInputs]]:
    """Every (model, shape, stage, dtype, layout) setting of every path, on ``meta`` tensors.

    Args:
        paths: the scan paths to launch.
        models: the architectures (keys of ``MODELS``) to include.

    Returns:
        [(label, path, meta inputs)].
    """
    from vmamba_mm.models.vmamba import ARCH_SETTINGS

    cases = []
    for path in paths:
        for arch in models:
            model, setting = MODELS[arch], ARCH_SETTINGS[arch]
            for shape, batch, height, width in INPUT_SHAPES:
                for stage, stride in enumerate(STAGE_STRIDES):
                    dim = int(setting["ssm_ratio"] * setting["dims"] * 2 ** stage)
                    h, w = -(-height // stride), -(-width // stride)
                    for dtype_name, dtype in ACTIVATION_DTYPES.items():
                        # The gated (vanilla) models scan in fp32 whatever the activations.
                        scan_dtype = torch.float32 if setting["gated"] else dtype
                        for channel_last in (False, True):
                            layout = "channel-last" if channel_last else "channel-first"
                            label = (f"{model} {shape} stage{stage + 1} [{dim}x{h}x{w}] "
                                     f"{dtype_name} {layout}")
                            if len(paths) > 1:
                                label = f"{path.name}: {label}"
                            inputs = ka.make_path_inputs(
                                batch, dim, h, w, setting["d_state"], dtype, scan_dtype,
                                channel_last, device="meta")
                            cases.append((label, path, inputs))
    return cases


def _tool_line(name: str) -> str:
    path = ka.nvidia_tool(name)
    if path is None:
        return f"- {name}: not found"
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip().splitlines()[-1]
    except OSError as err:
        version = f"does not run: {err}"
    return f"- {name}: {path} ({version})"


def _range(values: Sequence[Optional[int]]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    return str(min(known)) if min(known) == max(known) else f"{min(known)}-{max(known)}"


def _constexprs(config: ka.CompiledConfig) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                    for k, v in config.constexprs.items())


def compile_section(archs: Sequence[int], markdown: bool,
                    models: Sequence[str] = tuple(MODELS)) -> str:
    """Runs the compile report and formats it.

    Args:
        archs: compute capabilities (80, 90, ...).
        markdown: Markdown tables instead of plain text.
        models: the architectures (keys of ``MODELS``) whose settings are compiled.

    Returns:
        The report text.
    """
    import triton

    ptxas, cuobjdump = ka.nvidia_tool("ptxas"), ka.nvidia_tool("cuobjdump")
    lines = [f"## Compile report (triton {triton.__version__}, targets "
             f"{', '.join(f'sm_{a}' for a in archs)})", "",
             _tool_line("ptxas"), _tool_line("cuobjdump")]
    if ptxas is None:
        lines.append("- ptxas is missing: only PTX was built; registers and spills are n/a.")
    elif cuobjdump is None:
        lines.append("- cuobjdump is missing: registers and spills are n/a.")
    cases = compile_cases(ka.SCAN_PATHS, models)
    specs = ka.collect_specializations(cases, archs)
    lines.append(f"- {len(cases)} settings per target, {len(specs)} distinct specialisations")
    configs: List[ka.CompiledConfig] = []
    start = time.time()
    for i, (spec, labels) in enumerate(specs):
        print(f"[{time.time() - start:6.1f}s] compiling {i + 1}/{len(specs)} {spec.name} "
              f"sm_{spec.arch}", file=sys.stderr, flush=True)
        config = ka.compile_specialization(spec, cuobjdump=cuobjdump)
        config.settings = labels
        configs.append(config)

    by_kernel: Dict[Tuple[str, int], List[ka.CompiledConfig]] = {}
    for config in configs:
        by_kernel.setdefault((config.kernel, config.arch), []).append(config)
    summary = []
    for (kernel, arch), group in by_kernel.items():
        loads, stores = Counter(), Counter()
        for config in group:
            loads.update({k: 1 for k in config.loads})
            stores.update({k: 1 for k in config.stores})
        spills = [c.n_spills for c in group]
        summary.append([
            kernel, f"sm_{arch}", len(group), _range([c.num_warps for c in group]),
            _range([c.n_regs for c in group]), _range(spills),
            sum(1 for s in spills if s) if None not in spills else "n/a",
            _range([c.shared for c in group]),
            ", ".join(sorted(loads)) or "-", ", ".join(sorted(stores)) or "-",
        ])
    lines += ["", "Summary per kernel and target (ranges over its specialisations):", "",
              markdown_table(
                  ["kernel", "target", "configs", "warps", "registers", "spills",
                   "configs with spills", "shared (B)", "global load widths",
                   "global store widths"], summary, markdown)]
    rows = [[c.kernel, f"sm_{c.arch}", _constexprs(c), ",".join(c.divisible_by_16) or "-",
             "/".join(sorted(set(c.pointer_dtypes.values()))), c.num_warps,
             "n/a" if c.n_regs is None else c.n_regs, "n/a" if c.n_spills is None else c.n_spills,
             c.shared, ka.format_accesses(c.loads), ka.format_accesses(c.stores),
             f"{len(c.settings)}: {c.settings[0]}"] for c in configs]
    lines += ["", "Every specialisation (PTX counts are static instructions; 'used by' counts the "
              "settings that launch it and names the first):", "",
              markdown_table(
                  ["kernel", "target", "constexprs", "ints % 16 == 0", "pointer dtypes", "warps",
                   "registers", "spills", "shared (B)", "global loads (PTX)",
                   "global stores (PTX)", "used by"], rows, markdown)]
    return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def _access_cells(totals: ka.AccessTotals) -> List[str]:
    return [_kib(totals.distinct_bytes), _kib(totals.bytes_requested), str(totals.sectors),
            f"{100 * totals.efficiency:.1f}%"]


def traffic_tables(result: ka.TrafficResult, markdown: bool, by_tensor: bool) -> str:
    """Formats one ``TrafficResult``: per launch, per phase totals, ideal and ratios.

    Args:
        result: from ``kernel_analysis.measure_traffic``.
        markdown: Markdown tables instead of plain text.
        by_tensor: add the distinct bytes per tensor argument of every launch.

    Returns:
        The tables.
    """
    headers = ["phase", "kernel", "programs", "load distinct KiB", "load requested KiB",
               "load sectors", "load efficiency", "store distinct KiB", "store requested KiB",
               "store sectors", "store efficiency"]
    rows = []
    for launch in result.launches:
        rows.append([launch.phase, launch.kernel, launch.programs,
                     *_access_cells(launch.loads.result()), *_access_cells(launch.stores.result())])
    for phase, (ideal_read, ideal_write) in result.ideal.items():
        loads, stores = result.phase_totals(phase)
        rows.append([phase, "**total**", "", *_access_cells(loads), *_access_cells(stores)])
        rows.append([phase, "ideal", "", _kib(ideal_read), "", "", "", _kib(ideal_write),
                     "", "", ""])
        rows.append([phase, "total / ideal", "", f"x{loads.distinct_bytes / ideal_read:.2f}",
                     "", "", "", f"x{stores.distinct_bytes / ideal_write:.2f}", "", "", ""])
    text = [f"### {result.path}: {result.label}", "",
            markdown_table(headers, rows, markdown)]
    if by_tensor:
        for i, launch in enumerate(result.launches):
            arg_rows = [[name, _kib(end - start),
                         _kib(launch.loads.distinct_bytes_within(start, end)),
                         _kib(launch.stores.distinct_bytes_within(start, end))]
                        for name, (start, end) in launch.arguments.items()]
            text += ["", f"Launch {i + 1} ({launch.phase} {launch.kernel}), per tensor argument:",
                     "", markdown_table(["argument", "extent KiB", "loaded KiB", "stored KiB"],
                                           arg_rows, markdown)]
    return "\n".join(text)


def traffic_section(markdown: bool, by_tensor: bool, channel_last: bool, num_sms: int) -> str:
    """Runs the traffic model of every path at ``TRAFFIC_SHAPES`` and formats it.

    Args:
        markdown: Markdown tables instead of plain text.
        by_tensor: add per-argument breakdowns.
        channel_last: merge to channel-last output (SS2D ``channel_first=False``).
        num_sms: SM count the launchers see when choosing schedules and grids (0: the
            interpreter's own choices).

    Returns:
        The report text.
    """
    layout = "channel-last" if channel_last else "channel-first"
    schedule = (f"launchers choosing as on a {num_sms}-SM GPU" if num_sms
                else "the interpreter's schedules")
    lines = [f"## Traffic model (Triton interpreter, fp32, {layout} merge, {schedule})", ""]
    summary = []
    for path in ka.SCAN_PATHS:
        for label, batch, dim, height, width, d_state in TRAFFIC_SHAPES:
            print(f"recording {path.name} at {label}", file=sys.stderr, flush=True)
            inputs = ka.make_path_inputs(batch, dim, height, width, d_state,
                                         channel_last=channel_last)
            result = ka.measure_traffic(path, inputs, label, num_sms=num_sms or None)
            lines += [traffic_tables(result, markdown, by_tensor), ""]
            for phase, (ideal_read, ideal_write) in result.ideal.items():
                loads, stores = result.phase_totals(phase)
                summary.append([
                    path.name, label, phase,
                    f"{_kib(loads.distinct_bytes)} / {_kib(ideal_read)} "
                    f"(x{loads.distinct_bytes / ideal_read:.2f})",
                    f"{_kib(stores.distinct_bytes)} / {_kib(ideal_write)} "
                    f"(x{stores.distinct_bytes / ideal_write:.2f})",
                    f"{100 * loads.efficiency:.1f}%", f"{100 * stores.efficiency:.1f}%"])
    lines += ["Summary:", "", markdown_table(
        ["path", "shape", "phase", "read KiB: distinct / ideal", "written KiB: distinct / ideal",
         "load efficiency", "store efficiency"], summary, markdown)]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", action="store_true", help="run the compile report")
    parser.add_argument("--traffic", action="store_true", help="run the traffic model")
    parser.add_argument("--archs", default="80,90",
                        help="compute capabilities to compile for (default 80,90); the "
                        "launchers see the SM count of an A100 for 80 and of an H100 for 90, and "
                        "make their no-GPU choices for any other")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="compile: comma-separated architectures whose settings are compiled "
                        f"(default: all of {', '.join(MODELS)})")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--by-tensor", action="store_true",
                        help="traffic: also break each launch down by tensor argument")
    parser.add_argument("--channel-last", action="store_true",
                        help="traffic: merge to channel-last output (SS2D channel_first=False)")
    parser.add_argument("--sms", type=int, default=ka.GPU_SMS[90],
                        help="traffic: SM count the launchers assume when they choose schedules "
                        "and grids (default: an H100's 132; 0: the interpreter's own choices)")
    args = parser.parse_args(argv)
    try:
        args.arch_list = [int(a) for a in args.archs.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--archs must be comma-separated integers such as 80,90, got {args.archs!r}")
    if not args.arch_list:
        parser.error("--archs names no target")
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.model_list if m not in MODELS]
    if unknown or not args.model_list:
        parser.error(f"--models takes a comma-separated subset of {', '.join(MODELS)}, got "
                     f"{args.models!r}")
    return args


def _run_part(part: str, args: argparse.Namespace) -> str:
    if part == "compile":
        return compile_section(args.arch_list, args.markdown, args.model_list)
    return traffic_section(args.markdown, args.by_tensor, args.channel_last, args.sms)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the requested parts; each in this process when Triton's mode allows it.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    parts = [p for p in ("compile", "traffic") if getattr(args, p)] or ["compile", "traffic"]
    common = [a for a in argv if a not in ("--compile", "--traffic")]
    status = 0
    for part in parts:
        wants_interpreter = part == "traffic"
        if "triton" not in sys.modules:
            # Triton reads TRITON_INTERPRET when it is first imported.
            if wants_interpreter:
                os.environ["TRITON_INTERPRET"] = "1"
            else:
                os.environ.pop("TRITON_INTERPRET", None)
        if interpreter_enabled() == wants_interpreter:
            print(_run_part(part, args), flush=True)
            continue
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if wants_interpreter:
            env["TRITON_INTERPRET"] = "1"
        child = subprocess.run([sys.executable, os.path.abspath(__file__), f"--{part}", *common],
                               env=env, check=False)
        status = status or child.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
