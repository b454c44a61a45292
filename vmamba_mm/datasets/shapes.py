"""Synthetic "shapes" dataset for the CPU demo: COCO instances and ADE-style semantic labels.

Every image shows a few circles, squares and triangles in saturated colours (reddish circles,
bluish squares, yellow-green triangles, each with random hue jitter) on a textured background
(smooth noise, stripes and pixel noise). Shapes may overlap; a later shape hides what is under it,
and placements that would leave any shape less than half visible are redrawn. The whole dataset
is a pure function of its parameters and the seed, so the demo and the tests see the same pictures
on every machine.

Written layouts (``root`` is the output directory; details in ``layouts.py``)::

    layout="shapes" (the demo's)
    root/images/{train,val}/000000.jpg        RGB pictures shared by both formats
    root/annotations/instances_{train,val}.json
                                               COCO instances: polygons for fully visible shapes,
                                               compressed RLE for partly hidden ones, tight bbox of
                                               the visible pixels, area = visible pixel count,
                                               iscrowd = 0; category ids 1..3
    root/seg/{train,val}/000000.png            ADE-style uint8 label maps: 0 = unlabeled (ADE's
                                               "other", mapped to 255 by reduce_zero_label),
                                               1 = background, 2 = circle, 3 = square, 4 = triangle

    layout="coco" (COCO 2017's, for the configs in configs/mask_rcnn)
    root/annotations/instances_{train,val}2017.json   all 80 COCO categories; the shapes are
                                               "sports ball", "tv" and "kite"
    root/{train,val}2017/000000000001.jpg

    layout="ade" (ADE20K's, for the configs in configs/upernet)
    root/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_00000001.jpg
    root/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_00000001.png
                                               ADE's labels: 0 = other, background = wall (1),
                                               ball (120), box (42), flag (150)

    root/meta.json                             the generation parameters (used to reuse a dataset)

With ``reduce_zero_label=True`` (ADE20K's convention) the semantic classes of the "shapes" layout
become ``SEG_CLASSES = ("background", "circle", "square", "triangle")`` with ids 0..3.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .layouts import LAYOUTS, Layout

SHAPE_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle")
SEG_CLASSES: Tuple[str, ...] = ("background",) + SHAPE_CLASSES
# Colours used to draw label maps and predictions (one per class, RGB).
SHAPE_PALETTE: List[Tuple[int, int, int]] = [(220, 20, 60), (0, 130, 230), (250, 170, 30)]
SEG_PALETTE: List[Tuple[int, int, int]] = [(40, 40, 40)] + SHAPE_PALETTE

SPLITS: Tuple[str, ...] = ("train", "val")
META_FILE = "meta.json"
FORMAT_VERSION = 2
# Each class has its own family of hues (on a 0-6 colour wheel: 0 red, 2 green, 4 blue): a
# narrow model trained for minutes on a CPU can then tell the classes apart, so the demo shows the
# detector and segmentor learning, not just the background/foreground split. Shapes still vary
# in hue, brightness, size, rotation and overlap.
CLASS_HUES: Tuple[float, ...] = (0.0, 4.0, 1.8)
HUE_JITTER = 0.45
# A shape must keep at least this fraction of its pixels visible after later shapes are drawn.
MIN_VISIBLE_FRACTION = 0.5


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of a generated dataset.

    Args:
        seed: Seed of the whole dataset; the same seed gives the same files.
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: Side of the square images in pixels.
        min_shapes: Fewest shapes in one image.
        max_shapes: Most shapes in one image.
        min_scale: Smallest shape size (bounding-circle diameter) as a fraction of image_size.
        max_scale: Largest shape size as a fraction of image_size.
    """

    seed: int = 0
    num_train: int = 400
    num_val: int = 50
    image_size: int = 128
    min_shapes: int = 1
    max_shapes: int = 4
    min_scale: float = 0.2
    max_scale: float = 0.45

    def validate(self) -> None:
        """Raises a ValueError/TypeError naming the bad parameter and what would be accepted."""
        for name in ("seed", "num_train", "num_val", "image_size", "min_shapes", "max_shapes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}.")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(
                f"num_train and num_val must both be >= 1, got {self.num_train} and "
                f"{self.num_val}; both splits are needed to train and evaluate."
            )
        if not 32 <= self.image_size <= 2048:
            raise ValueError(
                f"image_size must be between 32 and 2048 pixels, got {self.image_size}."
            )
        if not 1 <= self.min_shapes <= self.max_shapes <= 12:
            raise ValueError(
                "shape counts must satisfy 1 <= min_shapes <= max_shapes <= 12, got "
                f"min_shapes={self.min_shapes}, max_shapes={self.max_shapes}."
            )
        for name in ("min_scale", "max_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}.")
        if not 0.05 <= self.min_scale <= self.max_scale <= 0.9:
            raise ValueError(
                "shape scales must satisfy 0.05 <= min_scale <= max_scale <= 0.9 (fractions of "
                f"the image side), got min_scale={self.min_scale}, max_scale={self.max_scale}."
            )
        if self.min_scale * self.image_size < 8:
            raise ValueError(
                f"min_scale * image_size = {self.min_scale * self.image_size:.1f} px is too small "
                "to draw a recognisable shape; use at least 8 px (raise min_scale or image_size)."
            )


