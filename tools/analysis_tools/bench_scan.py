"""Benchmark of the selective scan: every available backend at the real VMamba shapes.

Times the forward (no autograd) and forward+backward of each backend, plus two reference loops:

* ``unbind loop``: the naive reference (autograd through a per-token loop over ``unbind``);
* ``index loop``: a per-token loop that indexes ``x[..., t]`` under autograd, the way the official
  pure-PyTorch fallback does (its backward is quadratic in L, so it only runs where that is
  affordable, and always at the acceptance shape [1, 384, 3136, N=1]).

Times are the minimum over the repeats after one warm-up call (10 repeats; the reference loops,
which take seconds per call, 3), since on a shared machine other jobs only ever add time; the
fast backends run once before and once after the loops, and the better run is kept. Every
measurement runs in a fresh child process so that the peak memory is its own: on CPU the growth
of the child's peak RSS over its inputs (``resource``), on CUDA
``torch.cuda.max_memory_allocated`` above the inputs. On GPU the table also gives the forward's
achieved bandwidth, counting the bytes of reading u, delta, B, C once and writing y once, and its
fraction of the device's memory bandwidth.

Usage:
    python tools/analysis_tools/bench_scan.py            # all shapes
    python tools/analysis_tools/bench_scan.py --quick    # the acceptance shapes only
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

# (name, batch, K*D channels, L, N). VMamba-T v2 (d_inner 96 at stage 1, N=1) at 224 and 512,
# its later stages at 224, a training batch, and the vanilla VMamba-T (d_inner 192, N=16).
SHAPES = [
    ("T224 stage1", 1, 384, 3136, 1),
    ("T224 stage2", 1, 768, 784, 1),
    ("T224 stage3", 1, 1536, 196, 1),
    ("T224 stage4", 1, 3072, 49, 1),
    ("T512 stage1", 1, 384, 16384, 1),
    ("T224 stage1 b8", 8, 384, 3136, 1),
    ("vanilla T224 stage1", 1, 768, 3136, 16),
]
QUICK = ("T224 stage1", "vanilla T224 stage1")
ACCEPTANCE = {
    # shape name: [(reference, minimum speed-up of torch fwd+bwd over it)]
    "T224 stage1": [("unbind loop", 20.0), ("index loop", 100.0)],
    "vanilla T224 stage1": [("unbind loop", 10.0)],
}
GROUPS = 4


def index_loop_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Per-token loop indexing ``x[..., t]`` under autograd (the official fallback's pattern)."""
    import torch
    import torch.nn.functional as F

    batch, channels, length = u.shape
    per_group = channels // B.shape[1]
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.float().repeat_interleave(per_group, dim=1)  # [b, K*D, N, L]
    C = C.float().repeat_interleave(per_group, dim=1)
    decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # [b, K*D, N, L]
    drive = (delta * u)[:, :, None, :] * B  # [b, K*D, N, L]
    h = u.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return y if D is None else y + u * D[None, :, None]


def _make_inputs(batch, channels, length, d_state, device, requires_grad):
    import torch

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        x = (torch.randn(*shape, generator=gen) * scale + shift).to(device)
        return x.requires_grad_(requires_grad)

    A = (-torch.exp(torch.rand(channels, d_state, generator=gen))).to(device)
    return dict(
        u=rand(batch, channels, length),
        delta=rand(batch, channels, length, scale=0.5, shift=-2.0),
        A=A.requires_grad_(requires_grad),
        B=rand(batch, GROUPS, d_state, length),
        C=rand(batch, GROUPS, d_state, length),
        D=rand(channels),
        delta_bias=rand(channels, scale=0.1),
        delta_softplus=True,
    )


def _scan_function(backend: str):
    if backend == "unbind loop":
        from vmamba_mm.ops import selective_scan_naive

        return selective_scan_naive
    if backend == "index loop":
        return index_loop_scan
    from vmamba_mm.ops import selective_scan

    return lambda **kw: selective_scan(**kw, backend=backend)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(spec: Dict) -> Dict:
    """Runs one (shape, backend, mode) measurement; returns times (s) and peak memory (bytes)."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    backward = spec["mode"] == "fwd+bwd"
    fn = _scan_function(spec["backend"])
    inputs = _make_inputs(*spec["shape"], device, requires_grad=backward)
    grad_inputs = [v for v in inputs.values() if isinstance(v, torch.Tensor)]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step():
        if backward:
            y = fn(**inputs)
            torch.autograd.grad(y, grad_inputs, torch.ones_like(y))
        else:
            with torch.no_grad():
                fn(**inputs)

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_rss_bytes()
    start = time.perf_counter()
    step()  # the first call also compiles/warms up; it is timed only when nothing else runs
    sync()
    first = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()) - base
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    # The minimum over the repeats: on a shared machine the other jobs only ever add time.
    return {"time": min(times) if times else first, "peak": max(peak, 0)}


def _measure(spec: Dict, timeout: float) -> Optional[Dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"measurement {spec} failed:\n{err.stderr}") from err
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bytes_moved(batch, channels, length, d_state, itemsize=4) -> int:
    """Reading u, delta, B, C once and writing y (fp32) once."""
    return (2 * batch * channels * length + 2 * batch * GROUPS * d_state * length) * itemsize + (
        batch * channels * length * 4
    )


def _device_bandwidth(device) -> (float, str):
    """The device's memory bandwidth in bytes/s: from its properties, else a measured copy."""
    import torch

    props = torch.cuda.get_device_properties(device)
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    width = getattr(props, "memory_bus_width", 0)  # bits
    if clock and width:
        return 2 * clock * 1e3 * width / 8, "spec (2 x memory clock x bus width)"
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize(device)
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - start), "measured device-to-device copy"


