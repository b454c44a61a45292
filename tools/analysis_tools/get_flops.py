"""Parameters and FLOPs of the model in an mmdet / mmseg config, with the selective scan counted.

Usage::

    python tools/analysis_tools/get_flops.py CONFIG [--shape H [W]] [--backbone-only]
        [--cfg-options k=v ...]

Counting conventions (those of the official VMamba numbers, spec section 7):

* mmengine's ``FlopAnalyzer`` (a port of fvcore's jit-trace counter) on one image: one multiply-add
  counts as ONE FLOP; convolutions (incl. the 1x1 ``Linear2d`` and the grouped conv1d projections),
  linears, matmuls/einsums, norms (5 per element with affine), bilinear/nearest upsampling and
  adaptive pooling are counted; element-wise ops (add, mul, SiLU, GELU, exp, neg, flip, softplus),
  the cross-scan/merge data movement and mmcv's RoIAlign / NMS are not.
* The selective scan, which the tracer sees as one opaque op, is counted by the formula of
  ``vmamba_mm.ops.flops``: ``9 * B * L * D * N + B * D * L`` with ``D = K * d_inner`` (all four
  routes in one call), ``N = d_state``.
* Whole detector (default shape 1280x800, i.e. H=1280, W=800): the model's ``tensor`` forward as
  mmdet's own ``get_flops`` runs it: backbone, FPN, the RPN convolutions on all levels, then the RoI
  heads on the RPN's proposals after NMS. The bbox head runs on every proposal (up to
  ``test_cfg.rpn.max_per_img`` = 1000) and the mask head on the first 100. Trained detectors fill
  the 1000 proposals on real images; a randomly initialised one on a random image may keep fewer
  after NMS, which would undercount the heads (each proposal costs ~14.3 MFLOPs in the bbox head),
  so the proposal list is padded (by repeating proposals) to ``max_per_img`` before the RoI heads,
  as for a trained model. The number of proposals actually produced is reported.
* Whole segmentor (default shape 512x2048): ``tensor`` forward = backbone + decode head (UperNet);
  the auxiliary FCN head only runs in training and is not counted (as in mmseg's ``get_flops``).
* ``--backbone-only``: the VMamba backbone of the config alone (with its 4 output norms). The
  official ImageNet figures (e.g. 4.906G for VMamba-T[s1l8] at 224x224) include the classifier
  (norm + pooling + 768x1000 linear, ~1 MFLOP) instead of the output norms (~2.8 MFLOPs at 224):
  both are below 0.1% of the total.

Parameters are those of the whole model built from the config (or of the backbone alone).
"""

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

DEFAULT_SHAPES = {"mmdet": (1280, 800), "mmseg": (512, 2048)}
# Element-wise ops the official count ignores explicitly (fvcore would warn about them otherwise).
IGNORED_OPS = ("aten::silu", "aten::neg", "aten::exp", "aten::flip", "aten::gelu")


@dataclass
class FlopReport:
    """What ``count_flops`` measured.

    Attributes:
        flops: total FLOPs (multiply-add = 1).
        params: number of parameters of the counted model.
        scan_flops: the part of ``flops`` that comes from the selective scan op.
        by_operator: FLOPs per operator kind (``conv``, ``linear``, ``selective_scan``, ...).
        by_module: FLOPs per top-level module (``backbone``, ``neck``, ``rpn_head``, ...).
        shape: (H, W) of the input image.
        num_proposals: proposals the RPN produced before padding (detectors only).
    """

    flops: int
    params: int
    scan_flops: int
    by_operator: Dict[str, int]
    by_module: Dict[str, int]
    shape: Tuple[int, int]
    num_proposals: Optional[int] = None
    notes: List[str] = field(default_factory=list)


def load_config(config: str, cfg_options: Optional[dict] = None):
    """Loads an mmengine config and switches the registries to its toolbox.

    Args:
        config: path of a config file.
        cfg_options: overrides, as mmengine's ``Config.merge_from_dict`` takes them.

    Returns:
        the mmengine ``Config``.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    if not Path(config).is_file():
        raise FileNotFoundError(f"config file {config!r} does not exist; pass the path of a config "
                                "such as configs/maskrcnn_vmamba.py.")
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get("default_scope")
    if scope not in DEFAULT_SHAPES:
        raise ValueError(f"config {config!r} has default_scope {scope!r}; get_flops supports "
                         f"mmdet and mmseg configs ({sorted(DEFAULT_SHAPES)}).")
    init_default_scope(scope)
    return cfg


def build_model(cfg) -> nn.Module:
    """Builds the config's model in eval mode on CPU without loading pretrained weights."""
    from mmengine.registry import MODELS

    model = MODELS.build(cfg.model)
    model.eval()
    return model


class _DetectorTensorForward(nn.Module):
    """Runs a two-stage detector's ``tensor`` forward with proposals padded to the test budget."""

    def __init__(self, detector: nn.Module, shape: Tuple[int, int]) -> None:
        super().__init__()
        from mmdet.structures import DetDataSample

        self.detector = detector
        h, w = shape
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                    batch_input_shape=(h, w), scale_factor=(1.0, 1.0))
        self.data_samples = [DetDataSample(metainfo=meta)]
        self.num_proposals: Optional[int] = None

    def forward(self, inputs: torch.Tensor):
        det = self.detector
        if not (hasattr(det, "rpn_head") and hasattr(det, "roi_head")):
            return det._forward(inputs, self.data_samples)
        feats = det.extract_feat(inputs)
        proposals = det.rpn_head.predict(feats, self.data_samples, rescale=False)
        budget = det.rpn_head.test_cfg.get("max_per_img", None)
        self.num_proposals = len(proposals[0].bboxes)
        if budget is not None and 0 < self.num_proposals < budget:
            # Repeat proposals so that the RoI heads run on as many boxes as a trained model's.
            repeat = torch.arange(budget, device=inputs.device) % self.num_proposals
            proposals = [p[repeat] for p in proposals]
        return det.roi_head.forward(feats, proposals, self.data_samples)


