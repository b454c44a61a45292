"""Public selective scan: input checks, backend choice, and the ``torch.library`` custom ops.

``selective_scan`` is what the rest of the project calls. The "torch" and "triton" backends run
through two custom ops so that ``torch.compile(fullgraph=True)`` traces them without a graph break
and ``torch.export`` records the scan as one node:

* ``vmamba_mm::selective_scan_fwd(u, delta, A, B, C, D?, delta_bias?, delta_softplus, backend)``
  returns ``[y, *saved]``: y fp32 [batch, K*D, L] followed by whatever the backend keeps for its
  backward (nothing for "torch", chunk checkpoints for "triton").
* ``vmamba_mm::selective_scan_bwd(dy, u, delta, A, B, C, D?, delta_bias?, delta_softplus, backend,
  saved)`` returns ``[du, ddelta, dA, dB, dC]`` followed by dD and d(delta_bias) when those inputs
  were given.

Backend contract (``<name>_scan.py`` next to this file, imported lazily):
``<name>_scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus) -> (y, saved)``,
``<name>_scan_backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, *saved) -> grads``
and ``<name>_scan_forward_fake(...)`` with the forward's signature that returns empty tensors of
the forward's output shapes (used while tracing). Saved tensors must be fresh tensors, never views
of the inputs. The "naive" backend is autograd through ``selective_scan_naive`` (tests only).

No host-device synchronisation per call: the input checks read only shapes, dtypes and devices,
and nothing on the eager path reads a tensor's values on the host (``.item()``, ``bool(tensor)``,
``.tolist()``, ``.cpu()``, ``nonzero()``...). The one value check, A <= 0, runs only with
``VMAMBA_MM_DEBUG_CHECKS=1`` (see ``vmamba_mm.ops.debug``); tests/ops/test_no_host_sync.py guards
this.
"""

import importlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..debug import ENV_VAR as DEBUG_CHECKS_ENV_VAR
from ..debug import value_checks_enabled
from ..triton_env import interpreter_enabled, triton_available
from .naive import selective_scan_naive

Tensor = torch.Tensor

BACKENDS = ("auto", "triton", "torch", "naive")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _backend_module(name: str):
    """Imports ``<name>_scan`` lazily (the Triton module imports triton at import time)."""
    return importlib.import_module(f"{__package__}.{name}_scan")


def _backend_functions(name: str) -> Tuple[Callable, Callable, Callable]:
    module = _backend_module(name)
    return (
        getattr(module, f"{name}_scan_forward"),
        getattr(module, f"{name}_scan_backward"),
        getattr(module, f"{name}_scan_forward_fake"),
    )


def _resolve_backend(backend: object, u: Tensor) -> str:
    """Maps the user's ``backend`` argument to "torch", "triton" or "naive"."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}; pick one of those names.")
    if backend == "auto":
        return "triton" if u.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError(
                'backend="triton" needs the triton package, which does not import here; install '
                'triton or use backend="torch".'
            )
        if not u.is_cuda and not interpreter_enabled():
            raise ValueError(
                f'backend="triton" got tensors on {u.device.type}; Triton kernels run on CUDA '
                'tensors (or on CPU with TRITON_INTERPRET=1 set before triton is imported). Move '
                'the inputs to a GPU or use backend="torch".'
            )
    return backend


def check_tensor(name: str, value: object, ndim: int, layout: str) -> Tensor:
    """``value`` itself if it is a tensor with ``ndim`` dimensions; else a TypeError/ValueError
    that names the argument and the layout it must have (``ss2d_scan`` checks with it too)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value)}.")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(value.shape)}.")
    return value


def check_fp32(name: str, value: Tensor) -> None:
    """Refuses a parameter (A, D, delta_bias) that is not float32, saying how to fix it."""
    if value.dtype != torch.float32:
        raise TypeError(
            f"{name} must be float32 (it is a parameter kept in full precision), got "
            f"{value.dtype}; pass {name}.float()."
        )


