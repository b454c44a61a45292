"""Directory layouts the shapes dataset can be written in: its own, COCO 2017's and ADE20K's.

* ``shapes`` (the demo's)::

      root/images/{train,val}/000000.jpg
      root/annotations/instances_{train,val}.json   categories circle=1, square=2, triangle=3
      root/seg/{train,val}/000000.png               1 = background, 2..4 = the shapes

* ``coco``: what mmdet's COCO configs expect under ``data_root='data/coco/'``::

      root/annotations/instances_{train,val}2017.json
      root/{train,val}2017/000000000001.jpg

  The annotation files list all 80 COCO categories with their official ids and names, because
  mmdet's ``CocoDataset`` and ``CocoMetric`` find the category ids by class name: a file with only
  the shapes' categories would give them the labels 0..2 instead of their COCO indices. The shapes
  are annotated as ``sports ball`` (circle), ``tv`` (square) and ``kite`` (triangle).

* ``ade``: what mmseg's ADE20K configs expect under
  ``data_root='data/ade/ADEChallengeData2016'`` (``root`` is ``data/ade``)::

      root/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_00000001.jpg
      root/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_00000001.png

  The PNGs follow ADE's convention: 0 = "other" (mmseg's ``reduce_zero_label=True`` turns it
  into the ignore index 255), classes 1..150 in the order of mmseg's ``ADE20KDataset``. The
  background is labelled ``wall`` (1), circles ``ball`` (120), squares ``box`` (42) and
  triangles ``flag`` (150).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# (id, name, supercategory) of COCO 2017's 80 categories, as in instances_val2017.json.
COCO_CATEGORIES: Tuple[Tuple[int, str, str], ...] = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"),
    (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
    (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"), (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"),
    (53, "apple", "food"), (54, "sandwich", "food"), (55, "orange", "food"),
    (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"),
    (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"), (78, "microwave", "appliance"), (79, "oven", "appliance"),
    (80, "toaster", "appliance"), (81, "sink", "appliance"), (82, "refrigerator", "appliance"),
    (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)


@dataclass(frozen=True)
class Layout:
    """Where a layout puts each file and which labels it gives the shapes.

    Path templates are relative to the output directory and may use ``{split}`` (the layout's
    name of the split), ``{short}`` ("train" or "val"), ``{index}`` (0-based picture number) and
    ``{image_id}`` (``index + 1``).

    Attributes:
        name: "shapes", "coco" or "ade".
        splits: the layout's names of the (train, val) splits.
        image_dir: folder of the JPEG pictures.
        image_name: file name of a picture; its label map has the same stem with ``.png``.
        label_dir: folder of the semantic label maps, None when the layout has none.
        ann_file: COCO instances file of a split, None when the layout has none.
        categories: the COCO categories (id, name, supercategory) listed in ``ann_file``.
        category_ids: the COCO category id of each of ``SHAPE_CLASSES``.
        seg_values: label-map value of the background and of each of ``SHAPE_CLASSES``.
        owned: top-level entries of the output directory that the layout writes (replaced when
            a dataset is regenerated).
    """

    name: str
    splits: Tuple[str, str]
    image_dir: str
    image_name: str
    label_dir: Optional[str]
    ann_file: Optional[str]
    categories: Tuple[Tuple[int, str, str], ...]
    category_ids: Tuple[int, int, int]
    seg_values: Tuple[int, int, int, int]
    owned: Tuple[str, ...]

    def path(self, template: str, split_index: int, index: int) -> str:
        """Fills a path template for picture ``index`` of split ``split_index`` (0 train, 1 val)."""
        return template.format(split=self.splits[split_index], short=("train", "val")[split_index],
                               index=index, image_id=index + 1)


LAYOUTS: Dict[str, Layout] = {
    "shapes": Layout(
        name="shapes",
        splits=("train", "val"),
        image_dir="images/{split}",
        image_name="{index:06d}.jpg",
        label_dir="seg/{split}",
        ann_file="annotations/instances_{split}.json",
        categories=((1, "circle", "shape"), (2, "square", "shape"), (3, "triangle", "shape")),
        category_ids=(1, 2, 3),
        seg_values=(1, 2, 3, 4),
        owned=("images", "annotations", "seg"),
    ),
    "coco": Layout(
        name="coco",
        splits=("train2017", "val2017"),
        image_dir="{split}",
        image_name="{image_id:012d}.jpg",
        label_dir=None,
        ann_file="annotations/instances_{split}.json",
        categories=COCO_CATEGORIES,
        category_ids=(37, 72, 38),
        seg_values=(1, 2, 3, 4),
        owned=("annotations", "train2017", "val2017"),
    ),
    "ade": Layout(
        name="ade",
        splits=("training", "validation"),
        image_dir="ADEChallengeData2016/images/{split}",
        image_name="ADE_{short}_{image_id:08d}.jpg",
        label_dir="ADEChallengeData2016/annotations/{split}",
        ann_file=None,
        categories=(),
        category_ids=(0, 0, 0),
        seg_values=(1, 120, 42, 150),
        owned=("ADEChallengeData2016",),
    ),
}
