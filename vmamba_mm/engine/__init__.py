"""mmengine glue for VMamba: the layer-wise learning-rate-decay optimizer constructor.

Importing this package registers ``VMambaLayerDecayOptimizerConstructor`` in mmengine's
root ``OPTIM_WRAPPER_CONSTRUCTORS`` registry, which mmdet's and mmseg's registries search as
their parent.
"""

from .amp import BF16AutocastOptimWrapper
from .layer_decay import VMambaLayerDecayOptimizerConstructor, get_vmamba_layer_id
from .resume import ExactResumeHook

__all__ = ["BF16AutocastOptimWrapper", "ExactResumeHook", "VMambaLayerDecayOptimizerConstructor",
           "get_vmamba_layer_id"]
