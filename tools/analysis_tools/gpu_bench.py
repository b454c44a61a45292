"""GPU figures for docs/BENCHMARKS.md: the SS2D scan path and the VMamba-T backbone vs Swin-T.

Run by ``tools/gpu_check.sh`` on a machine with one CUDA GPU (torch, Triton and timm; no
mmcv/mmdet/mmseg needed). Prints one Markdown table of three parts:

1. the SS2D scan path at VMamba-T's stage shapes (224x224 batch 128 and 1344x800 batch 2, stages
   1-4: maps at strides 4, 8, 16, 32, D = 96, 192, 384, 768, N = 1), forward and forward+backward,
   timed with ``triton.testing.do_bench`` (median). Each path is one row: today's
   ``cross_scan -> selective_scan -> cross_merge`` and the fused ``vmamba_mm.ops.ss2d_scan``
   (``backend="auto"``: its Triton kernels on a GPU). GB/s counts the ideal traffic (x, delta,
   B, C read once, y written once; the backward adds dy read and every gradient written once,
   in the inputs' dtype) and is set against a device-to-device copy measured in the same run;
2. VMamba-T and timm's ``swin_tiny_patch4_window7_224`` backbones at 224x224, batch 64, bf16
   autocast: training (forward + backward + SGD step) and inference images per second, and
   their ratio.

``--smoke`` runs every part on the CPU at tiny shapes with ``time.perf_counter`` instead, so that
CI keeps the script working; its numbers mean nothing.

Usage:
    python tools/analysis_tools/gpu_bench.py [--smoke] [--batch 64] [--skip-backbone]
"""

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from vmamba_mm.ops import cross_merge, cross_scan, selective_scan, ss2d_scan

K = 4
DIMS = (96, 192, 384, 768)
STRIDES = (4, 8, 16, 32)
# (label, batch, height, width) of the input images.
IMAGE_SHAPES = (("224x224 b128", 128, 224, 224), ("1344x800 b2", 2, 800, 1344))
SMOKE_SHAPES = (("smoke 32x32 b2", 2, 32, 32),)


def _median_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Median run time of ``fn``: triton's do_bench on CUDA, a perf_counter loop on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """GB/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / seconds / 1e9


def scan_inputs(batch: int, height: int, width: int, channels: int, device: torch.device,
                dtype: torch.dtype, natural: bool) -> Dict[str, torch.Tensor]:
    """Random SS2D scan inputs (gradients on), in the layout a path consumes.

    Args:
        natural: the fused op's layout: x [B, H, W, D], delta [B, H, W, K, D], B and C
            [B, H, W, K, 1], as the projections give them in natural order. Otherwise today's:
            x [B, D, H, W] (cross-scanned inside the path), delta [B, K*D, L] and B, C
            [B, K, 1, L] already in route order (the old SS2D projected the four copies).

    Returns:
        The inputs by name, with A [K*D, 1], D and delta_bias [K*D] in float32.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    length = height * width

    def make(*shape: int, scale: float = 1.0, fp32: bool = False) -> torch.Tensor:
        value = (torch.randn(*shape, generator=generator) * scale).to(device)
        return (value if fp32 else value.to(dtype)).requires_grad_(True)

    if natural:
        shapes = dict(x=(batch, height, width, channels),
                      delta=(batch, height, width, K, channels),
                      B=(batch, height, width, K, 1), C=(batch, height, width, K, 1))
    else:
        shapes = dict(x=(batch, channels, height, width), delta=(batch, K * channels, length),
                      B=(batch, K, 1, length), C=(batch, K, 1, length))
    inputs = {name: make(*shape, scale=0.5 if name == "delta" else 1.0)
              for name, shape in shapes.items()}
    inputs["A"] = (-torch.rand(K * channels, 1, generator=generator) - 0.5).to(device)
    inputs["A"].requires_grad_(True)
    inputs["D"] = make(K * channels, fp32=True)
    inputs["delta_bias"] = make(K * channels, scale=0.1, fp32=True)
    return inputs


def todays_path(t: Dict[str, torch.Tensor]) -> torch.Tensor:
    """cross_scan -> selective_scan -> cross_merge, as SS2D ran it: y [B, D, H, W] float32."""
    batch, channels, height, width = t["x"].shape
    xs = cross_scan(t["x"]).reshape(batch, K * channels, height * width)
    ys = selective_scan(xs, t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"],
                        delta_softplus=True)
    return cross_merge(ys.view(batch, K, channels, height, width)).view(
        batch, channels, height, width)


def fused_path(t: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``vmamba_mm.ops.ss2d_scan``: y [B, H, W, D] float32."""
    return ss2d_scan(t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["delta_bias"])