class _SegmentorTensorForward(nn.Module):
    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, inputs: torch.Tensor):
        return self.segmentor._forward(inputs, None)


def _padded(shape: Tuple[int, int], model: nn.Module) -> Tuple[int, int]:
    # The data preprocessor pads test images to a multiple of its divisor (32 for mmdet).
    divisor = getattr(getattr(model, "data_preprocessor", None), "pad_size_divisor", 1) or 1
    return tuple(int(math.ceil(s / divisor) * divisor) for s in shape)


def flop_handles() -> Dict[str, object]:
    """Op handles for mmengine's ``FlopAnalyzer``: the scan formula and the ignored ops."""
    from vmamba_mm.ops.flops import SCAN_FLOP_HANDLES

    handles: Dict[str, object] = {name: None for name in IGNORED_OPS}
    handles.update(SCAN_FLOP_HANDLES)
    return handles


def count_flops(model: nn.Module, scope: str, shape: Tuple[int, int],
                backbone_only: bool = False) -> FlopReport:
    """Counts the FLOPs of one forward pass of a built detector / segmentor / its backbone.

    Args:
        model: a model built from an mmdet or mmseg config, in eval mode.
        scope: ``"mmdet"`` or ``"mmseg"`` (selects the forward that is counted).
        shape: (H, W) of the input image; detectors pad it to their ``pad_size_divisor``.
        backbone_only: count ``model.backbone`` alone.

    Returns:
        a :class:`FlopReport`.
    """
    from mmengine.analysis import FlopAnalyzer, parameter_count

    if len(shape) != 2 or any(int(s) < 32 for s in shape):
        raise ValueError(f"shape must be (H, W) with both sides >= 32, got {tuple(shape)}.")
    notes = []
    if backbone_only:
        target: nn.Module = model.backbone
        counted = target
    elif scope == "mmdet":
        padded = _padded(tuple(shape), model)
        if padded != tuple(shape):
            notes.append(f"input padded from {tuple(shape)} to {padded} as in mmdet's test")
        shape = padded
        target = _DetectorTensorForward(model, shape)
        counted = model
    elif scope == "mmseg":
        target = _SegmentorTensorForward(model)
        counted = model
    else:
        raise ValueError(f"scope must be 'mmdet' or 'mmseg', got {scope!r}.")
    device = next(counted.parameters()).device
    inputs = (torch.randn(1, 3, *shape, device=device),)
    analyzer = FlopAnalyzer(target, inputs)
    analyzer.set_op_handle(**flop_handles())
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    with torch.no_grad():
        total = int(analyzer.total())
    by_operator = {k: int(v) for k, v in analyzer.by_operator().items()}
    prefix = "" if backbone_only else next(iter(dict(target.named_children())))
    by_module = {}
    for name, flops in analyzer.by_module().items():
        parts = name.split(".")
        if not backbone_only:
            if parts[0] != prefix or len(parts) != 2:
                continue
            by_module[parts[1]] = int(flops)
        elif len(parts) == 1 and name:
            by_module[name] = int(flops)
    scan = sum(v for k, v in by_operator.items() if "selective_scan" in k)
    report = FlopReport(flops=total, params=int(parameter_count(counted)[""]), scan_flops=scan,
                        by_operator=by_operator, by_module=by_module, shape=tuple(shape),
                        notes=notes)
    if isinstance(target, _DetectorTensorForward):
        report.num_proposals = target.num_proposals
    return report


def _fmt(n: float) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e8 else f"{n / 1e6:.3f}M"


def format_report(config: str, report: FlopReport, backbone_only: bool) -> str:
    """Returns the report as the text ``main`` prints."""
    what = "backbone" if backbone_only else "model"
    lines = [
        f"config:   {config}",
        f"input:    1x3x{report.shape[0]}x{report.shape[1]} ({what})",
        f"params:   {report.params / 1e6:.3f}M",
        f"FLOPs:    {_fmt(report.flops)}  (multiply-add = 1 FLOP)",
        f"  of which selective scan: {_fmt(report.scan_flops)}",
    ]
    if report.by_module:
        lines.append("  by module: " + ", ".join(f"{k} {_fmt(v)}"
                                                 for k, v in report.by_module.items()))
    lines.append("  by operator: " + ", ".join(f"{k} {_fmt(v)}"
                                               for k, v in sorted(report.by_operator.items())))
    if report.num_proposals is not None:
        lines.append(f"  RPN proposals after NMS: {report.num_proposals} "
                     "(RoI heads counted on the test budget, see the docstring)")
    lines.extend(f"  note: {n}" for n in report.notes)
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="mmdet / mmseg config file")
    parser.add_argument("--shape", type=int, nargs="+", default=None,
                        help="input H W (or one size for a square); default 1280 800 for "
                             "detectors, 512 2048 for segmentors")
    parser.add_argument("--backbone-only", action="store_true",
                        help="count the config's backbone alone")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings, e.g. model.backbone.arch=small-s2l15")
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error("--shape takes one size (square) or two: H W")
    return args


def main(argv: Optional[Sequence[str]] = None) -> FlopReport:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    scope = cfg.default_scope
    if args.shape is None:
        shape = DEFAULT_SHAPES[scope]
    else:
        shape = tuple(args.shape) * (2 if len(args.shape) == 1 else 1)
    model = build_model(cfg)
    report = count_flops(model, scope, shape, backbone_only=args.backbone_only)
    print(format_report(args.config, report, args.backbone_only))
    return report


if __name__ == "__main__":
    main()