def check_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> None:
    """Validates the scan's inputs without reading their values (no host-device sync).

    Shapes, dtypes and devices are always checked. The values of A (every entry <= 0) are checked
    only when ``VMAMBA_MM_DEBUG_CHECKS=1`` (``vmamba_mm.ops.debug``), on any device.

    Args:
        u, delta, A, B, C, D, delta_bias, delta_softplus: as ``selective_scan``.

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape or device, or (debug checks only) an entry of A that is positive
            or NaN.
    """
    check_tensor("u", u, 3, "[batch, K*D, L]")
    batch, channels, length = u.shape
    check_tensor("delta", delta, 3, "[batch, K*D, L]")
    check_tensor("A", A, 2, "[K*D, N]")
    check_tensor("B", B, 4, "[batch, K, N, L]")
    check_tensor("C", C, 4, "[batch, K, N, L]")
    if delta.shape != u.shape:
        raise ValueError(
            f"delta must have u's shape {tuple(u.shape)} ([batch, K*D, L]), got "
            f"{tuple(delta.shape)}."
        )
    if length < 1:
        raise ValueError("u must hold at least one time step (L >= 1).")
    if A.shape[0] != channels or A.shape[1] < 1:
        raise ValueError(
            f"A must have shape [K*D, N] = [{channels}, N>=1] to match u, got {tuple(A.shape)}."
        )
    d_state = A.shape[1]
    groups = B.shape[1]
    if B.shape[0] != batch or B.shape[2] != d_state or B.shape[3] != length or groups < 1:
        raise ValueError(
            f"B must have shape [batch, K, N, L] = [{batch}, K, {d_state}, {length}] to match u "
            f"and A, got {tuple(B.shape)}."
        )
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}.")
    if channels % groups:
        raise ValueError(
            f"u's {channels} channels do not split into B's K={groups} groups; K*D must be a "
            "multiple of K."
        )
    check_dtypes_and_devices("u", u, delta, A, B, C, D, delta_bias, delta_softplus, channels)


def check_dtypes_and_devices(
    name: str,
    first: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    channels: int,
) -> None:
    """The checks ``selective_scan`` and ``ss2d_scan`` share once their shapes are checked.

    D and delta_bias are [channels] float32 vectors or None; A is float32; ``first`` (u or x) is
    float32, bfloat16 or float16, and delta, B and C have its dtype; every tensor is on its
    device; delta_softplus is a bool. A's values are read only with ``VMAMBA_MM_DEBUG_CHECKS=1``.

    Args:
        name: what the messages call ``first`` ("u" or "x").
        first: the activations.
        delta, A, B, C, D, delta_bias, delta_softplus: the scan's other arguments.
        channels: K*D, the length D and delta_bias must have.

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape or device, or (debug checks only) an entry of A that is positive
            or NaN.
    """
    for vector_name, value in (("D", D), ("delta_bias", delta_bias)):
        if value is not None:
            check_tensor(vector_name, value, 1, "[K*D]")
            if value.shape[0] != channels:
                raise ValueError(
                    f"{vector_name} must have shape [K*D] = [{channels}], got "
                    f"{tuple(value.shape)}."
                )
            check_fp32(vector_name, value)
    check_fp32("A", A)
    if first.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {first.dtype}.")
    for other, value in (("delta", delta), ("B", B), ("C", C)):
        if value.dtype != first.dtype:
            raise TypeError(
                f"{other} must have {name}'s dtype {first.dtype}, got {value.dtype}; cast it "
                f"with .to({first.dtype})."
            )
    if not isinstance(delta_softplus, bool):
        raise TypeError(f"delta_softplus must be a bool, got {type(delta_softplus)}.")
    named = [("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias)]
    for other, value in named:
        if value is not None and value.device != first.device:
            raise ValueError(
                f"{other} is on {value.device} but {name} is on {first.device}; use one device."
            )
    # Reading A's values would stall a GPU once per call, so it is opt-in; there are no values
    # to read while compiling/exporting or on meta tensors.
    if not torch.compiler.is_compiling() and A.device.type != "meta" and value_checks_enabled():
        check_decay_rates(A)


def check_decay_rates(A: Tensor) -> None:
    """Raises if A has an entry that is positive or NaN (a host-device sync on a GPU).

    A > 0 makes the state grow without bound; a NaN spreads to every later step.

    Args:
        A: decay rates, [K*D, N].

    Raises:
        ValueError: naming how many entries are positive or NaN.
    """
    bad = ~(A <= 0)
    if bool(bad.any()):
        raise ValueError(
            f"A must be <= 0 everywhere (decay rates; VMamba uses A = -exp(A_logs)); "
            f"{int(bad.sum())} of its {A.numel()} entries are positive or NaN "
            f"(checked because {DEBUG_CHECKS_ENV_VAR} is set)."
        )


@torch.library.custom_op("vmamba_mm::selective_scan_fwd", mutates_args=())
def _scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
) -> List[Tensor]:
    forward, _, _ = _backend_functions(backend)
    y, saved = forward(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return [y, *saved]


@_scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, backend):
    _, _, fake = _backend_functions(backend)
    y, saved = fake(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return [y, *saved]


@torch.library.custom_op("vmamba_mm::selective_scan_bwd", mutates_args=())
def _scan_bwd(
    dy: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
    saved: Sequence[Tensor],
) -> List[Tensor]:
    _, backward, _ = _backend_functions(backend)
    grads = backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, *saved)
    return [g for g in grads if g is not None]


@_scan_bwd.register_fake
def _scan_bwd_fake(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, backend, saved):
    grads = [torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A)]
    grads += [torch.empty_like(B), torch.empty_like(C)]
    grads += [torch.empty_like(x) for x in (D, delta_bias) if x is not None]
    return grads


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, *output[1:])
    ctx.mark_non_differentiable(*output[1:])  # the backend's saved tensors are not results
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend


