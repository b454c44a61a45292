"""Layer-wise learning-rate decay for VMamba backbones in mmdet / mmseg.

Fine-tuning a pretrained backbone often works better when layers close to the input move less than
layers close to the task head. This constructor gives every backbone parameter the learning rate
``base_lr * decay_rate ** (num_layers + 1 - layer_id)``, where ``layer_id`` counts from the stem (0)
towards the head, and everything outside the backbone (neck, heads) the full ``base_lr``.

Layer ids for a backbone with stage depths ``d_0..d_3`` (VMamba's parameter names, spec section 6):

=========================================  ===================================  ==================
parameter                                  ``layer_wise`` (num_layers = sum d)  ``stage_wise`` (4)
=========================================  ===================================  ==================
``backbone.patch_embed.*`` (stem)          0                                    0
``backbone.layers.{i}.blocks.{j}.*``       1 + d_0 + ... + d_{i-1} + j           i + 1
``backbone.layers.{i}.downsample.*``       id of block 0 of stage i + 1          i + 2
``backbone.outnorm{i}.*``, neck, heads     num_layers + 1 (full lr)              num_layers + 1
=========================================  ===================================  ==================

The downsample of stage ``i`` runs between stage ``i`` and ``i + 1`` and feeds the latter, so it
shares the id of the first block it feeds. The ``outnorm{i}`` layers are not part of the ImageNet
checkpoints (they are created fresh for dense prediction), so, like the neck, they train at full lr.

Weight decay is switched off for biases, 1-D parameters (norm weights, ``Ds``), the
per-direction ``dt_projs_bias`` and the state matrix logs ``A_logs`` (decaying ``A_logs`` towards 0
would pull every ``A = -exp(A_logs)`` towards -1 and change the memory of the scan), and for any
parameter carrying ``_no_weight_decay = True``.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

DECAY_TYPES = ("layer_wise", "stage_wise")
DEFAULT_NO_DECAY_NAMES = ("A_logs", "Ds", "dt_projs_bias")
_PARAMWISE_KEYS = {"decay_rate", "decay_type", "num_layers", "no_decay_names"}


def get_vmamba_layer_id(name: str, depths: Sequence[int], decay_type: str = "layer_wise") -> int:
    """Returns the layer id of one parameter of a model with a VMamba ``backbone``.

    Args:
        name: parameter name as given by ``model.named_parameters()``, e.g.
            ``"backbone.layers.2.blocks.3.op.A_logs"``. Names outside ``backbone.`` belong to the
            neck/heads.
        depths: number of blocks of each backbone stage, e.g. ``(2, 2, 8, 2)``.
        decay_type: ``"layer_wise"`` (one id per block) or ``"stage_wise"`` (one id per stage).

    Returns:
        The id in ``[0, num_layers + 1]``; ``num_layers + 1`` means full learning rate.

    Raises:
        ValueError: for an unknown ``decay_type`` or a backbone parameter that belongs to no stem,
            stage or output norm (the rule for it would be a guess).
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type {decay_type!r} is not one of {DECAY_TYPES}.")
    num_layers = sum(depths) if decay_type == "layer_wise" else len(depths)
    if not name.startswith("backbone."):
        return num_layers + 1
    parts = name.split(".")
    if parts[1] == "patch_embed":
        return 0
    if parts[1].startswith("outnorm"):
        return num_layers + 1
    if parts[1] == "layers" and len(parts) > 4 and parts[2].isdigit():
        stage = int(parts[2])
        if stage >= len(depths):
            raise ValueError(f"parameter {name!r} names stage {stage}, but the backbone has "
                             f"{len(depths)} stages.")
        if parts[3] == "blocks" and parts[4].isdigit():
            if decay_type == "stage_wise":
                return stage + 1
            return 1 + sum(depths[:stage]) + int(parts[4])
        if parts[3] == "downsample":
            if decay_type == "stage_wise":
                return stage + 2
            return 1 + sum(depths[: stage + 1])
    raise ValueError(f"parameter {name!r} is not part of a VMamba stem, stage or output norm; "
                     "the layer-decay constructor only knows VMamba backbones.")


