"""Helpers for the VMamba model tests: small architectures and the official classifier size."""

from typing import Any, Dict

import torch

from vmamba_mm.models import ARCH_SETTINGS, VMamba


def small_arch(name: str, dims: int = 16, depths=(1, 1, 1, 1), **overrides: Any) -> Dict[str, Any]:
    """The settings of a released arch with fewer/narrower blocks (shape-preserving tests)."""
    settings = dict(ARCH_SETTINGS[name])
    settings.update(dims=dims, depths=list(depths), **overrides)
    return settings


def classification_param_count(backbone: VMamba, num_classes: int = 1000) -> int:
    """Params of the official classification model with the same body as ``backbone``.

    The classifier replaces the outnorms: a LayerNorm over the last width plus a Linear head.
    """
    total = sum(p.numel() for p in backbone.parameters())
    outnorms = sum(p.numel() for name, p in backbone.named_parameters()
                   if name.startswith("outnorm"))
    width = backbone.dims[-1]
    return total - outnorms + 2 * width + width * num_classes + num_classes


def seeded_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter random values (so norms/biases are not trivially 1/0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("A_logs"):
                param.copy_(noise.abs().log1p())
            else:
                param.add_(0.1 * noise)
    return model