def ideal_bytes(t: Dict[str, torch.Tensor], backward: bool) -> int:
    """Bytes a perfect kernel moves: every input read once, y (fp32) written once; the backward
    also reads dy and writes a gradient per input."""
    inputs = sum(v.numel() * v.element_size() for v in t.values())
    y = t["x"].numel() * 4
    return inputs + y + ((y + inputs) if backward else 0)


def scan_rows(device: torch.device, dtype: torch.dtype, smoke: bool) -> List[str]:
    rows = []
    copy = copy_bandwidth(device, 8 if smoke else 1024)
    rows.append(f"| copy (device to device) | | | | {copy:.0f} GB/s | 100% |")
    for label, batch, height, width in SMOKE_SHAPES if smoke else IMAGE_SHAPES:
        for stage, (channels, stride) in enumerate(zip(DIMS[:2] if smoke else DIMS, STRIDES)):
            h, w = -(-height // stride), -(-width // stride)
            for name, path, natural in (("cross_scan+scan+merge", todays_path, False),
                                        ("ss2d_scan", fused_path, True)):
                t = scan_inputs(batch, h, w, channels, device, dtype, natural)
                y = path(t)
                grad = torch.randn_like(y)
                fwd = _median_seconds(lambda p=path, t=t: p(t), device)
                both = _median_seconds(
                    lambda p=path, t=t, g=grad: torch.autograd.backward(p(t), g), device)
                speed = ideal_bytes(t, backward=True) / both / 1e9
                rows.append(f"| {name} | {label} s{stage + 1} {h}x{w} D={channels} | "
                            f"{fwd * 1e3:.3f} | {both * 1e3:.3f} | {speed:.1f} GB/s | "
                            f"{100 * speed / copy:.0f}% |")
    return rows


def backbone_rows(device: torch.device, batch: int, smoke: bool) -> List[str]:
    from vmamba_mm.models import VMamba

    size = 64 if smoke else 224
    builders: List[Tuple[str, Callable[[], torch.nn.Module]]] = [
        ("VMamba-T (s1l8)", lambda: VMamba("tiny"))]
    try:
        import timm
    except ImportError:
        timm = None
    else:
        builders.append(("Swin-T (timm)", lambda: timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, img_size=size,
            features_only=True)))
    autocast_dtype = torch.bfloat16
    images = torch.randn(batch, 3, size, size, device=device)
    results = {}
    for name, build in builders:
        model = build().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

        def train_step(model=model, optimizer=optimizer) -> None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                loss = sum(f.float().mean() for f in model(images))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def infer(model=model) -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype):
                model(images)

        model.train()
        train = batch / _median_seconds(train_step, device)
        model.eval()
        results[name] = (train, batch / _median_seconds(infer, device))
        del model, optimizer
    rows = [f"| {name} | {size}x{size} b{batch} bf16 | train {t:.0f} img/s | infer {i:.0f} img/s "
            "| | |" for name, (t, i) in results.items()]
    if timm is None:
        return rows + ["| Swin-T | timm is not installed: not measured | | | | |"]
    vm, swin = results["VMamba-T (s1l8)"], results["Swin-T (timm)"]
    rows.append(f"| VMamba-T / Swin-T | | train {vm[0] / swin[0]:.2f} | infer {vm[1] / swin[1]:.2f}"
                " | | |")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, to check the script runs")
    parser.add_argument("--batch", type=int, default=64, help="backbone batch size")
    parser.add_argument("--skip-backbone", action="store_true")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run with --smoke to check the script on the CPU.")
    device = torch.device("cpu" if args.smoke else "cuda")
    where = "CPU (smoke run: numbers mean nothing)" if args.smoke else torch.cuda.get_device_name()
    print(f"### {where}, torch {torch.__version__}\n")
    print("| path | shape | fwd ms | fwd+bwd ms | fwd+bwd ideal bytes/s | % of copy |")
    print("|---|---|---|---|---|---|")
    for row in scan_rows(device, torch.float32 if args.smoke else torch.bfloat16, args.smoke):
        print(row)
    if not args.skip_backbone:
        for row in backbone_rows(device, 2 if args.smoke else args.batch, args.smoke):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