def _stage_depths(backbone: nn.Module) -> Tuple[int, ...]:
    layers = getattr(backbone, "layers", None)
    if layers is None or not all(hasattr(layer, "blocks") for layer in layers):
        raise TypeError(f"model.backbone is a {type(backbone).__name__}, which has no VMamba "
                        "'layers[i].blocks'; use VMambaLayerDecayOptimizerConstructor with a "
                        "VMamba backbone only.")
    return tuple(len(layer.blocks) for layer in layers)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class VMambaLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Optimizer wrapper constructor with layer- or stage-wise lr decay for VMamba backbones.

    Config example (mmdet/mmseg)::

        optim_wrapper = dict(
            type="OptimWrapper",
            constructor="VMambaLayerDecayOptimizerConstructor",
            optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05),
            paramwise_cfg=dict(decay_rate=0.9, decay_type="layer_wise"))

    ``paramwise_cfg`` keys:
        decay_rate (float, required): factor in (0, 1] applied once per layer id below the top.
        decay_type (str): ``"layer_wise"`` (default) or ``"stage_wise"``.
        num_layers (int, optional): checked against the backbone (sum of depths for layer_wise,
            number of stages for stage_wise) so a config written for another arch fails loudly.
        no_decay_names (sequence of str, optional): last name components that get no weight decay
            besides biases and 1-D parameters; default ``("A_logs", "Ds", "dt_projs_bias")``.

    Parameters with ``requires_grad=False`` (frozen stages) are left out of the optimizer.
    Each param group carries ``lr_scale``, ``layer_id`` and ``param_names`` for inspection.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        cfg = self.paramwise_cfg
        unknown = set(cfg) - _PARAMWISE_KEYS
        if unknown:
            raise ValueError(f"paramwise_cfg keys {sorted(unknown)} are not understood by "
                             "VMambaLayerDecayOptimizerConstructor; use "
                             f"{sorted(_PARAMWISE_KEYS)}.")
        if "decay_rate" not in cfg:
            raise ValueError("VMambaLayerDecayOptimizerConstructor needs paramwise_cfg.decay_rate, "
                             "e.g. paramwise_cfg=dict(decay_rate=0.9).")
        rate = cfg["decay_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"paramwise_cfg.decay_rate must be a number in (0, 1], got {rate!r}.")
        self.decay_rate = float(rate)
        self.decay_type = cfg.get("decay_type", "layer_wise")
        if self.decay_type not in DECAY_TYPES:
            raise ValueError(f"paramwise_cfg.decay_type {self.decay_type!r} is not one of "
                             f"{DECAY_TYPES}.")
        self.num_layers = cfg.get("num_layers")
        names = cfg.get("no_decay_names", DEFAULT_NO_DECAY_NAMES)
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError("paramwise_cfg.no_decay_names must be a list of parameter names, "
                            f"e.g. ['A_logs', 'Ds'], got {names!r}.")
        self.no_decay_names = tuple(names)
        if self.base_lr is None:
            raise ValueError("the optimizer config needs an explicit lr for layer-wise lr decay.")

    def _no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return (param.ndim <= 1 or name.endswith(".bias")
                or name.rsplit(".", 1)[-1] in self.no_decay_names
                or getattr(param, "_no_weight_decay", False))

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        """Appends one param group per (layer id, weight decay on/off) to ``params``.

        Args:
            params: the optimizer's param groups, extended in place.
            module: the detector/segmentor (with a ``backbone``) or a bare VMamba backbone.
        """
        model = module
        if not hasattr(module, "backbone"):
            # A bare backbone: name its parameters as they appear inside a detector.
            model = nn.Module()
            model.backbone = module
        depths = _stage_depths(model.backbone)
        expected = sum(depths) if self.decay_type == "layer_wise" else len(depths)
        if self.num_layers is not None and self.num_layers != expected:
            raise ValueError(f"paramwise_cfg.num_layers={self.num_layers} does not match the "
                             f"backbone: {self.decay_type} decay over stage depths {list(depths)} "
                             f"has {expected} layers; set num_layers={expected} or drop it.")
        base_wd = self.base_wd or 0.0
        groups: Dict[Tuple[int, bool], dict] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            layer_id = get_vmamba_layer_id(name, depths, self.decay_type)
            no_decay = self._no_weight_decay(name, param)
            key = (layer_id, no_decay)
            if key not in groups:
                scale = self.decay_rate ** (expected + 1 - layer_id)
                groups[key] = {
                    "params": [],
                    "param_names": [],
                    "lr": self.base_lr * scale,
                    "lr_scale": scale,
                    "layer_id": layer_id,
                    "weight_decay": 0.0 if no_decay else base_wd,
                }
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        print_log(f"VMambaLayerDecayOptimizerConstructor: {self.decay_type} decay "
                  f"{self.decay_rate} over {expected} layers, {len(groups)} param groups",
                  logger="current")
        # Top layers first: mmengine logs the lr of the first group, which is then the base lr.
        params.extend(groups[key] for key in sorted(groups, key=lambda k: (-k[0], k[1])))