@dataclass
class _Shape:
    """One drawn shape: its class, colour and full (unoccluded) mask and outline."""

    label: int  # index into SHAPE_CLASSES
    color: np.ndarray  # [3] float RGB
    mask: np.ndarray  # [H, W] bool, before occlusion
    polygon: np.ndarray  # [P, 2] float (x, y) outline in COCO pixel coordinates


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise in [0, 1].

    Returns:
        [size, size] float array.
    """
    grid = rng.random((cells + 1, cells + 1))
    coords = np.linspace(0, cells, size)
    rows = np.stack([np.interp(coords, np.arange(cells + 1), grid[:, j]) for j in range(cells + 1)])
    return np.stack([np.interp(coords, np.arange(cells + 1), row) for row in rows.T])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: a dull base colour, smooth blotches and faint stripes.

    Returns:
        [size, size, 3] float RGB in [0, 255].
    """
    base = rng.uniform(70, 180, size=3)
    # Low saturation keeps the background distinguishable from the saturated shapes by hue,
    # while blotches and stripes stop the model from relying on a flat background.
    base = base.mean() + 0.35 * (base - base.mean())
    blotches = _smooth_noise(rng, size, int(rng.integers(2, 6))) - 0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 20)
    stripes = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    tint = rng.uniform(-1, 1, size=3)
    image = (
        base[None, None, :]
        + 60 * blotches[..., None]
        + 14 * stripes[..., None] * (0.6 + 0.4 * tint[None, None, :])
    )
    return np.clip(image, 0, 255)


def _shape_color(rng: np.random.Generator, background: np.ndarray, label: int) -> np.ndarray:
    """A saturated colour of the class's hue family that stands out from the background.

    Returns:
        [3] float RGB.
    """
    mean_bg = background.reshape(-1, 3).mean(0)
    best, best_dist = None, -1.0
    for _ in range(8):
        hue = (CLASS_HUES[label] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 6
        sector, frac = int(hue) % 6, hue - int(hue)
        high, low = rng.uniform(190, 255), rng.uniform(0, 60)
        mid_up, mid_down = low + (high - low) * frac, high - (high - low) * frac
        rgb = [
            (high, mid_up, low),
            (mid_down, high, low),
            (low, high, mid_up),
            (low, mid_down, high),
            (mid_up, low, high),
            (high, low, mid_down),
        ][sector]
        color = np.asarray(rgb)
        dist = float(np.linalg.norm(color - mean_bg))
        if dist > best_dist:
            best, best_dist = color, dist
        if dist > 120:
            break
    return best


def _convex_polygon_mask(vertices: np.ndarray, size: int) -> np.ndarray:
    """Pixels whose centres lie inside a convex polygon.

    Args:
        vertices: [P, 2] (x, y) vertices in counter-clockwise or clockwise order.
        size: Image side.

    Returns:
        [size, size] bool mask.
    """
    centers = np.arange(size) + 0.5
    xx, yy = np.meshgrid(centers, centers)
    signs = []
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        signs.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0))
    signs = np.stack(signs)
    return np.all(signs >= 0, axis=0) | np.all(signs <= 0, axis=0)


def _draw_shape(rng: np.random.Generator, label: int, size: int, cfg: ShapesConfig) -> _Shape:
    """Samples position, size and rotation of one shape of class ``label``."""
    diameter = rng.uniform(cfg.min_scale, cfg.max_scale) * size
    radius = diameter / 2
    cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
    rotation = rng.uniform(0, 2 * math.pi)
    name = SHAPE_CLASSES[label]
    if name == "circle":
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        polygon = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        centers = np.arange(size) + 0.5
        xx, yy = np.meshgrid(centers, centers)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    else:
        corners = 4 if name == "square" else 3
        angles = rotation + np.arange(corners) * 2 * math.pi / corners
        polygon = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        mask = _convex_polygon_mask(polygon, size)
    return _Shape(label=label, color=np.zeros(3), mask=mask, polygon=polygon)


