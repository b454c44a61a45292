"""Compile report: registers, spills, shared memory and PTX access widths per specialisation.

``specialize_launch`` turns a captured launch into the signature, constexprs and
``tt.divisibility`` attributes the JIT would derive for it, through the JIT's own binder (integers
equal to 1 become constexprs, multiples of 16 get the divisibility hint; every pointer is taken to
be 16-byte aligned, which fresh CUDA allocations and contiguous copies are).
``compile_specialization`` compiles one with ``triton.compile`` for a ``GPUTarget`` (sm_80,
sm_90; no GPU needed) and reads: shared memory and warps from the metadata; registers and spills
from ``cuobjdump -res-usage`` on the cubin (REG, and LOCAL bytes / 4, which is what Triton's CUDA
driver reports as ``n_regs``/``n_spills`` after loading the binary on a GPU); the global loads and
stores of the PTX by vector width and bit width (static instruction counts). Triton bundles
``ptxas`` and ``cuobjdump`` (``triton/backends/nvidia/bin``); without ptxas only the PTX is built,
and registers and spills are reported as unavailable.

Needs Triton's compiled mode (``TRITON_INTERPRET`` unset when Triton is first imported).
"""

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .launches import CapturedLaunch, capture_launches
from .paths import GPU_SMS, PathInputs, ScanPath

WARP_SIZE = 32
# PTX version to build when ptxas (which Triton asks for it) is missing: PTX ISA 8.4 (CUDA 12.4).
_PTX_ONLY_VERSION = 84


@dataclasses.dataclass
class Specialization:
    """What the JIT would compile for one launch on one target (its cache key and sources).

    Attributes:
        kernel: the ``JITFunction``.
        arch: compute capability.
        signature: type of every argument by name ("*fp32", "i32", "constexpr", ...).
        constexprs: constexpr values by argument path (declared ones and integers equal to 1).
        attrs: ``tt.divisibility`` hints by argument path.
        options: the backend's parsed options (num_warps, num_stages, ...).
    """

    kernel: Any
    arch: int
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], Any]
    options: Any

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def key(self) -> Tuple[Any, ...]:
        return (self.name, id(self.kernel.fn), self.arch, tuple(self.signature.items()),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                repr(sorted(self.options.__dict__.items())))

    def constexpr_values(self) -> Dict[str, Any]:
        """Constexpr arguments by name (declared ones and integers specialised to 1)."""
        names = self.kernel.arg_names
        return {names[path[0]]: value for path, value in sorted(self.constexprs.items())}

    def divisible_by_16(self) -> Tuple[str, ...]:
        """Integer (non-pointer) arguments the JIT marks as multiples of 16."""
        names = self.kernel.arg_names
        return tuple(
            names[path[0]] for path, attr in sorted(self.attrs.items())
            if any(a[0] == "tt.divisibility" for a in attr)
            and not self.signature[names[path[0]]].startswith("*")
        )


def _gpu_target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, WARP_SIZE)


def specialize_launch(launch: CapturedLaunch, arch: int) -> Specialization:
    """Derives, through the JIT's own binder, what it would compile for ``launch`` on ``arch``.

    Args:
        launch: a launch captured from a compiled-mode (``JITFunction``) kernel.
        arch: compute capability, e.g. 80 or 90.

    Returns:
        The ``Specialization`` (signature, constexprs, divisibility attributes, options).

    Raises:
        RuntimeError: the kernel is an interpreted one (``TRITON_INTERPRET=1``).
    """
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{launch.name} is an interpreted kernel; the compile report needs Triton's compiled "
            "mode (unset TRITON_INTERPRET before triton is first imported)."
        )
    backend = make_backend(_gpu_target(arch))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    # Tensors become MockTensors: only the dtype matters, and their data_ptr (0) reads as
    # 16-byte aligned, as every fresh CUDA allocation is.
    args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {k: MockTensor(v.dtype) if isinstance(v, torch.Tensor) else v
              for k, v in launch.kwargs.items()}
    # As JITFunction.run does before binding.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options)
    return Specialization(kernel, arch, signature, constexprs, attrs, options)


def nvidia_tool(name: str) -> Optional[str]:
    """Path of a CUDA tool Triton bundles or is pointed to ("ptxas", "cuobjdump"), or None."""
    try:
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    except (ImportError, RuntimeError, AttributeError):
        return None


_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)+)")
_WIDTH = re.compile(r"^(v\d+|[bsuf]\d+)$")


def ptx_global_accesses(ptx: str) -> Tuple[Counter, Counter]:
    """Counts the global load and store instructions of a PTX listing by width.

    Cache and eviction qualifiers are dropped, so ``ld.global.L1::evict_last.v4.b32`` counts as
    ``ld.global.v4.b32``. The counts are static (instructions in the code, not executions).

    Args:
        ptx: PTX text.

    Returns:
        (loads, stores): Counters keyed like "ld.global.v4.b32", "st.global.b16".
    """
    loads: Counter = Counter()
    stores: Counter = Counter()
    for op, suffix in _PTX_ACCESS.findall(ptx):
        widths = [part for part in suffix.split(".") if _WIDTH.match(part)]
        label = ".".join([op, "global", *widths])
        (loads if op == "ld" else stores)[label] += 1
    return loads, stores


def format_accesses(counts: Counter) -> str:
    """'ld.global.v4.b32 x12, ld.global.b32 x30' (widest first), or '-' for none."""
    if not counts:
        return "-"

    def width(label: str) -> Tuple[int, int]:
        parts = label.split(".")
        vec = next((int(p[1:]) for p in parts if p.startswith("v")), 1)
        bits = next((int(p[1:]) for p in parts[2:] if p[0] in "bsuf"), 0)
        return -vec * bits, -bits

    return ", ".join(f"{k} x{counts[k]}" for k in sorted(counts, key=width))


