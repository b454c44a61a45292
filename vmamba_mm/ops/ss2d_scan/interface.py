"""Public four-route 2D selective scan: input checks, backend choice, the ``torch.library`` ops.

``ss2d_scan`` is what SS2D calls: cross-scan, selective scan and cross-merge as one differentiable
op, on natural-order (row-major, channel-last) inputs. Its compiled backends run through two
custom ops, so that ``torch.compile(fullgraph=True)`` traces them without a graph break and
``torch.export`` records the scan as one node:

* ``vmamba_mm::ss2d_scan_fwd(x, delta, A, B, C, D?, delta_bias?, delta_softplus, backend,
  scan_backend, keep)`` returns ``[y, *saved]``: y [batch, H, W, D] followed by what the backend
  keeps for its backward (nothing unless ``keep``, which the public function sets when a
  gradient can be asked for);
* ``vmamba_mm::ss2d_scan_bwd(dy, x, delta, A, B, C, D?, delta_bias?, delta_softplus, backend,
  scan_backend, saved)`` returns ``[dx, ddelta, dA, dB, dC]`` followed by dD and d(delta_bias)
  when those inputs were given.

Backends (``BACKENDS``): the public name maps to an implementation module
``<impl>_ss2d.py`` next to this file, with ``<impl>_ss2d_forward(x, delta, A, B, C, D,
delta_bias, delta_softplus, scan_backend, keep) -> (y, saved)``, ``<impl>_ss2d_backward(dy, x,
delta, A, B, C, D, delta_bias, delta_softplus, scan_backend, *saved) -> grads`` and
``<impl>_ss2d_forward_fake`` (the forward's signature, empty results), plus the
``selective_scan`` backend it runs inside, if any:

* "triton": ``triton_ss2d``, the fused kernels (CUDA, or the CPU interpreter with
  ``TRITON_INTERPRET=1``): no route-ordered copy of anything, ever;
* "torch": ``torch_ss2d`` with the "torch" selective scan: pure PyTorch, any device;
* "auto": "triton" for CUDA tensors when Triton imports, else "torch";
* "naive": autograd through ``ss2d_scan_naive`` (tests only; not a custom op).

No host-device synchronisation per call: the checks read only shapes, dtypes and devices (the
opt-in A <= 0 check of ``vmamba_mm.ops.debug`` aside), as in ``selective_scan``.
"""

import importlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..selective_scan import interface as scan_interface
from ..triton_env import triton_available
from .naive import ss2d_scan_naive
from .routes import ROUTES

Tensor = torch.Tensor


# Public backend -> (implementation, the selective-scan backend it runs inside; "" when there is
# none). "naive" is not a custom op: autograd runs through the reference.
BACKENDS = {
    "auto": ("torch", "torch"),  # "triton" on CUDA (``_resolve_backend``)
    "triton": ("triton", ""),
    "torch": ("torch", "torch"),
    "naive": ("naive", ""),
}


def _backend_functions(name: str) -> Tuple[Callable, Callable, Callable]:
    """The implementation ``<name>_ss2d``'s forward, backward and fake forward (lazy import)."""
    module = importlib.import_module(f"{__package__}.{name}_ss2d")
    return (
        getattr(module, f"{name}_ss2d_forward"),
        getattr(module, f"{name}_ss2d_backward"),
        getattr(module, f"{name}_ss2d_forward_fake"),
    )


