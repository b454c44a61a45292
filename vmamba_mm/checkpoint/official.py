"""Safe, loud loading of VMamba checkpoints into the backbone.

Reads three kinds of files:

* official classification checkpoints: weights under ``"model"`` (and maybe ``"model_ema"``) next
  to a pickled yacs config under ``"config"``;
* mmdet / mmseg checkpoints: ``"state_dict"`` whose backbone keys start with ``"backbone."``;
* plain state_dicts.

Pickled code is never executed. Files go through :func:`.loading.load_checkpoint_file` (checksums,
weights-only unpickling); if torch refuses a class (such as the yacs ``CfgNode``), the restricted
reader rebuilds tensors and plain containers and turns every other class into an inert
``SkippedObject`` that records what it stood for, while still refusing any call of, or change to,
code outside torch's allow-list. What was skipped is reported.

Loading is strict: missing or unexpected backbone keys and shape mismatches raise
``CheckpointMismatchError`` listing them. The classifier head of a classification checkpoint and
the ``outnorm{i}`` layers it lacks are expected and only reported at info level.
"""

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError, CheckpointMismatchError
from .loading import load_checkpoint_file

logger = logging.getLogger("vmamba_mm")

# Renames from the first public VMamba code (Jan 2024) to the current names, applied to key
# prefixes the way the official loader does.
OLD_KEY_RENAMES: Tuple[Tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"^(layers\.\d+\.blocks\.\d+\.)ln_1\.", r"\1norm."),
    (r"^(layers\.\d+\.blocks\.\d+\.)self_attention\.", r"\1op."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
)

# Keys a classification checkpoint carries that the backbone does not have.
IGNORED_UNEXPECTED_PREFIXES = ("classifier.",)
# Keys the backbone has that a classification checkpoint does not (they keep their init).
IGNORED_MISSING_PREFIXES = ("outnorm",)


def safe_load(path_or_url: str, sha256: Optional[str] = None) -> Tuple[Any, List[str]]:
    """Loads an official, mmdet/mmseg or plain checkpoint onto the CPU without running its code.

    Args:
        path_or_url: a local file, an http(s) URL (downloaded once per node into torch's hub
            cache) or another mmengine file-backend URI; a ``#sha256=<hex>`` suffix pins the hash.
        sha256: expected SHA-256 (or its first 8+ hex digits).

    Returns:
        (checkpoint object, sorted names of the pickled classes replaced by ``SkippedObject``;
        empty when torch's weights-only loader accepted the file as it is).

    Raises:
        FileNotFoundError, DamagedCheckpointError, UnsafeCheckpointError: see
        :func:`vmamba_mm.checkpoint.loading.load_checkpoint_file`.
    """
    obj, skipped = load_checkpoint_file(path_or_url, map_location="cpu",
                                        placeholders_for_unknown_classes=True, sha256=sha256)
    if skipped:
        _log(f"checkpoint {path_or_url}: replaced pickled objects of these non-weight types with "
             f"inert placeholders (their code was not run): {', '.join(skipped)}", logging.INFO)
    return obj, skipped


def extract_state_dict(
    checkpoint: Any, use_ema: bool = False
) -> "OrderedDict[str, torch.Tensor]":
    """Finds the weights inside a loaded checkpoint.

    Args:
        checkpoint: what ``safe_load`` returned.
        use_ema: take ``"model_ema"`` instead of ``"model"`` from an official classification
            checkpoint.

    Returns:
        The state_dict (tensors only), keys unchanged.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint holds a {type(checkpoint).__name__}, not a dict of weights.")
    if use_ema:
        if "model_ema" not in checkpoint:
            raise CheckpointError(
                "use_ema=True but the checkpoint has no 'model_ema' entry (top-level keys: "
                f"{sorted(checkpoint)}); load with use_ema=False.")
        state = checkpoint["model_ema"]
    elif "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
    elif "model" in checkpoint:
        state = checkpoint["model"]
    elif "model_ema" in checkpoint:
        state = checkpoint["model_ema"]
    else:
        state = checkpoint
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint weights are a {type(state).__name__}, not a state_dict.")
    tensors = OrderedDict((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    if not tensors:
        raise CheckpointError(
            f"no tensors found in the checkpoint (keys: {sorted(state)[:20]}); is it a weights "
            "file?")
    return tensors


def convert_official_keys(
    state_dict: Dict[str, torch.Tensor], prefix: Optional[str] = None
) -> "OrderedDict[str, torch.Tensor]":
    """Selects the backbone keys and renames old official names to the current ones.

    Args:
        state_dict: raw weights.
        prefix: keep only keys starting with this and strip it (e.g. "backbone." for a detector
            checkpoint). None: strip "backbone." automatically when present, and DDP's "module.".

    Returns:
        The backbone state_dict with current official names (spec: ``patch_embed.0``,
        ``layers.{i}.blocks.{j}.norm/op``, ``classifier.*``).
    """
    if prefix is None:
        keys = list(state_dict)
        if keys and all(k.startswith("module.") for k in keys):
            state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        if any(k.startswith("backbone.") for k in state_dict):
            prefix = "backbone."
    if prefix:
        selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not selected:
            raise CheckpointError(
                f"no checkpoint key starts with prefix {prefix!r}; first keys: "
                f"{list(state_dict)[:5]}. Fix or drop `prefix`.")
        state_dict = selected
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if key == "pos_embed":
            _log("checkpoint: dropped 'pos_embed' (VMamba uses no position embedding).",
                 logging.INFO)
            continue
        for pattern, replacement in OLD_KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


@dataclass
class LoadReport:
    """What ``load_backbone_checkpoint`` did.

    Attributes:
        ignored_unexpected: checkpoint keys dropped as expected (the classifier).
        ignored_missing: model keys the checkpoint lacked as expected (``outnorm{i}``).
        skipped_pickled: pickled non-weight globals replaced by inert placeholders.
    """

    ignored_unexpected: List[str] = field(default_factory=list)
    ignored_missing: List[str] = field(default_factory=list)
    skipped_pickled: List[str] = field(default_factory=list)


def _stage_summary(keys: List[str]) -> str:
    depths: Dict[int, int] = {}
    for key in keys:
        match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    return str([depths[i] for i in sorted(depths)])


def format_keys(keys: List[str], limit: int = 30) -> str:
    """The first ``limit`` keys, comma-separated, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def strip_module_prefix(key: str) -> str:
    """A state_dict key without the "module." of DDP or of a test-time-augmentation wrapper."""
    return key[len("module."):] if key.startswith("module.") else key


