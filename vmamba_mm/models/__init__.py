"""VMamba models: the ``VMamba`` backbone and its building blocks.

Importing this package also registers ``VMamba`` in mmengine's root ``MODELS`` registry when
mmengine is installed (mmdet's and mmseg's registries find it through their parent).
"""

from ..registry import register_models
from .layers import LayerNorm2d, Linear2d, Mlp, PatchMerging2D
from .ss2d import SS2D
from .vmamba import ARCH_SETTINGS, VMamba
from .vss_block import VSSBlock

register_models()

__all__ = ["ARCH_SETTINGS", "LayerNorm2d", "Linear2d", "Mlp", "PatchMerging2D", "SS2D", "VMamba",
           "VSSBlock"]
