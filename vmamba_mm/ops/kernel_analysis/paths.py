"""The scan-block paths the kernel report measures, their inputs and their ideal traffic.

``SCAN_PATHS`` lists the ways of running the SS2D scan block (cross-scan, selective scan over the
K=4 routes, cross-merge) on the Triton backend. Each ``ScanPath`` has a ``run`` (the public ops
with autograd, for the traffic model) and a ``launch`` (the host launchers, forward then
backward, on any tensors including ``meta`` ones, for the compile report): today's three ops
(``SEPARATE_OPS``) and the fused ``ss2d_scan`` (``FUSED``).

The ideal traffic of the block (image x in, merged y out; ``ideal_traffic``):

* forward: read x [B, D, H, W], delta [B, K*D, L], B and C [B, K, N, L], A [K*D, N], D and
  delta_bias [K*D] once each; write y [B, D, L] (fp32, the dtype the scan returns) once;
* backward: read the same inputs and dy [B, D, L] (fp32) once each; write dx, d(delta), dA, dB,
  dC, dD and d(delta_bias) once each, in their inputs' dtypes. Saved state (the forward's chunk
  checkpoints) is not part of the ideal: it is what a kernel adds to it.
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROUTES = 4
# SM counts of the GPUs each target stands for (A100 SXM, H100 SXM); the launchers use them to
# choose between the sequential and the chunk-parallel schedule and to size persistent grids.
GPU_SMS: Dict[int, int] = {80: 108, 90: 132}


@dataclasses.dataclass
class PathInputs:
    """Inputs of the SS2D scan block (cross-scan, selective scan over the K=4 routes, merge).

    Attributes:
        x: image after the depthwise conv, [batch, D, H, W], activation dtype.
        delta: time steps per route, [batch, K*D, L] (L = H*W), scan dtype.
        A: decay rates, [K*D, N] fp32.
        B, C: input/output projections, [batch, K, N, L], scan dtype.
        D: skip weights, [K*D] fp32.
        delta_bias: [K*D] fp32.
        channel_last: the merged output is [batch, L, D] (SS2D with ``channel_first=False``)
            instead of [batch, D, L].
    """

    x: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    delta_bias: torch.Tensor
    channel_last: bool = False

    @property
    def scan_dtype(self) -> torch.dtype:
        return self.delta.dtype

    def leaves(self) -> List[torch.Tensor]:
        """The differentiable inputs, in the order x, delta, A, B, C, D, delta_bias."""
        return [self.x, self.delta, self.A, self.B, self.C, self.D, self.delta_bias]


def make_path_inputs(
    batch: int,
    dim: int,
    height: int,
    width: int,
    d_state: int,
    activation_dtype: torch.dtype = torch.float32,
    scan_dtype: Optional[torch.dtype] = None,
    channel_last: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> PathInputs:
    """Builds scan-block inputs: random values on a real device, shapes only on ``"meta"``.

    Args:
        batch, dim, height, width: the feature map [batch, dim, height, width].
        d_state: N.
        activation_dtype: dtype of x (the model's activations).
        scan_dtype: dtype of delta/B/C; default ``activation_dtype`` (v2 models); the vanilla
            (gated) models scan in fp32.
        channel_last: layout of the merged output (see ``PathInputs``).
        device: "cpu", "cuda" or "meta".
        seed: seed of the random values.

    Returns:
        A ``PathInputs`` with A < 0 and no tensor requiring grad.
    """
    scan_dtype = activation_dtype if scan_dtype is None else scan_dtype
    channels, length = ROUTES * dim, height * width
    shapes = dict(
        x=((batch, dim, height, width), activation_dtype),
        delta=((batch, channels, length), scan_dtype),
        A=((channels, d_state), torch.float32),
        B=((batch, ROUTES, d_state, length), scan_dtype),
        C=((batch, ROUTES, d_state, length), scan_dtype),
        D=((channels,), torch.float32),
        delta_bias=((channels,), torch.float32),
    )
    if device == "meta":
        tensors = {k: torch.empty(s, dtype=t, device="meta") for k, (s, t) in shapes.items()}
    else:
        gen = torch.Generator().manual_seed(seed)
        tensors = {k: torch.randn(s, generator=gen) for k, (s, _) in shapes.items()}
        tensors["A"] = -torch.exp(tensors["A"])
        tensors["delta"] = tensors["delta"] * 0.5 - 1.0
        tensors = {k: tensors[k].to(device=device, dtype=t) for k, (_, t) in shapes.items()}
    return PathInputs(channel_last=channel_last, **tensors)


@dataclasses.dataclass(frozen=True)
class ScanPath:
    """One way of running the SS2D scan block on the Triton backend.

    Attributes:
        name: short label for the tables.
        description: what runs, in one line.
        run: ``run(inputs) -> y`` through the public ops with ``backend="triton"``, differentiable
            in ``inputs.leaves()``; y is [batch, D, L] or [batch, L, D] (``channel_last``).
        launch: ``launch(inputs)`` calls the host launchers of the forward and then of the
            backward, as the autograd functions of ``run`` would, without autograd; it must run
            on ``meta`` tensors (the compile report captures its kernel launches).
        sm_count_hooks: ``"module:function"`` names of the helpers that give a launcher the
            GPU's SM count (``function(device) -> Optional[int]``); the compile report replaces
            them to reproduce the launchers' choices on each target GPU.
    """

    name: str
    description: str
    run: Callable[[PathInputs], torch.Tensor]
    launch: Callable[[PathInputs], None]
    sm_count_hooks: Tuple[str, ...] = ()


def _separate_ops_run(inputs: PathInputs) -> torch.Tensor:
    from ..cross_scan import cross_merge, cross_merge_channel_last, cross_scan
    from ..selective_scan import selective_scan

    batch, dim, height, width = inputs.x.shape
    xs = cross_scan(inputs.x, backend="triton")  # [B, K, D, L]
    xs = xs.reshape(batch, ROUTES * dim, height * width).to(inputs.scan_dtype)
    ys = selective_scan(
        xs, inputs.delta, inputs.A, inputs.B, inputs.C, inputs.D, inputs.delta_bias,
        delta_softplus=True, backend="triton",
    )  # [B, K*D, L] fp32
    ys = ys.view(batch, ROUTES, dim, height, width)
    merge = cross_merge_channel_last if inputs.channel_last else cross_merge
    return merge(ys, backend="triton")


def _separate_ops_launch(inputs: PathInputs) -> None:
    from ..cross_scan.triton_cross import cross_merge_triton, cross_scan_triton
    from ..selective_scan.triton_scan import triton_scan_backward, triton_scan_forward

    batch, dim, height, width = inputs.x.shape
    length = height * width
    scan_args = (inputs.delta, inputs.A, inputs.B, inputs.C, inputs.D, inputs.delta_bias, True)
    xs = cross_scan_triton(inputs.x, False).reshape(batch, ROUTES * dim, length)
    xs = xs.to(inputs.scan_dtype)
    y, saved = triton_scan_forward(xs, *scan_args)
    out = cross_merge_triton(y.view(batch, ROUTES, dim, height, width), inputs.channel_last)
    # Backward, in autograd's order: the merge's backward is a cross-scan of dy (in the merge's
    # layout), the cross-scan's backward a merge (channel-first: SS2D scans [B, D, H, W]).
    dout = torch.empty_like(out)
    image = dout.reshape(batch, height, width, dim) if inputs.channel_last else dout.reshape(
        batch, dim, height, width)
    dys = cross_scan_triton(image, inputs.channel_last).reshape(batch, ROUTES * dim, length)
    grads = triton_scan_backward(dys.contiguous(), xs, *scan_args, *saved)
    dxs = grads[0].to(inputs.x.dtype).reshape(batch, ROUTES, dim, height, width)
    cross_merge_triton(dxs, False)


SEPARATE_OPS = ScanPath(
    name="cross_scan + selective_scan + cross_merge",
    description="today's path: three ops; the routes cross HBM as xs and ys, [B, 4, D, L] each",
    run=_separate_ops_run,
    launch=_separate_ops_launch,
    sm_count_hooks=("vmamba_mm.ops.selective_scan.triton_scan:num_sms",),
)



def natural_order(inputs: PathInputs) -> Tuple[torch.Tensor, ...]:
    """The block's inputs in the layout ``ss2d_scan`` reads, as SS2D produces them.

    x becomes a channel-last view of a ``channels_last`` tensor [B, H, W, D] (the conv's output
    in SS2D); delta, B and C become [B, H, W, K, D|N] (what SS2D's projections of x give). The
    values are the route-ordered ones relaid, which the traffic does not depend on; the relayout
    is PyTorch, so the traffic model does not count it.

    Returns:
        (x, delta, A, B, C, D, delta_bias) for ``ss2d_scan``.
    """
    batch, dim, height, width = inputs.x.shape
    x = inputs.x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)

    def relaid(routed: torch.Tensor) -> torch.Tensor:  # [B, K*C or K, C, L] -> [B, H, W, K, C]
        routed = routed.reshape(batch, ROUTES, -1, height, width)
        return routed.permute(0, 3, 4, 1, 2).contiguous()

    return (x, relaid(inputs.delta), inputs.A, relaid(inputs.B), relaid(inputs.C), inputs.D,
            inputs.delta_bias)


def _fused_run(inputs: PathInputs) -> torch.Tensor:
    # y is [B, H, W, D] in both SS2D layouts: SS2D normalises it where it lies (LayerNorm2d
    # reads a permuted view), so its gradient also comes back channel-last. Returned as
    # [B, L, D] whatever ``channel_last`` says.
    from ..ss2d_scan import ss2d_scan

    y = ss2d_scan(*natural_order(inputs), delta_softplus=True, backend="triton")
    return y.flatten(1, 2)


def _fused_launch(inputs: PathInputs) -> None:
    from ..ss2d_scan.triton_ss2d import triton_ss2d_backward, triton_ss2d_forward

    args = (*natural_order(inputs), True)
    y, saved = triton_ss2d_forward(*args, "", True)
    triton_ss2d_backward(torch.empty_like(y), *args, "", *saved)


FUSED = ScanPath(
    name="ss2d_scan (fused)",
    description="one op: the four routes walked in place on natural-order inputs",
    run=_fused_run,
    launch=_fused_launch,
    sm_count_hooks=("vmamba_mm.ops.ss2d_scan.triton_ss2d:num_sms",),
)

SCAN_PATHS: List[ScanPath] = [SEPARATE_OPS, FUSED]


def ideal_traffic(inputs: PathInputs) -> Dict[str, Tuple[int, int]]:
    """Bytes the scan block must move at least (see the module docstring for the definition).

    Args:
        inputs: the block's inputs (only shapes and dtypes are read).

    Returns:
        {"forward": (read bytes, written bytes), "backward": (read bytes, written bytes)}.
    """
    batch, dim, height, width = inputs.x.shape
    merged = batch * dim * height * width * 4  # y and dy: [B, D, L] fp32
    read = sum(t.numel() * t.element_size() for t in inputs.leaves())
    return {"forward": (read, merged), "backward": (read + merged, read)}
