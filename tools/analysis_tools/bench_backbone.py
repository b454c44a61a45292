"""CPU forward time of the VMamba-T backbone next to mmdet's Swin-T, in the same process.

Times ``backbone(images)`` under ``torch.inference_mode`` at 1x3x512x512 and 2x3x224x224 (median of
``--repeats`` runs after one warm-up) for VMamba-T (s1l8, torch scan backend) in the channel-first
and channel-last layouts, and for ``mmdet.models.backbones.SwinTransformer`` with the Swin-T
settings. Prints a Markdown table and, with ``--write``, puts it in a "Backbone forward (CPU)"
section at the end of docs/BENCHMARKS.md (replacing that section only, if present).

Usage:
    python tools/analysis_tools/bench_backbone.py [--repeats 3] [--write docs/BENCHMARKS.md]
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

from vmamba_mm.models import VMamba

SECTION = "## Backbone forward (CPU)"
SHAPES: List[Tuple[int, int, int, int]] = [(1, 3, 512, 512), (2, 3, 224, 224)]


def build_swin_t() -> torch.nn.Module:
    from mmdet.models.backbones import SwinTransformer

    return SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                           window_size=7, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.2,
                           out_indices=(0, 1, 2, 3))


def time_forward(model: torch.nn.Module, shape: Tuple[int, ...], repeats: int) -> float:
    """Median seconds of one forward pass."""
    images = torch.randn(*shape)
    times = []
    with torch.inference_mode():
        model(images)  # warm-up (allocator, lazy init)
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def run(repeats: int) -> str:
    torch.manual_seed(0)
    builders: List[Tuple[str, Callable[[], torch.nn.Module]]] = [
        ("VMamba-T (s1l8), ln2d, torch scan",
         lambda: VMamba("tiny", channel_first=True, scan_backend="torch")),
        ("VMamba-T (s1l8), ln, torch scan",
         lambda: VMamba("tiny", channel_first=False, scan_backend="torch")),
        ("Swin-T (mmdet SwinTransformer)", build_swin_t),
    ]
    header = "| backbone | params | " + " | ".join(
        "x".join(map(str, s)) + " fwd (s)" for s in SHAPES) + " |"
    rows = [header, "|" + "---|" * (2 + len(SHAPES))]
    for name, build in builders:
        model = build()
        model.eval()  # not chained: mmdet's Swin.train() returns None
        cells = [f"{time_forward(model, shape, repeats):.3f}" for shape in SHAPES]
        rows.append(f"| {name} | {params_m(model):.2f}M | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    cpu = platform.processor() or platform.machine()
    notes = (f"\nMedian of {repeats} runs after one warm-up, `torch.inference_mode`, fp32, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} "
             f"CPU cores ({cpu}); the machine was shared with other jobs, so treat the numbers "
             "as a same-run comparison. Command: `python "
             "tools/analysis_tools/bench_backbone.py --write docs/BENCHMARKS.md`.\n")
    return "\n".join(rows) + "\n" + notes


def write_section(path: Path, body: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; create it (or drop --write) first.")
    text = path.read_text()
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start].rstrip("\n") + ("\n\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + f"\n\n{SECTION}\n\n" + body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None,
                        help="Markdown file to put the section in (e.g. docs/BENCHMARKS.md)")
    args = parser.parse_args(argv)
    body = run(args.repeats)
    print(body)
    if args.write:
        write_section(args.write, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
