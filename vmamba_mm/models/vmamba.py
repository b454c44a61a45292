"""The VMamba backbone: a stem, four stages of VSSBlocks, and normed multi-scale features.

Parameter names and shapes are those of the official ``Backbone_VSSM`` (classifier removed,
``outnorm{i}`` per output), so official checkpoints load strictly. The module is an mmengine
``BaseModule`` when mmengine is installed and a plain ``nn.Module`` with the same ``init_cfg``
handling otherwise; it never imports mmdet or mmseg.
"""

import copy
import math
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import load_backbone_checkpoint
from ..errors import ImageTooSmallError
from .layers import build_downsample, build_patch_embed, make_norm
from .ss2d import SCAN_BACKENDS, SS2D
from .vss_block import VSSBlock

try:
    from mmengine.model import BaseModule as _BaseModule

    HAS_MMENGINE = True
except ImportError:  # the core runs with torch alone
    HAS_MMENGINE = False

    class _BaseModule(nn.Module):  # type: ignore[no-redef]
        """nn.Module with mmengine's ``init_cfg`` / ``is_init`` attributes."""

        def __init__(self, init_cfg: Optional[dict] = None) -> None:
            super().__init__()
            self._is_init = False
            self.init_cfg = copy.deepcopy(init_cfg)

        @property
        def is_init(self) -> bool:
            return self._is_init

        def init_weights(self) -> None:
            raise ValueError(
                f"init_cfg {self.init_cfg!r} needs mmengine to run; install mmengine or use "
                "init_cfg=None / dict(type='Pretrained', checkpoint=...).")


_V2 = dict(d_state=1, dt_rank="auto", mlp_ratio=4.0, gated=False, conv_bias=False,
           patch_embed="two-conv", downsample="conv3")
_VANILLA = dict(d_state=16, ssm_ratio=2.0, dt_rank="auto", mlp_ratio=0.0, gated=True,
                conv_bias=True, patch_embed="conv4", downsample="merge")

# The released models (official builder names in the comments).
ARCH_SETTINGS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(dims=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, **_V2),  # vmamba_tiny_s1l8
    "small": dict(dims=96, depths=(2, 2, 20, 2), ssm_ratio=1.0, **_V2),  # vmamba_small_s1l20
    "base": dict(dims=128, depths=(2, 2, 20, 2), ssm_ratio=1.0, **_V2),  # vmamba_base_s1l20
    "tiny-s2l5": dict(dims=96, depths=(2, 2, 5, 2), ssm_ratio=2.0, **_V2),
    "small-s2l15": dict(dims=96, depths=(2, 2, 15, 2), ssm_ratio=2.0, **_V2),
    "base-s2l15": dict(dims=128, depths=(2, 2, 15, 2), ssm_ratio=2.0, **_V2),
    "vanilla-tiny": dict(dims=96, depths=(2, 2, 9, 2), **_VANILLA),
    "vanilla-small": dict(dims=96, depths=(2, 2, 27, 2), **_VANILLA),
    "vanilla-base": dict(dims=128, depths=(2, 2, 27, 2), **_VANILLA),
}
ARCH_KEYS = ("dims", "depths", "d_state", "ssm_ratio", "dt_rank", "mlp_ratio", "gated",
             "conv_bias", "patch_embed", "downsample")
PRETRAINED_KEYS = ("type", "checkpoint", "prefix", "use_ema", "map_location", "sha256")


