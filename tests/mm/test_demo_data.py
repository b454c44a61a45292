"""The synthetic shapes dataset: determinism, demo/COCO/ADE20K layouts, loading by mmdet/mmseg."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmamba_mm.datasets import (
    COCO_CATEGORIES,
    LAYOUTS,
    SEG_CLASSES,
    SHAPE_CLASSES,
    generate_shapes_dataset,
    load_meta,
)

PIL = pytest.importorskip("PIL.Image")
mask_utils = pytest.importorskip("pycocotools.mask")

SMALL = dict(num_train=6, num_val=3, image_size=64, min_scale=0.25, max_scale=0.5)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(root, seed=3, **SMALL)
    return root


def _file_bytes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _coco_mask(ann: dict, height: int, width: int) -> np.ndarray:
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    else:
        rle = dict(seg, counts=seg["counts"].encode("ascii"))
    return mask_utils.decode(rle).astype(bool)


def test_same_seed_gives_identical_files_and_other_seed_differs(
    shapes_root: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    generate_shapes_dataset(again, seed=3, **SMALL)
    assert _file_bytes(again) == _file_bytes(shapes_root)
    other = tmp_path / "other"
    generate_shapes_dataset(other, seed=4, **SMALL)
    a = json.loads((other / "annotations" / "instances_train.json").read_text())
    b = json.loads((shapes_root / "annotations" / "instances_train.json").read_text())
    assert a["annotations"] != b["annotations"]


def test_coco_annotations_describe_the_visible_pixels_of_the_label_maps(shapes_root: Path) -> None:
    for split, count in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        coco = json.loads((shapes_root / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
        assert len(coco["images"]) == count
        by_image = {img["id"]: [] for img in coco["images"]}
        for ann in coco["annotations"]:
            by_image[ann["image_id"]].append(ann)
        kinds = set()
        for img in coco["images"]:
            anns = by_image[img["id"]]
            assert anns, "every generated picture holds at least one shape"
            label_map = np.array(PIL.open(shapes_root / "seg" / split / img["file_name"].replace(
                ".jpg", ".png")))
            assert label_map.shape == (img["height"], img["width"])
            # 0 is ADE's "unlabeled", 1 is background, 2.. are the shapes.
            assert set(np.unique(label_map)) <= {1, 2, 3, 4}
            union = np.zeros_like(label_map, dtype=bool)
            for ann in anns:
                kinds.add("polygon" if isinstance(ann["segmentation"], list) else "rle")
                mask = _coco_mask(ann, img["height"], img["width"])
                assert ann["iscrowd"] == 0
                assert ann["area"] == pytest.approx(mask.sum(), rel=0.15)
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(mask)
                assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
                assert abs(xs.max() + 1 - (x + w)) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
                # The label map paints the instance's visible pixels with its class.
                agree = (label_map[mask] == ann["category_id"] + 1).mean()
                assert agree > 0.9
                union |= mask
            assert ((label_map > 1) == union).mean() > 0.97
        if split == "train":
            assert kinds == {"polygon", "rle"}, "both mask encodings are exercised"


def test_reuses_a_matching_dataset_and_refuses_to_clobber_other_files(
    shapes_root: Path, tmp_path: Path
) -> None:
    summary = generate_shapes_dataset(shapes_root, seed=3, **SMALL)
    assert summary["reused"] and summary["train"]["images"] == SMALL["num_train"]
    assert load_meta(shapes_root)["seed"] == 3
    with pytest.raises(ValueError, match="other parameters"):
        generate_shapes_dataset(shapes_root, seed=5, **SMALL)

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate_shapes_dataset(foreign, seed=0, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"

    copy = tmp_path / "copy"
    generate_shapes_dataset(copy, seed=3, **SMALL)
    (copy / "notes.txt").write_text("keep me too")
    generate_shapes_dataset(copy, seed=5, overwrite=True, **SMALL)
    assert load_meta(copy)["seed"] == 5
    assert (copy / "notes.txt").read_text() == "keep me too"


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (dict(num_train=0), ValueError, "num_train"),
        (dict(image_size=16), ValueError, "image_size"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(min_shapes=3, max_shapes=2), ValueError, "min_shapes"),
        (dict(min_scale=0.6, max_scale=0.3), ValueError, "min_scale"),
        (dict(image_size=32, min_scale=0.1), ValueError, "too small"),
    ],
)
def test_bad_parameters_are_refused_with_the_parameter_named(
    tmp_path: Path, bad: dict, error: type, match: str
) -> None:
    params = dict(SMALL, **bad)
    with pytest.raises(error, match=match):
        generate_shapes_dataset(tmp_path / "out", **params)
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        generate_shapes_dataset(target, **SMALL)


def test_command_line_writes_the_dataset_and_reports_errors(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "vmamba_mm.datasets", "--out", str(out), "--seed", "1",
           "--num-train", "2", "--num-val", "1", "--image-size", "48"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["train"]["images"] == 2
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 2
    bad = subprocess.run(cmd[:-1] + ["8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "image_size" in bad.stderr


def test_mmdet_and_mmseg_datasets_load_the_generated_files(shapes_root: Path) -> None:
    pytest.importorskip("mmdet")
    pytest.importorskip("mmseg")
    from mmdet.datasets import CocoDataset
    from mmengine.registry import DefaultScope
    from mmseg.datasets import BaseSegDataset

    # Each toolbox resolves its pipeline under its own default scope, as its configs do (other
    # tests may have left a default scope set).
    with DefaultScope.overwrite_default_scope("mmdet"):
        det = _coco_dataset(CocoDataset, shapes_root)
    assert len(det) == SMALL["num_train"]
    sample = det[0]
    assert sample["img"].shape == (64, 64, 3)
    assert len(sample["gt_masks"]) == len(sample["gt_bboxes"]) > 0
    assert set(sample["gt_bboxes_labels"].tolist()) <= {0, 1, 2}

    with DefaultScope.overwrite_default_scope("mmseg"):
        seg = _seg_dataset(BaseSegDataset, shapes_root)
    assert len(seg) == SMALL["num_val"]
    labels = np.unique(seg[0]["gt_seg_map"])
    assert labels.min() == 0 and labels.max() <= len(SEG_CLASSES) - 1


def _coco_dataset(dataset_class, shapes_root: Path):
    return dataset_class(
        data_root=str(shapes_root),
        ann_file="annotations/instances_train.json",
        data_prefix=dict(img="images/train/"),
        metainfo=dict(classes=SHAPE_CLASSES),
        pipeline=[
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        ],
    )


def _seg_dataset(dataset_class, shapes_root: Path):
    return dataset_class(
        data_root=str(shapes_root),
        data_prefix=dict(img_path="images/val", seg_map_path="seg/val"),
        img_suffix=".jpg",
        seg_map_suffix=".png",
        reduce_zero_label=True,
        metainfo=dict(classes=SEG_CLASSES),
        pipeline=[
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", reduce_zero_label=True),
        ],
    )


def test_dataset_of_an_older_generator_version_is_regenerated(tmp_path: Path) -> None:
    root = tmp_path / "old"
    params = dict(SMALL, num_train=1, num_val=1)
    generate_shapes_dataset(root, seed=0, **params)
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps(dict(meta, format_version=0)))
    summary = generate_shapes_dataset(root, seed=0, **params)
    assert not summary["reused"]
    assert load_meta(root)["format_version"] == meta["format_version"]


@pytest.fixture(scope="module")
def coco_and_ade_roots(tmp_path_factory: pytest.TempPathFactory) -> dict:
    roots = {}
    for layout in ("coco", "ade"):
        roots[layout] = tmp_path_factory.mktemp(layout)
        generate_shapes_dataset(roots[layout], seed=3, layout=layout, **SMALL)
    return roots


def test_coco_layout_matches_coco_2017_and_holds_the_same_pictures(
    shapes_root: Path, coco_and_ade_roots: dict
) -> None:
    root = coco_and_ade_roots["coco"]
    assert sorted(p.name for p in root.iterdir()) == [
        "annotations", "meta.json", "train2017", "val2017"]
    ours = json.loads((shapes_root / "annotations" / "instances_val.json").read_text())
    coco = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [
        (i, n) for i, n, _ in COCO_CATEGORIES]
    assert len(coco["categories"]) == 80 and len({c["id"] for c in coco["categories"]}) == 80
    assert [img["file_name"] for img in coco["images"]] == [
        f"{i:012d}.jpg" for i in range(1, SMALL["num_val"] + 1)]
    # Same pictures and instances as the demo layout, under COCO's category ids.
    new_ids = dict(zip((1, 2, 3), LAYOUTS["coco"].category_ids))
    assert [dict(a, category_id=new_ids[a["category_id"]]) for a in ours["annotations"]] == \
        coco["annotations"]
    for ours_img, coco_img in zip(ours["images"], coco["images"]):
        assert (shapes_root / "images" / "val" / ours_img["file_name"]).read_bytes() == \
            (root / "val2017" / coco_img["file_name"]).read_bytes()


def test_ade_layout_follows_ade20k_names_and_label_convention(
    shapes_root: Path, coco_and_ade_roots: dict
) -> None:
    root = coco_and_ade_roots["ade"]
    assert sorted(p.name for p in root.iterdir()) == ["ADEChallengeData2016", "meta.json"]
    ade = root / "ADEChallengeData2016"
    for split, short, count in (("training", "train", SMALL["num_train"]),
                                ("validation", "val", SMALL["num_val"])):
        names = [f"ADE_{short}_{i:08d}" for i in range(1, count + 1)]
        assert sorted(p.stem for p in (ade / "images" / split).glob("*.jpg")) == names
        assert sorted(p.stem for p in (ade / "annotations" / split).glob("*.png")) == names
    demo = np.array(PIL.open(shapes_root / "seg" / "train" / "000000.png"))
    labels = np.array(PIL.open(ade / "annotations" / "training" / "ADE_train_00000001.png"))
    to_ade = dict(zip(LAYOUTS["shapes"].seg_values, LAYOUTS["ade"].seg_values))
    assert np.array_equal(np.vectorize(to_ade.get)(demo), labels)


def test_mmdet_and_mmseg_load_the_coco_and_ade_layouts_with_their_stock_settings(
    coco_and_ade_roots: dict
) -> None:
    pytest.importorskip("mmdet")
    pytest.importorskip("mmseg")
    from mmdet.datasets import CocoDataset
    from mmengine.registry import DefaultScope
    from mmseg.datasets import ADE20KDataset

    # The dataset arguments of mmdet's coco_instance.py and mmseg's ade20k.py base configs.
    with DefaultScope.overwrite_default_scope("mmdet"):
        det = CocoDataset(
            data_root=str(coco_and_ade_roots["coco"]),
            ann_file="annotations/instances_train2017.json",
            data_prefix=dict(img="train2017/"),
            filter_cfg=dict(filter_empty_gt=True, min_size=32),
            pipeline=[dict(type="LoadImageFromFile"),
                      dict(type="LoadAnnotations", with_bbox=True, with_mask=True)],
        )
    assert len(det) == SMALL["num_train"]
    classes = CocoDataset.METAINFO["classes"]
    expected = {classes.index(n) for n in ("sports ball", "tv", "kite")}
    labels = set()
    for index in range(len(det)):
        labels |= set(det[index]["gt_bboxes_labels"].tolist())
    assert labels and labels <= expected

    with DefaultScope.overwrite_default_scope("mmseg"):
        seg = ADE20KDataset(
            data_root=str(coco_and_ade_roots["ade"] / "ADEChallengeData2016"),
            data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
            pipeline=[dict(type="LoadImageFromFile"),
                      dict(type="LoadAnnotations", reduce_zero_label=True)],
        )
    assert len(seg) == SMALL["num_val"]
    ade_classes = ADE20KDataset.METAINFO["classes"]
    names = {ade_classes[v - 1] for v in LAYOUTS["ade"].seg_values}
    assert names == {"wall", "ball", "box", "flag"}
    found = set(np.unique(seg[0]["gt_seg_map"]).tolist())
    assert 0 in found and found <= {v - 1 for v in LAYOUTS["ade"].seg_values}


def test_switching_layouts_replaces_the_old_layout_and_unknown_layouts_are_refused(
    tmp_path: Path
) -> None:
    root = tmp_path / "data"
    params = dict(SMALL, num_train=1, num_val=1)
    generate_shapes_dataset(root, seed=0, layout="coco", **params)
    assert generate_shapes_dataset(root, seed=0, layout="coco", **params)["reused"]
    with pytest.raises(ValueError, match="other parameters"):
        generate_shapes_dataset(root, seed=0, layout="ade", **params)
    generate_shapes_dataset(root, seed=0, layout="ade", overwrite=True, **params)
    assert sorted(p.name for p in root.iterdir()) == ["ADEChallengeData2016", "meta.json"]
    assert load_meta(root)["layout"] == "ade"
    with pytest.raises(ValueError, match="layout 'voc'"):
        generate_shapes_dataset(tmp_path / "voc", layout="voc", **params)


def test_command_line_writes_the_coco_layout(tmp_path: Path) -> None:
    out = tmp_path / "coco"
    cmd = [sys.executable, "-m", "vmamba_mm.datasets", "--out", str(out), "--layout", "coco",
           "--num-train", "2", "--num-val", "1", "--image-size", "48"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    assert summary["layout"] == "coco" and summary["val"]["images"] == 1
    assert (out / "annotations" / "instances_train2017.json").is_file()
    assert len(list((out / "train2017").glob("*.jpg"))) == 2
