"""vmamba_mm: VMamba backbones for MMDetection and MMSegmentation.

Importing the package (as configs do through ``custom_imports``) registers the ``VMamba``
backbone in the OpenMMLab registries and makes mmengine checkpoints load under torch's weights-only
loading, when mmengine is installed. The core (``vmamba_mm.ops``, ``vmamba_mm.models``) needs only
torch.
"""

from .version import __version__


def _mmengine_available() -> bool:
    try:
        import mmengine  # noqa: F401
    except ImportError:  # the core works with torch alone
        return False
    return True


# Importing the models registers the VMamba backbone in mmengine's root MODELS registry when
# mmengine imports; they work without it.
from . import models  # noqa: E402,F401

if _mmengine_available():
    from . import (
        engine,  # noqa: F401  (registers VMambaLayerDecayOptimizerConstructor)
        mmengine_compat,
    )

    mmengine_compat.install()

__all__ = ["__version__"]