def _compose_image(
    rng: np.random.Generator, cfg: ShapesConfig
) -> Tuple[np.ndarray, List[_Shape], List[np.ndarray]]:
    """Draws one picture.

    Returns:
        image [H, W, 3] uint8, the shapes in drawing order, and their visible masks [H, W] bool.
    """
    size = cfg.image_size
    background = _background(rng, size)
    count = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    shapes: List[_Shape] = []
    for _ in range(count):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        for _attempt in range(20):
            candidate = _draw_shape(rng, label, size, cfg)
            if candidate.mask.sum() < 16:
                continue
            # Everything already placed (and the new shape itself, clipped by the border) must
            # stay mostly visible, or the annotation would describe a sliver.
            covered = candidate.mask
            ok = all(
                (s.mask & ~covered).sum() >= MIN_VISIBLE_FRACTION * s.mask.sum() for s in shapes
            )
            if ok:
                candidate.color = _shape_color(rng, background, label)
                shapes.append(candidate)
                break
    image = background.copy()
    visible = [s.mask.copy() for s in shapes]
    for i, shape in enumerate(shapes):
        shade = 1 + 0.25 * (_smooth_noise(rng, size, 2) - 0.5)
        image[shape.mask] = (shape.color[None, :] * shade[shape.mask][:, None]).clip(0, 255)
        for j in range(i):
            visible[j] &= ~shape.mask
    image += rng.normal(0, 5, size=image.shape)
    return image.clip(0, 255).round().astype(np.uint8), shapes, visible


def _encode_rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO compressed RLE of a mask, with the counts as a str so it fits in JSON."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _bbox_of(mask: np.ndarray) -> List[float]:
    """Tight COCO box [x, y, w, h] of a mask's pixels."""
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]


def _wanted_meta(cfg: ShapesConfig, layout: Layout) -> Dict[str, Any]:
    """The meta.json content of a dataset with these parameters (the demo layout names none)."""
    meta: Dict[str, Any] = {"format_version": FORMAT_VERSION, **asdict(cfg)}
    if layout.name != "shapes":
        meta["layout"] = layout.name
    return meta