def check_inputs(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> None:
    """Validates ``ss2d_scan``'s inputs without reading their values (no host-device sync).

    Shapes, dtypes and devices are always checked; A's values (every entry <= 0) only with
    ``VMAMBA_MM_DEBUG_CHECKS=1`` (``vmamba_mm.ops.debug``).

    Args:
        x, delta, A, B, C, D, delta_bias, delta_softplus: as ``ss2d_scan``.

    Raises:
        TypeError: a wrong type or dtype.
        ValueError: a wrong shape or device, or (debug checks only) an entry of A that is positive
            or NaN.
    """
    scan_interface.check_tensor("x", x, 4, "[batch, H, W, D]")
    batch, height, width, dim = x.shape
    if min(batch, height, width, dim) < 1:
        raise ValueError(
            f"x must have shape [batch, H, W, D] with every size >= 1, got {tuple(x.shape)}."
        )
    image = (batch, height, width, ROUTES)
    scan_interface.check_tensor("delta", delta, 5, "[batch, H, W, K, D]")
    if tuple(delta.shape) != (*image, dim):
        raise ValueError(
            f"delta must have shape [batch, H, W, K, D] = {(*image, dim)} (K = {ROUTES} routes, "
            f"x's batch, H, W and D), got {tuple(delta.shape)}."
        )
    scan_interface.check_tensor("A", A, 2, "[K*D, N]")
    if A.shape[0] != ROUTES * dim or A.shape[1] < 1:
        raise ValueError(
            f"A must have shape [K*D, N] = [{ROUTES * dim}, N>=1] (K = {ROUTES} routes of x's "
            f"D = {dim} channels), got {tuple(A.shape)}."
        )
    d_state = A.shape[1]
    for name, value in (("B", B), ("C", C)):
        scan_interface.check_tensor(name, value, 5, "[batch, H, W, K, N]")
        if tuple(value.shape) != (*image, d_state):
            raise ValueError(
                f"{name} must have shape [batch, H, W, K, N] = {(*image, d_state)} to match x and "
                f"A, got {tuple(value.shape)}."
            )
    scan_interface.check_dtypes_and_devices("x", x, delta, A, B, C, D, delta_bias,
                                            delta_softplus, ROUTES * dim)


def _resolve_backend(backend: object, x: Tensor) -> Tuple[str, str]:
    """(implementation, inner selective-scan backend) for a public backend name."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"backend={backend!r} is not one of {tuple(BACKENDS)}; pick one of those names."
        )
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton_available() else "torch"
    elif backend == "triton":
        # The same conditions, and the same messages, as selective_scan's "triton" backend.
        scan_interface._resolve_backend("triton", x)
    return BACKENDS[backend]


@torch.library.custom_op("vmamba_mm::ss2d_scan_fwd", mutates_args=())
def _ss2d_fwd(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
    scan_backend: str,
    keep: bool,
) -> List[Tensor]:
    forward, _, _ = _backend_functions(backend)
    y, saved = forward(x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend, keep)
    return [y, *saved]


@_ss2d_fwd.register_fake
def _ss2d_fwd_fake(x, delta, A, B, C, D, delta_bias, delta_softplus, backend, scan_backend,
                   keep):
    _, _, fake = _backend_functions(backend)
    y, saved = fake(x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend, keep)
    return [y, *saved]


@torch.library.custom_op("vmamba_mm::ss2d_scan_bwd", mutates_args=())
def _ss2d_bwd(
    dy: Tensor,
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
    scan_backend: str,
    saved: Sequence[Tensor],
) -> List[Tensor]:
    _, backward, _ = _backend_functions(backend)
    grads = backward(dy, x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend, *saved)
    return [g for g in grads if g is not None]


@_ss2d_bwd.register_fake
def _ss2d_bwd_fake(dy, x, delta, A, B, C, D, delta_bias, delta_softplus, backend, scan_backend,
                   saved):
    # The backends return contiguous gradients in the inputs' dtypes (dA, dD, d(delta_bias) in
    # the compute dtype, which is A's for every accepted input dtype).
    inputs = (x, delta, A, B, C, D, delta_bias)
    return [t.new_empty(t.shape) for t in inputs if t is not None]


def _setup_context(ctx, inputs, output):
    x, delta, A, B, C, D, delta_bias, delta_softplus, backend, scan_backend, _ = inputs
    ctx.save_for_backward(x, delta, A, B, C, D, delta_bias, *output[1:])
    ctx.mark_non_differentiable(*output[1:])  # the backend's saved tensors are not results
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend
    ctx.scan_backend = scan_backend


def _backward(ctx, grads):
    x, delta, A, B, C, D, delta_bias, *saved = ctx.saved_tensors
    dy = grads[0]
    if dy is None:
        dy = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out = torch.ops.vmamba_mm.ss2d_scan_bwd(
        dy, x, delta, A, B, C, D, delta_bias, ctx.delta_softplus, ctx.backend, ctx.scan_backend,
        saved,
    )
    dx, ddelta, dA, dB, dC, *rest = out
    dD = rest.pop(0) if D is not None else None
    ddelta_bias = rest.pop(0) if delta_bias is not None else None
    return dx, ddelta, dA, dB, dC, dD, ddelta_bias, None, None, None, None


_ss2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def ss2d_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Four-route 2D selective scan of a channel-last image, routes merged: SS2D's core.

    Equal to ``cross_merge(selective_scan(cross_scan(x), ...))`` with each route k given its own
    delta_k, A_k, B_k, C_k, D_k and delta_bias_k, but fed natural-order (row-major) inputs: delta,
    B and C are what SS2D's projections give when applied to x once, in place of the einsum over
    four route-ordered copies of x. Route k walks the positions in ``cross_scan``'s order: 0
    row-major, 1 column-major, 2 and 3 their reverses (see ``ss2d_scan_naive``). Per route, with
    h_{-1} = 0: dt = softplus(delta_k + delta_bias_k), h_t = exp(dt A_k) h_{t-1} + dt B_k,t x_t,
    y_k,t = sum_n C_k,t h_t + D_k x_t; the state is float32 whatever the input dtype.

    Args:
        x: the activations, [batch, H, W, D], float32/bfloat16/float16. Any strides (a
            channel-last view, e.g. of a conv's output in ``torch.channels_last`` memory
            format, is read in place).
        delta: time steps before bias/softplus, [batch, H, W, K, D] (K = 4), x's dtype; route k
            reads delta[:, :, :, k]. Any strides (e.g. a view of a GEMM's output).
        A: decay rates, [K*D, N] float32, every entry <= 0 (route k: rows k*D .. k*D + D - 1).
            Only checked with ``VMAMBA_MM_DEBUG_CHECKS=1`` (``vmamba_mm.ops.debug``).
        B: input projections, [batch, H, W, K, N], x's dtype, any strides.
        C: output projections, [batch, H, W, K, N], x's dtype, any strides.
        D: skip weights, [K*D] float32, or None.
        delta_bias: added to delta, [K*D] float32, or None.
        delta_softplus: apply softplus (threshold 20) to delta + delta_bias.
        backend: "auto" ("triton" for CUDA tensors when Triton imports, else "torch"),
            "triton" (the fused kernels), "torch" (pure PyTorch) or "naive" (the per-token
            reference; tests only).

    Returns:
        y, float32 [batch, H, W, D], contiguous: the four routes' outputs summed at each
        position.
    """
    check_inputs(x, delta, A, B, C, D, delta_bias, delta_softplus)
    impl, scan_backend = _resolve_backend(backend, x)
    if impl == "naive":
        return ss2d_scan_naive(x, delta, A, B, C, D, delta_bias, delta_softplus)
    keep = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, delta, A, B, C, D, delta_bias)
    )
    return torch.ops.vmamba_mm.ss2d_scan_fwd(
        x, delta, A, B, C, D, delta_bias, delta_softplus, impl, scan_backend, keep
    )[0]