def resolve_arch(arch: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Turns an arch name or a dict of settings into validated settings.

    Args:
        arch: a name of ``ARCH_SETTINGS`` or a dict with ``dims`` and ``depths`` and optionally
            any other key of ``ARCH_KEYS`` (missing ones are taken from "tiny").

    Returns:
        Settings with ``dims`` expanded to one width per stage.
    """
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f"arch {arch!r} is not one of {sorted(ARCH_SETTINGS)}; or pass a dict "
                             f"with keys {ARCH_KEYS}.")
        settings = dict(ARCH_SETTINGS[arch])
    elif isinstance(arch, dict):
        unknown = sorted(set(arch) - set(ARCH_KEYS))
        if unknown:
            raise ValueError(f"arch dict has unknown keys {unknown}; valid keys are {ARCH_KEYS}.")
        if "dims" not in arch or "depths" not in arch:
            raise ValueError("an arch dict needs at least 'dims' and 'depths'.")
        settings = dict(ARCH_SETTINGS["tiny"])
        settings.update(arch)
    else:
        raise TypeError(f"arch must be a str or a dict, got {type(arch).__name__}.")

    depths = settings["depths"]
    if (not isinstance(depths, (list, tuple)) or not depths
            or not all(isinstance(d, int) and d >= 1 for d in depths)):
        raise ValueError(f"depths must be a non-empty sequence of positive ints, got {depths!r}.")
    dims = settings["dims"]
    if isinstance(dims, int):
        dims = [dims * 2 ** i for i in range(len(depths))]
    if (not isinstance(dims, (list, tuple)) or len(dims) != len(depths)
            or not all(isinstance(d, int) and d >= 2 for d in dims)):
        raise ValueError(f"dims must be an int or {len(depths)} ints >= 2 (one per stage), "
                         f"got {settings['dims']!r}.")
    settings["dims"], settings["depths"] = list(dims), list(depths)
    if not isinstance(settings["d_state"], int) or settings["d_state"] < 1:
        raise ValueError(f"d_state must be a positive int, got {settings['d_state']!r}.")
    for key in ("ssm_ratio", "mlp_ratio"):
        if not isinstance(settings[key], (int, float)) or settings[key] < 0:
            raise ValueError(f"{key} must be a number >= 0, got {settings[key]!r}.")
    if settings["ssm_ratio"] <= 0:
        raise ValueError(f"ssm_ratio must be > 0, got {settings['ssm_ratio']!r}.")
    for key in ("gated", "conv_bias"):
        if not isinstance(settings[key], bool):
            raise ValueError(f"{key} must be True or False, got {settings[key]!r}.")
    if settings["patch_embed"] not in ("conv4", "two-conv"):
        raise ValueError(f"patch_embed {settings['patch_embed']!r} is not one of 'conv4', "
                         "'two-conv'.")
    if settings["downsample"] not in ("merge", "conv3"):
        raise ValueError(f"downsample {settings['downsample']!r} is not one of 'merge', 'conv3'.")
    return settings


def _check_init_cfg(init_cfg: Any) -> None:
    if init_cfg is None:
        return
    cfgs = init_cfg if isinstance(init_cfg, list) else [init_cfg]
    for cfg in cfgs:
        if not isinstance(cfg, dict):
            raise TypeError(f"init_cfg must be a dict, a list of dicts or None, got {init_cfg!r}.")
        if "type" not in cfg:
            raise ValueError(f"init_cfg {cfg!r} has no 'type'.")
        if cfg["type"] == "Pretrained":
            if isinstance(init_cfg, list):
                raise ValueError("put a 'Pretrained' init_cfg alone, not inside a list.")
            unknown = sorted(set(cfg) - set(PRETRAINED_KEYS))
            if unknown:
                raise ValueError(f"init_cfg Pretrained has unknown keys {unknown}; valid keys are "
                                 f"{PRETRAINED_KEYS}.")
            if not isinstance(cfg.get("checkpoint"), str) or not cfg["checkpoint"]:
                raise ValueError("init_cfg=dict(type='Pretrained') needs checkpoint=<path or URL>.")
        elif not HAS_MMENGINE:
            raise ValueError(f"init_cfg type {cfg['type']!r} needs mmengine; install it or use "
                             "init_cfg=None / dict(type='Pretrained', checkpoint=...).")


class VMamba(_BaseModule):
    """VMamba backbone returning normed features at strides 4, 8, 16, 32.

    Args:
        arch: "tiny", "small", "base" (the s1l8 / s1l20 v2 models), "tiny-s2l5", "small-s2l15",
            "base-s2l15", "vanilla-tiny", "vanilla-small", "vanilla-base", or a dict of settings
            (see ``resolve_arch``).
        in_channels: image channels.
        out_indices: stages whose features are returned (each through ``outnorm{i}``).
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; k > 0 also stages 0..k-1 (with their
            downsample and outnorm).
        norm_eval: keep the norm layers in eval mode during training.
        with_cp: activation checkpointing per block (saves memory, costs a recompute).
        channel_first: run in the [B, C, H, W] layout ("ln2d", faster) instead of [B, H, W, C]
            ("ln"); both give the same outputs with the same state_dict.
        scan_backend: selective-scan backend: "auto", "torch", "naive" or "triton".
        pretrained: deprecated, use ``init_cfg=dict(type="Pretrained", checkpoint=...)``.
        init_cfg: None (the official random init) or ``dict(type="Pretrained",
            checkpoint=PATH_OR_URL, prefix=None, use_ema=False, sha256=None)`` (``sha256``: the
            file's expected SHA-256 or its first 8+ hex digits); other mmengine init configs
            need mmengine.

    Inputs of any size are accepted; a stage-i map has size ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)).
    For the vanilla stem (a 4x4 stride-4 conv) sides that are not multiples of 4 are zero-padded
    at the bottom/right, where the official code drops the last rows/columns; for multiples of 4
    (all detection/segmentation inputs, padded to 32) the two agree exactly.
    """

    def __init__(
        self,
        arch: Union[str, Dict[str, Any]] = "tiny",
        in_channels: int = 3,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        drop_path_rate: float = 0.2,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        channel_first: bool = True,
        scan_backend: str = "auto",
        pretrained: Optional[str] = None,
        init_cfg: Optional[Union[dict, List[dict]]] = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(
                f"VMamba got unknown option(s) {sorted(kwargs)}; valid options are arch, "
                "in_channels, out_indices, drop_path_rate, frozen_stages, norm_eval, with_cp, "
                "channel_first, scan_backend, pretrained, init_cfg.")
        if pretrained is not None:
            if not isinstance(pretrained, str):
                raise TypeError(
                    f"pretrained must be a str or None, got {type(pretrained).__name__}; prefer "
                    "init_cfg=dict(type='Pretrained', checkpoint=...).")
            if init_cfg is not None:
                raise ValueError("init_cfg and pretrained cannot both be set; use init_cfg only.")
            if not pretrained:
                raise ValueError("pretrained is an empty string; give a checkpoint path or None.")
            warnings.warn("VMamba: `pretrained` is deprecated, use "
                          "init_cfg=dict(type='Pretrained', checkpoint=...) instead.",
                          FutureWarning, stacklevel=2)
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        _check_init_cfg(init_cfg)
        super().__init__(init_cfg=init_cfg)

        settings = resolve_arch(arch)
        num_stages = len(settings["depths"])
        if isinstance(out_indices, int) or not isinstance(out_indices, (list, tuple)):
            raise TypeError(f"out_indices must be a list or tuple of ints, got {out_indices!r}.")
        indices = []
        for index in out_indices:
            if not isinstance(index, int) or not -num_stages <= index < num_stages:
                raise ValueError(f"out_indices {tuple(out_indices)} must be ints in "
                                 f"[{-num_stages}, {num_stages - 1}].")
            indices.append(index % num_stages)
        if not indices:
            raise ValueError("out_indices is empty; list the stages whose features you need.")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in [-1, {num_stages}], got {frozen_stages}.")
        if not isinstance(drop_path_rate, (int, float)) or not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}.")
        if scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"scan_backend {scan_backend!r} is not one of {SCAN_BACKENDS}.")

        self.arch_settings = settings
        self.dims = settings["dims"]
        self.num_stages = num_stages
        self.out_indices = tuple(sorted(set(indices)))
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.channel_first = channel_first
        self.scan_backend = scan_backend
        self._pad_to = 4 if settings["patch_embed"] == "conv4" else 1

        self.patch_embed = build_patch_embed(settings["patch_embed"], in_channels, self.dims[0],
                                             channel_first)
        rates = torch.linspace(0, drop_path_rate, sum(settings["depths"]), device="cpu").tolist()
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(settings["depths"]):
            blocks = nn.Sequential(*[
                VSSBlock(self.dims[i], drop_path=rates[start + j], d_state=settings["d_state"],
                         ssm_ratio=settings["ssm_ratio"], dt_rank=settings["dt_rank"],
                         gated=settings["gated"], conv_bias=settings["conv_bias"],
                         mlp_ratio=settings["mlp_ratio"], channel_first=channel_first,
                         scan_backend=scan_backend, with_cp=with_cp)
                for j in range(depth)
            ])
            start += depth
            if i < num_stages - 1:
                downsample = build_downsample(settings["downsample"], self.dims[i],
                                              self.dims[i + 1], channel_first)
            else:
                downsample = nn.Identity()
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
        for i in self.out_indices:
            self.add_module(f"outnorm{i}", make_norm(self.dims[i], channel_first))
        self._init_default()
        self._freeze_stages()

    @torch.no_grad()
    def _init_default(self) -> None:
        # Official init: linears trunc_normal(0.02) with zero bias, norms 1/0, convs at PyTorch's
        # default, SS2D's own SSM init.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                module.reset_parameters()
            elif isinstance(module, SS2D):
                module.reset_ssm_parameters()

    def init_weights(self) -> None:
        """Initialises the weights from ``init_cfg``.

        None: the official random init. ``Pretrained``: strict load through
        ``vmamba_mm.checkpoint`` (raises on any unexpected mismatch). Other types: mmengine.
        """
        cfg = self.init_cfg
        if cfg is None:
            self._init_default()
        elif isinstance(cfg, dict) and cfg["type"] == "Pretrained":
            load_backbone_checkpoint(self, cfg["checkpoint"], prefix=cfg.get("prefix"),
                                     use_ema=bool(cfg.get("use_ema", False)),
                                     sha256=cfg.get("sha256"))
        else:
            super().init_weights()
        self._is_init = True
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            self.patch_embed.eval()
            for param in self.patch_embed.parameters():
                param.requires_grad = False
        for i in range(self.frozen_stages):
            modules = [self.layers[i]]
            if i in self.out_indices:
                modules.append(getattr(self, f"outnorm{i}"))
            for module in modules:
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> "VMamba":
        """Sets training mode, keeping frozen stages (and norms if ``norm_eval``) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, (nn.LayerNorm, _BatchNorm, nn.GroupNorm)):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Computes the multi-scale features.

        Args:
            x: images [B, in_channels, H, W].

        Returns:
            One [B, dims[i], ceil(H / 2^(i+2)), ceil(W / 2^(i+2))] map per index of
            ``out_indices``, taken before stage i's downsample and normed by ``outnorm{i}``,
            in the parameters' dtype (or autocast's).

        Outside autocast, images of another floating dtype than the parameters (float32 images
        into a bf16 model) are cast to the parameters' dtype. Raises ``ImageTooSmallError`` for
        an image with zero height or width; any size from 1x1 up works.
        """
        if x.dim() != 4:
            raise ValueError(f"VMamba expects images [B, C, H, W], got shape {tuple(x.shape)}.")
        if x.shape[2] == 0 or x.shape[3] == 0:
            # Both stems are convolutions that need at least one pixel; torch's own error
            # ("Kernel size can't be greater than actual input size") does not name the cause.
            raise ImageTooSmallError(
                f"VMamba got an empty image of {x.shape[2]}x{x.shape[3]} pixels (input shape "
                f"{tuple(x.shape)}); every image needs a height and width of at least 1. Check "
                "the data pipeline (resize, crop, padding) for a step that produces empty "
                "images.")
        if not x.is_floating_point():
            raise TypeError(
                f"VMamba expects floating-point images, got {x.dtype}; normalise them (e.g. "
                "with the data preprocessor) or convert them with x.float().")
        weight_dtype = self.patch_embed[0].weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            # Data preprocessors hand float32 images to a model converted with
            # .to(torch.bfloat16) / .half(); under autocast the casts are autocast's job.
            x = x.to(weight_dtype)
        if self._pad_to > 1:
            # The 4x4 stride-4 stem would drop trailing rows/columns; pad them with zeros
            # instead (no-op for sizes divisible by 4, where this equals the official stem).
            pad_h = -x.shape[2] % self._pad_to
            pad_w = -x.shape[3] % self._pad_to
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            features = layer.blocks(x)
            x = layer.downsample(features)
            if i in self.out_indices:
                out = getattr(self, f"outnorm{i}")(features)
                if not self.channel_first:
                    out = out.permute(0, 3, 1, 2)
                outs.append(out.contiguous())
        return tuple(outs)


def output_size(size: int, stage: int) -> int:
    """Side length of stage ``stage``'s feature map for an input side of ``size`` pixels."""
    return math.ceil(size / 2 ** (stage + 2))