def _check_out_dir(root: Path, cfg: ShapesConfig, layout: Layout, overwrite: bool) -> bool:
    """Decides whether ``root`` can be written. Returns True when it already holds this dataset."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"output path {root} exists and is not a directory; choose another --out.")
    if not root.exists() or not any(root.iterdir()):
        return False
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise ValueError(
            f"output directory {root} is not empty and holds no shapes dataset ({META_FILE} is "
            "missing); choose an empty or new directory so nothing of yours is overwritten."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{meta_path} is not valid JSON ({err}); delete {root} or pass overwrite=True."
        ) from err
    if meta == _wanted_meta(cfg, layout) and not overwrite:
        return True
    # A dataset written by an older version of this generator is ours to replace.
    outdated = meta.get("format_version") != FORMAT_VERSION
    if not overwrite and not outdated:
        raise ValueError(
            f"{root} holds a shapes dataset generated with other parameters ({meta}); pass "
            "overwrite=True (--overwrite) to regenerate it or choose another directory."
        )
    old_layout = LAYOUTS.get(meta.get("layout", "shapes"), layout)
    for sub in set(old_layout.owned) | set(layout.owned):
        shutil.rmtree(root / sub, ignore_errors=True)
    meta_path.unlink()
    return False


def generate_shapes_dataset(
    out_dir: Union[str, Path],
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 50,
    image_size: int = 128,
    min_shapes: int = 1,
    max_shapes: int = 4,
    min_scale: float = 0.2,
    max_scale: float = 0.45,
    overwrite: bool = False,
    layout: str = "shapes",
) -> Dict[str, Any]:
    """Writes the shapes dataset into ``out_dir`` in the demo's, COCO's or ADE20K's layout.

    A directory that already holds a dataset with exactly these parameters is reused as it is;
    a non-empty directory holding anything else is refused unless ``overwrite`` is set (and then
    only the dataset's own sub-directories and ``meta.json`` are replaced). The pictures depend
    only on the parameters and the seed, not on the layout.

    Args:
        out_dir: Output directory (created if missing). For the configs' default data roots:
            ``data/shapes`` (layout "shapes"), ``data/coco`` ("coco"), ``data/ade`` ("ade").
        seed, num_train, num_val, image_size, min_shapes, max_shapes, min_scale, max_scale:
            See :class:`ShapesConfig`.
        overwrite: Regenerate a dataset made with other parameters.
        layout: "shapes" (COCO instances and label maps side by side, for configs/demo),
            "coco" (COCO 2017's layout) or "ade" (ADE20K's); see ``layouts.py``.

    Returns:
        Summary dict: ``root``, ``layout``, ``reused`` (bool), per split ``images`` and
        ``instances`` counts, and the parameters.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {sorted(LAYOUTS)}.")
    spec = LAYOUTS[layout]
    cfg = ShapesConfig(
        seed=seed,
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        min_shapes=min_shapes,
        max_shapes=max_shapes,
        min_scale=min_scale,
        max_scale=max_scale,
    )
    cfg.validate()
    root = Path(out_dir)
    reused = _check_out_dir(root, cfg, spec, overwrite)
    summary: Dict[str, Any] = {
        "root": str(root), "layout": layout, "reused": reused, "params": asdict(cfg)}
    if reused:
        summary.update(_count_split_files(root, spec))
        return summary

    from PIL import Image

    counts = {"train": cfg.num_train, "val": cfg.num_val}
    size = cfg.image_size
    background_value = spec.seg_values[0]
    for split_index, split in enumerate(SPLITS):
        image_dir = root / spec.path(spec.image_dir, split_index, 0)
        image_dir.mkdir(parents=True, exist_ok=True)
        seg_dir = None
        if spec.label_dir is not None:
            seg_dir = root / spec.path(spec.label_dir, split_index, 0)
            seg_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(counts[split]):
            # One generator per picture: any picture can be regenerated on its own and the
            # splits do not shift when the other split's size changes.
            rng = np.random.default_rng([cfg.seed, split_index, index])
            image, shapes, visible = _compose_image(rng, cfg)
            file_name = spec.path(spec.image_name, split_index, index)
            Image.fromarray(image).save(image_dir / file_name, quality=95)
            label_map = np.full(image.shape[:2], background_value, dtype=np.uint8)
            image_id = index + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": cfg.image_size,
                    "height": cfg.image_size,
                }
            )
            for shape, seen in zip(shapes, visible):
                label_map[seen] = spec.seg_values[1 + shape.label]
                if not seen.any():
                    continue
                # A polygon describes the shape only when nothing hides it and it lies inside the
                # picture; otherwise the visible pixels are stored as RLE.
                inside = bool((shape.polygon >= 0).all() and (shape.polygon <= size).all())
                segmentation: Union[List[List[float]], Dict[str, Any]]
                if not inside or not np.array_equal(seen, shape.mask):
                    segmentation = _encode_rle(seen)
                else:
                    segmentation = [[round(float(v), 2) for v in shape.polygon.reshape(-1)]]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": spec.category_ids[shape.label],
                        "bbox": _bbox_of(seen),
                        "area": float(seen.sum()),
                        "segmentation": segmentation,
                        "iscrowd": 0,
                    }
                )
            if seg_dir is not None:
                Image.fromarray(label_map).save(seg_dir / (Path(file_name).stem + ".png"))
        if spec.ann_file is not None:
            coco = {
                "info": {"description": f"synthetic shapes ({split}), seed {cfg.seed}"},
                "images": images,
                "annotations": annotations,
                "categories": [
                    {"id": cat_id, "name": name, "supercategory": supercategory}
                    for cat_id, name, supercategory in spec.categories
                ],
            }
            ann_path = root / spec.path(spec.ann_file, split_index, 0)
            ann_path.parent.mkdir(parents=True, exist_ok=True)
            ann_path.write_text(json.dumps(coco))
        summary[split] = {"images": len(images)}
        if spec.ann_file is not None:
            summary[split]["instances"] = len(annotations)
    # Written last: its presence marks a complete dataset.
    (root / META_FILE).write_text(json.dumps(_wanted_meta(cfg, spec)))
    return summary


def _count_split_files(root: Path, layout: Layout) -> Dict[str, Dict[str, int]]:
    """Per split, the pictures and instances of a dataset that is already written."""
    counts = {}
    for split_index, split in enumerate(SPLITS):
        if layout.ann_file is not None:
            coco = json.loads((root / layout.path(layout.ann_file, split_index, 0)).read_text())
            counts[split] = {"images": len(coco["images"]),
                             "instances": len(coco["annotations"])}
        else:
            image_dir = root / layout.path(layout.image_dir, split_index, 0)
            counts[split] = {"images": len(list(image_dir.glob("*.jpg")))}
    return counts


def load_meta(root: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The parameters a dataset in ``root`` was generated with, or None if there is none."""
    path = Path(root) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None
