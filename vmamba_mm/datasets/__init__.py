"""Synthetic demo data: shapes pictures in COCO instance and ADE-style semantic formats.

Run ``python -m vmamba_mm.datasets --out data/shapes --seed 0`` to write a dataset.
"""

from .shapes import (
    SEG_CLASSES,
    SEG_PALETTE,
    SHAPE_CLASSES,
    SHAPE_PALETTE,
    ShapesConfig,
    generate_shapes_dataset,
    load_meta,
)

__all__ = [
    "SEG_CLASSES",
    "SEG_PALETTE",
    "SHAPE_CLASSES",
    "SHAPE_PALETTE",
    "ShapesConfig",
    "generate_shapes_dataset",
    "load_meta",
]
