"""Registration of the VMamba backbone in the OpenMMLab registries.

One entry in mmengine's root ``MODELS`` registry serves both toolboxes: mmdet's and mmseg's
``MODELS`` registries are its children and look unknown names up in their parent, so
``dict(type="VMamba")`` builds in either, with or without the other installed.
"""


def register_models() -> bool:
    """Registers ``VMamba`` in mmengine's root ``MODELS`` registry if mmengine is installed.

    Returns:
        True if the backbone is registered (now or before), False without mmengine.
    """
    try:
        from mmengine.registry import MODELS
    except ImportError:
        return False
    from .models.vmamba import VMamba

    registered = MODELS.get("VMamba") if "VMamba" in MODELS.module_dict else None
    if registered is None:
        MODELS.register_module(name="VMamba", module=VMamba)
    elif registered is not VMamba:
        raise RuntimeError(
            f"another class ({registered.__module__}.{registered.__qualname__}) is already "
            "registered as 'VMamba' in mmengine's MODELS; remove the duplicate import.")
    return True
