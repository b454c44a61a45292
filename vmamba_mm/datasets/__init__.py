"""Synthetic data: shapes pictures in COCO instance and ADE-style semantic formats.

Run ``python -m vmamba_mm.datasets --out data/shapes --seed 0`` to write the demo's dataset, or
``--out data/coco --layout coco`` / ``--out data/ade --layout ade`` for the COCO 2017 and ADE20K
layouts that the configs in configs/mask_rcnn and configs/upernet read.
"""

from .layouts import COCO_CATEGORIES, LAYOUTS, Layout
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
    "COCO_CATEGORIES",
    "LAYOUTS",
    "Layout",
    "SEG_CLASSES",
    "SEG_PALETTE",
    "SHAPE_CLASSES",
    "SHAPE_PALETTE",
    "ShapesConfig",
    "generate_shapes_dataset",
    "load_meta",
]