def _backends(device: str) -> List[str]:
    names = ["torch"]
    if device == "cuda":
        from vmamba_mm.ops.selective_scan.interface import triton_available

        if triton_available():
            names.insert(0, "triton")
    return names


def _loop_affordable(backend: str, shape, mode: str, device: str) -> bool:
    """Whether a reference loop finishes in reasonable time (the acceptance shapes always do)."""
    _, batch, channels, length, d_state = shape
    if backend == "unbind loop":
        return batch * length <= 16384 or device == "cuda"
    # index loop: the backward of every x[..., t] touches the whole [.., L] tensor.
    if shape[0] in ACCEPTANCE and d_state == 1:
        return True
    return length <= 784 and (mode == "fwd" or batch * channels * length <= 2_000_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the acceptance shapes only")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated substrings; only shapes whose name contains one")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed repeats per backend (the reference loops: at most 3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK]
    if args.shapes:
        wanted = [w.strip() for w in args.shapes.split(",")]
        shapes = [s for s in shapes if any(w in s[0] for w in wanted)]
    bandwidth, bandwidth_source = (None, "")
    if device == "cuda":
        bandwidth, bandwidth_source = _device_bandwidth(torch.device("cuda"))
    print(f"# selective scan benchmark on {device}: torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, threads "
          f"{args.threads or torch.get_num_threads()}")
    if bandwidth:
        print(f"# memory bandwidth {bandwidth / 1e9:.0f} GB/s ({bandwidth_source})")
    header = "| shape [B, K*D, L, N] | backend | mode | time (ms) | peak mem (MB) |"
    header += " GB/s | % of bandwidth |" if bandwidth else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results = {}
    for shape in shapes:
        name, *dims = shape
        for mode in ("fwd", "fwd+bwd"):
            backends = _backends(device)
            loops = [b for b in ("unbind loop", "index loop")
                     if _loop_affordable(b, shape, mode, device)]
            # The fast backends are measured before and after the loops, in two processes, and
            # keep the better run: a slow spell of the shared machine then has to last through
            # the loops to distort them. The loops take seconds per call: at most 3 timed calls.
            order = backends + loops + (backends if loops else [])
            rows = {}
            for backend in order:
                loop = backend in loops
                spec = {"shape": dims, "backend": backend, "mode": mode, "device": device,
                        "threads": args.threads, "repeats": min(3, repeats) if loop else repeats}
                result = _measure(spec, args.timeout)
                earlier = rows.get(backend)
                if earlier is not None and (result is None or earlier["time"] <= result["time"]):
                    continue
                rows[backend] = result
            for backend in backends + loops:
                result = rows[backend]
                if result is None:
                    print(f"| {name} {dims} | {backend} | {mode} | > {args.timeout:.0f} s | | ")
                    continue
                results[(name, backend, mode)] = result
                row = (f"| {name} {dims} | {backend} | {mode} | {result['time'] * 1e3:.2f} | "
                       f"{result['peak'] / 2**20:.0f} |")
                if bandwidth:
                    if mode == "fwd":
                        rate = _bytes_moved(*dims) / result["time"]
                        row += f" {rate / 1e9:.0f} | {100 * rate / bandwidth:.1f} |"
                    else:
                        row += " | |"
                print(row, flush=True)
    print()
    for name, checks in ACCEPTANCE.items():
        fast = results.get((name, "torch", "fwd+bwd"))
        for reference, needed in checks:
            slow = results.get((name, reference, "fwd+bwd"))
            if fast is None or slow is None:
                continue
            ratio = slow["time"] / fast["time"]
            verdict = "meets" if ratio >= needed else "MISSES"
            print(f"{name}: torch fwd+bwd is {ratio:.1f}x faster than the {reference} "
                  f"(target >= {needed:.0f}x: {verdict})")


if __name__ == "__main__":
    main()