_RES_USAGE = re.compile(r"Function ([^:\s]+):\s*(.*)")


def parse_resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    """Parses ``cuobjdump -res-usage`` output.

    Args:
        text: the tool's stdout.

    Returns:
        {function name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}.
    """
    usage: Dict[str, Dict[str, int]] = {}
    for name, fields in _RES_USAGE.findall(text):
        usage[name] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", fields)}
    return usage


def cubin_resource_usage(cubin: bytes, name: str, cuobjdump: str) -> Tuple[int, int]:
    """(registers per thread, spills) of kernel ``name`` in ``cubin``.

    Spills are local-memory bytes / 4, which is how Triton's CUDA driver computes ``n_spills``.

    Raises:
        RuntimeError: cuobjdump fails or does not list the kernel.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        result = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True,
                                check=False)
    usage = parse_resource_usage(result.stdout)
    if result.returncode != 0 or name not in usage:
        raise RuntimeError(f"cuobjdump -res-usage did not report {name}: {result.stderr[-500:]}")
    return usage[name]["REG"], usage[name].get("LOCAL", 0) // 4


@dataclasses.dataclass
class CompiledConfig:
    """The compile report of one distinct specialisation of one kernel.

    Attributes:
        kernel: kernel name.
        arch: compute capability compiled for.
        constexprs: constexpr arguments by name.
        divisible_by_16: integer arguments specialised as multiples of 16.
        pointer_dtypes: element type of each pointer argument.
        num_warps, num_stages: launch options.
        n_regs: registers per thread (None without ptxas/cuobjdump).
        n_spills: spilled 32-bit words per thread (None without ptxas/cuobjdump).
        shared: shared memory bytes (Triton's metadata).
        loads, stores: PTX global accesses by width (``ptx_global_accesses``).
        settings: labels of the settings that launch this specialisation.
    """

    kernel: str
    arch: int
    constexprs: Dict[str, Any]
    divisible_by_16: Tuple[str, ...]
    pointer_dtypes: Dict[str, str]
    num_warps: int
    num_stages: int
    n_regs: Optional[int]
    n_spills: Optional[int]
    shared: int
    loads: Counter
    stores: Counter
    settings: List[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def _ptx_only() -> Iterator[None]:
    # Without ptxas: the cubin stage yields an empty binary (the compiled kernel object needs
    # one), and the backend's hash gets a stand-in for the ptxas version it would ask for.
    from triton import knobs

    def drop_cubin(backend, stages, options, language, capability):
        stages["cubin"] = lambda src, metadata: b""

    with knobs.runtime.scope(), knobs.nvidia.scope():
        knobs.runtime.add_stages_inspection_hook = drop_cubin
        knobs.nvidia.mock_ptx_version = "12.4"
        yield


def compile_specialization(spec: Specialization, ptx_only: Optional[bool] = None,
                           cuobjdump: Optional[str] = None) -> CompiledConfig:
    """Compiles one specialisation for its target and reads its resources and PTX accesses.

    Args:
        spec: from ``specialize_launch``.
        ptx_only: build the PTX only (no registers/spills); default: when ptxas is missing.
        cuobjdump: path of cuobjdump; default: Triton's. Without it registers/spills are None.

    Returns:
        The ``CompiledConfig`` (``settings`` empty).
    """
    import triton
    from triton.compiler import ASTSource

    if ptx_only is None:
        ptx_only = nvidia_tool("ptxas") is None
    cuobjdump = cuobjdump or nvidia_tool("cuobjdump")
    options = dict(spec.options.__dict__)
    src = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
    if ptx_only:
        options["ptx_version"] = _PTX_ONLY_VERSION
        with _ptx_only():
            compiled = triton.compile(src, target=_gpu_target(spec.arch), options=options)
    else:
        compiled = triton.compile(src, target=_gpu_target(spec.arch), options=options)
    n_regs = n_spills = None
    if not ptx_only and cuobjdump is not None:
        n_regs, n_spills = cubin_resource_usage(compiled.asm["cubin"], compiled.name, cuobjdump)
    loads, stores = ptx_global_accesses(compiled.asm["ptx"])
    return CompiledConfig(
        kernel=spec.name, arch=spec.arch, constexprs=spec.constexpr_values(),
        divisible_by_16=spec.divisible_by_16(),
        pointer_dtypes={k: v[1:] for k, v in spec.signature.items() if v.startswith("*")},
        num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
        n_regs=n_regs, n_spills=n_spills, shared=compiled.metadata.shared,
        loads=loads, stores=stores,
    )


def collect_specializations(
    cases: Sequence[Tuple[str, ScanPath, PathInputs]], archs: Sequence[int],
) -> List[Tuple[Specialization, List[str]]]:
    """Captures the launches of every case on every target and deduplicates them.

    Args:
        cases: (label, path, meta inputs) triples.
        archs: compute capabilities; the SM count of each comes from ``GPU_SMS``.

    Returns:
        [(specialisation, labels of the cases that launch it)], in first-seen order.
    """
    found: Dict[Tuple[Any, ...], Tuple[Specialization, List[str]]] = {}
    for arch in archs:
        for label, path, inputs in cases:
            with capture_launches(GPU_SMS.get(arch), path.sm_count_hooks) as launches:
                path.launch(inputs)
            for launch in launches:
                spec = specialize_launch(launch, arch)
                entry = found.setdefault(spec.key, (spec, []))
                if label not in entry[1]:
                    entry[1].append(label)
    return list(found.values())
