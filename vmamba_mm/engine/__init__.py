"""mmengine glue for VMamba: optimizer constructor and wrapper, resume and logger hooks.

Importing this package registers ``VMambaLayerDecayOptimizerConstructor`` in mmengine's
root ``OPTIM_WRAPPER_CONSTRUCTORS`` registry, which mmdet's and mmseg's registries search as
their parent.
"""

from .amp import BF16AutocastOptimWrapper
from .layer_decay import VMambaLayerDecayOptimizerConstructor, get_vmamba_layer_id
from .logger import MainProcessLoggerHook, use_main_process_logger
from .resume import ExactResumeHook

__all__ = ["BF16AutocastOptimWrapper", "ExactResumeHook", "MainProcessLoggerHook",
           "VMambaLayerDecayOptimizerConstructor", "get_vmamba_layer_id", "use_main_process_logger"]