def state_dict_mismatches(expected: Dict[str, Any], given: Dict[str, Any]) -> List[str]:
    """How a checkpoint's state_dict differs from a model's, as parts of an error message.

    Args:
        expected: the model's keys and their tensors (or shapes).
        given: the checkpoint's keys and values; values without a shape are ignored.

    Returns:
        "missing keys (n): ...", "unexpected keys (n): ..." and "shape mismatches (n): ..." for
        what is not empty; an empty list when the checkpoint fits.
    """
    expected_shapes = {k: tuple(v.shape) for k, v in expected.items()}
    given_shapes = {k: tuple(v.shape) for k, v in given.items() if hasattr(v, "shape")}
    missing = sorted(set(expected_shapes) - set(given_shapes))
    unexpected = sorted(set(given_shapes) - set(expected_shapes))
    mismatched = [f"{k}: checkpoint {given_shapes[k]} vs model {expected_shapes[k]}"
                  for k in sorted(set(given_shapes) & set(expected_shapes))
                  if given_shapes[k] != expected_shapes[k]]
    return [f"{label} ({len(keys)}): {format_keys(keys, limit=5)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", mismatched)) if keys]


def match_state_dict(
    model: nn.Module, state_dict: Dict[str, torch.Tensor]
) -> Tuple["OrderedDict[str, torch.Tensor]", LoadReport]:
    """Checks a converted state_dict against the model, strictly.

    Args:
        model: the backbone.
        state_dict: output of ``convert_official_keys``.

    Returns:
        (the state_dict to load, with the expected extra keys removed and (out, in, 1, 1) linear
        weights reshaped to (out, in); the report of what was ignored).

    Raises:
        CheckpointMismatchError: listing missing keys, unexpected keys and shape mismatches.
    """
    expected = model.state_dict()
    report = LoadReport()
    to_load: OrderedDict[str, torch.Tensor] = OrderedDict()
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        if key not in expected:
            if key.startswith(IGNORED_UNEXPECTED_PREFIXES):
                report.ignored_unexpected.append(key)
            else:
                unexpected.append(key)
            continue
        target = expected[key].shape
        if value.shape != target and value.dim() == 4 and value.shape[2:] == (1, 1) \
                and value.shape[:2] == target:
            value = value.reshape(target)
        if value.shape != target:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target)}")
            continue
        to_load[key] = value
    missing = []
    for key in expected:
        if key not in state_dict:
            (report.ignored_missing if key.startswith(IGNORED_MISSING_PREFIXES) else missing
             ).append(key)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {format_keys(mismatched)}")
        raise CheckpointMismatchError(
            "the checkpoint does not fit this backbone; " + "; ".join(parts) + ". Blocks per "
            f"stage: checkpoint {_stage_summary(list(state_dict))}, model "
            f"{_stage_summary(list(expected))}. Choose the `arch` the checkpoint was trained with.")
    return to_load, report


def load_backbone_checkpoint(
    model: nn.Module,
    checkpoint: str,
    prefix: Optional[str] = None,
    use_ema: bool = False,
    sha256: Optional[str] = None,
) -> LoadReport:
    """Loads official VMamba / mmdet / mmseg / plain weights into a VMamba backbone, strictly.

    Args:
        model: the backbone.
        checkpoint: local path, http(s) URL or mmengine file-backend URI (see ``safe_load``).
        prefix: key prefix of the backbone in the file (e.g. "backbone."); None detects it.
        use_ema: load the EMA weights of an official classification checkpoint.
        sha256: expected SHA-256 of the file (or its first 8+ hex digits).

    Returns:
        A ``LoadReport``.

    Raises:
        FileNotFoundError: the file does not exist.
        DamagedCheckpointError, UnsafeCheckpointError: see ``safe_load``.
        CheckpointMismatchError: keys or shapes do not match.
    """
    raw, skipped = safe_load(checkpoint, sha256=sha256)
    state_dict = convert_official_keys(extract_state_dict(raw, use_ema=use_ema), prefix=prefix)
    to_load, report = match_state_dict(model, state_dict)
    report.skipped_pickled = skipped
    result = model.load_state_dict(to_load, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith(IGNORED_MISSING_PREFIXES)]
    if leftover or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"loading {checkpoint} left missing keys {leftover} and unexpected keys "
            f"{result.unexpected_keys}.")
    _log(f"loaded backbone weights from {checkpoint} ({len(to_load)} tensors).", logging.INFO)
    if report.ignored_unexpected:
        _log(f"ignored classifier keys not used by the backbone: {report.ignored_unexpected}",
             logging.INFO)
    if report.ignored_missing:
        _log(f"keys absent from the checkpoint, kept at their init: {report.ignored_missing}",
             logging.INFO)
    return report


def _log(message: str, level: int) -> None:
    try:
        from mmengine.logging import print_log
    except ImportError:
        logger.log(level, message)
    else:
        print_log(message, logger="current", level=level)
