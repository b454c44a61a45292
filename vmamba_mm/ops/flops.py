"""FLOP count of the selective scan, as a formula and as counter handles for traced graphs.

The count is the one official VMamba reports with (Albert Gu's estimate, mamba issue 110):
``9 * B * L * D * N`` for the scan plus ``B * D * L`` for the D skip, where D is the number of
scanned channels (K * d_inner: all four directions go through one call) and N the state size.
One multiply-add counts as one FLOP, as in fvcore and mmengine's analysis.

Graph tracers (fvcore, ``mmengine.analysis``) see the scan as one of two custom ops:
``vmamba_mm::selective_scan_fwd`` and SS2D's four-route ``vmamba_mm::ss2d_scan_fwd`` (cross-scan,
scan and cross-merge in one op). ``SCAN_FLOP_HANDLES`` maps both names to handles, and
``register_mmengine_flop_handles`` adds them to mmengine's defaults so that
``mmengine.analysis.get_model_complexity_info`` counts the scan too. Both are counted with the same
formula, over the K * d_inner channels of the four routes, and reported under the operator name
``selective_scan_fwd``: a model counts the same whichever op runs its scan, and per-operator
reports (``by_operator()["selective_scan_fwd"]``, ``get_flops``' scan total) stay comparable.
"""

from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

SCAN_OP_NAMES = ("vmamba_mm::selective_scan_fwd",)
SS2D_SCAN_OP_NAMES = ("vmamba_mm::ss2d_scan_fwd",)
# The operator name the scan's FLOPs are reported under, whichever op ran it.
SCAN_OPERATOR = "selective_scan_fwd"


def selective_scan_flops(
    batch: int, length: int, channels: int, d_state: int, with_D: bool = True
) -> int:
    """FLOPs of one selective scan call.

    Args:
        batch: batch size B.
        length: sequence length L.
        channels: scanned channels D (K * d_inner for the four-direction scan).
        d_state: state size N.
        with_D: count the D skip connection (``+ B * D * L``).

    Returns:
        ``9 * B * L * D * N + (B * D * L if with_D else 0)``.
    """
    flops = 9 * batch * length * channels * d_state
    if with_D:
        flops += batch * channels * length
    return flops


def _shape(value: Any) -> Optional[List[int]]:
    if value.isCompleteTensor():
        return list(value.type().sizes())
    return None


def _is_none(value: Any) -> bool:
    return value.type().kind() == "NoneType"


def selective_scan_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore/mmengine jit handle for ``vmamba_mm::selective_scan_fwd``.

    Args:
        inputs: the op's ``torch._C.Value`` inputs: u [B, K*D, L], delta, A [K*D, N], B, C,
            D (or None), delta_bias (or None), delta_softplus, backend.
        outputs: the op's outputs (unused).

    Returns:
        The scan's FLOPs, ``selective_scan_flops`` of u's and A's shapes.
    """
    u_shape, a_shape = _shape(inputs[0]), _shape(inputs[2])
    if u_shape is None or a_shape is None:
        raise ValueError(
            "selective_scan_flop_jit needs complete tensor shapes for u and A; trace the model "
            "with concrete example inputs."
        )
    batch, channels, length = u_shape
    return selective_scan_flops(batch, length, channels, a_shape[1], with_D=not _is_none(inputs[5]))


def selective_scan_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Activation-count handle for ``vmamba_mm::selective_scan_fwd``: the elements of y.

    Args:
        inputs: the op's inputs (u [B, K*D, L] first).
        outputs: the op's outputs (unused: y has u's shape).

    Returns:
        B * K*D * L.
    """
    u_shape = _shape(inputs[0])
    if u_shape is None:
        raise ValueError("selective_scan_activation_jit needs u's complete shape.")
    batch, channels, length = u_shape
    return batch * channels * length


def _ss2d_shapes(inputs: List[Any], what: str) -> Tuple[int, int, int, int]:
    x_shape, a_shape = _shape(inputs[0]), _shape(inputs[2])
    if x_shape is None or a_shape is None:
        raise ValueError(
            f"{what} needs complete tensor shapes for x and A; trace the model with concrete "
            "example inputs."
        )
    batch, height, width, _ = x_shape
    return batch, height * width, a_shape[0], a_shape[1]


def ss2d_scan_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """fvcore/mmengine jit handle for ``vmamba_mm::ss2d_scan_fwd`` (SS2D's four-route scan).

    Args:
        inputs: the op's ``torch._C.Value`` inputs: x [B, H, W, D], delta, A [K*D, N], B, C,
            D (or None), delta_bias (or None), then the op's flags.
        outputs: the op's outputs (unused).

    Returns:
        ``Counter({"selective_scan_fwd": selective_scan_flops(B, H*W, K*D, N, with_D)})``: the
        count of the selective scan over the four routes that the op computes, under the
        selective scan's operator name.
    """
    batch, length, channels, d_state = _ss2d_shapes(inputs, "ss2d_scan_flop_jit")
    flops = selective_scan_flops(batch, length, channels, d_state, with_D=not _is_none(inputs[5]))
    return Counter({SCAN_OPERATOR: flops})


def ss2d_scan_activation_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """Activation-count handle for ``vmamba_mm::ss2d_scan_fwd``: the four routes' outputs.

    Args:
        inputs: the op's inputs (x [B, H, W, D] first, A [K*D, N] third).
        outputs: the op's outputs (unused).

    Returns:
        ``Counter({"selective_scan_fwd": B * K*D * H*W})``, as ``selective_scan`` counts the
        routes' outputs before they are merged.
    """
    batch, length, channels, _ = _ss2d_shapes(inputs, "ss2d_scan_activation_jit")
    return Counter({SCAN_OPERATOR: batch * channels * length})


Handle = Callable[[List[Any], List[Any]], Union[int, Counter]]
SCAN_FLOP_HANDLES: Dict[str, Handle] = {name: selective_scan_flop_jit for name in SCAN_OP_NAMES}
SCAN_FLOP_HANDLES.update({name: ss2d_scan_flop_jit for name in SS2D_SCAN_OP_NAMES})
SCAN_ACTIVATION_HANDLES: Dict[str, Handle] = {
    name: selective_scan_activation_jit for name in SCAN_OP_NAMES
}
SCAN_ACTIVATION_HANDLES.update({name: ss2d_scan_activation_jit for name in SS2D_SCAN_OP_NAMES})


def register_mmengine_flop_handles() -> None:
    """Makes ``mmengine.analysis`` (FlopAnalyzer, get_model_complexity_info) count the scan.

    mmengine's analyzers start from module-level tables of default handles; this adds the scan
    ops' FLOP and activation handles to them (idempotent). For a single analyzer,
    ``FlopAnalyzer(model, inputs).set_op_handle(**SCAN_FLOP_HANDLES)`` does the same without
    touching the defaults.

    Raises:
        ImportError: mmengine is not installed.
    """
    from mmengine.analysis import complexity_analysis

    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.update(SCAN_FLOP_HANDLES)
    complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS.update(SCAN_ACTIVATION_HANDLES)