def _backward(ctx, grads):
    u, delta, A, B, C, D, delta_bias, *saved = ctx.saved_tensors
    dy = grads[0]
    if dy is None:
        dy = torch.zeros_like(u, dtype=torch.float32)
    out = torch.ops.vmamba_mm.selective_scan_bwd(
        dy.contiguous(), u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, ctx.backend, saved
    )
    du, ddelta, dA, dB, dC, *rest = out
    dD = rest.pop(0) if D is not None else None
    ddelta_bias = rest.pop(0) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, ddelta_bias, None, None


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Selective scan (S6) over K groups of channels, differentiable in every input.

    Per batch b, channel c (group k = c // D_per_group), state n, time t, with h_{-1} = 0:
    dt = softplus(delta + delta_bias) (softplus optional), h_t = exp(dt A) h_{t-1} + dt B_t u_t,
    y_t = sum_n C_t h_t + D u_t. The state is accumulated in float32 whatever the input dtype.

    Args:
        u: input, [batch, K*D, L], float32/bfloat16/float16.
        delta: time steps before bias/softplus, [batch, K*D, L], u's dtype.
        A: decay rates, [K*D, N], float32, every entry <= 0. Not checked by default: reading
            the values would be a host-device sync per call on a GPU; set
            ``VMAMBA_MM_DEBUG_CHECKS=1`` to have them checked (see ``vmamba_mm.ops.debug``).
        B: input projections, [batch, K, N, L], u's dtype; channel c uses group c // D.
        C: output projections, [batch, K, N, L], u's dtype.
        D: skip weights, [K*D] float32, or None.
        delta_bias: added to delta, [K*D] float32, or None.
        delta_softplus: apply softplus (threshold 20) to delta + delta_bias.
        backend: "auto" (Triton for CUDA tensors when Triton imports, else "torch"), "triton",
            "torch" or "naive" (the per-token reference; tests only).

    Returns:
        y, float32 [batch, K*D, L].
    """
    check_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus)
    name = _resolve_backend(backend, u)
    if name == "naive":
        return selective_scan_naive(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return torch.ops.vmamba_mm.selective_scan_fwd(
        u, delta, A, B, C, D, delta_bias, delta_softplus, name
    )[0]
