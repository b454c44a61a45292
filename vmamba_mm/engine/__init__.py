"""mmengine glue for VMamba: the layer-wise learning-rate-decay optimizer constructor.

Importing this package registers ``VMambaLayerDecayOptimizerConstructor`` in mmengine's
root ``OPTIM_WRAPPER_CONSTRUCTORS`` registry, which mmdet's and mmseg's registries search as
their parent.
"""

from .layer_decay import VMambaLayerDecayOptimizerConstructor, get_vmamba_layer_id

__all__ = ["VMambaLayerDecayOptimizerConstructor", "get_vmamba_layer_id"]
