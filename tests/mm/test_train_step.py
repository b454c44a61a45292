"""One training iteration and one test step of the demo Mask R-CNN and UperNet (small VMamba)."""

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402

from vmamba_mm.datasets import generate_shapes_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DET_CONFIG = ROOT / "configs" / "demo" / "mask-rcnn_vmamba-demo_shapes-128.py"
SEG_CONFIG = ROOT / "configs" / "demo" / "upernet_vmamba-demo_shapes-128.py"


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_shapes")
    generate_shapes_dataset(root, seed=0, num_train=2, num_val=1, image_size=64,
                            min_shapes=2, max_shapes=3, min_scale=0.3, max_scale=0.5)
    return root


def _build(config: Path, root: Path):
    """Model and a 2-picture training batch (64 px pictures; the pipeline resizes to 64)."""
    import vmamba_mm  # noqa: F401  (registers VMamba)

    cfg = Config.fromfile(str(config))
    scope = cfg.default_scope
    if scope == "mmdet":
        from mmdet.registry import DATASETS, MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import DATASETS, MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    # Tiny pictures keep the test fast; the model is otherwise exactly the demo's.
    for step in cfg.train_dataloader.dataset.pipeline + cfg.test_dataloader.dataset.pipeline:
        if step["type"] == "Resize":
            step["scale"] = (64, 64)
    if scope == "mmseg":
        cfg.model.data_preprocessor.size = (64, 64)
    cfg.train_dataloader.dataset.data_root = str(root) + "/"
    cfg.test_dataloader.dataset.data_root = str(root) + "/"
    model = MODELS.build(cfg.model)
    model.init_weights()
    train_set = DATASETS.build(cfg.train_dataloader.dataset)
    test_set = DATASETS.build(cfg.test_dataloader.dataset)
    return model, pseudo_collate([train_set[0], train_set[1]]), pseudo_collate([test_set[0]])


def _train_iteration(model, batch):
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    loss.backward()
    return loss, log_vars


def _assert_backbone_learns(model) -> None:
    params = list(model.backbone.named_parameters())
    assert params
    missing = [name for name, p in params if p.requires_grad and p.grad is None]
    assert not missing, f"backbone parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    assert sum(p.grad.abs().sum().item() for _, p in params) > 0
    # The selective-scan parameters are reached too, not only the convolutions around them.
    assert any("A_logs" in name and p.grad.abs().sum() > 0 for name, p in params)


def test_mask_rcnn_trains_one_iteration_and_predicts_boxes_and_masks(tiny_shapes: Path) -> None:
    torch.manual_seed(0)
    model, train_batch, test_batch = _build(DET_CONFIG, tiny_shapes)
    assert type(model.backbone).__name__ == "VMamba"
    loss, log_vars = _train_iteration(model, train_batch)
    assert torch.isfinite(loss)
    for key in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"):
        assert key in log_vars and math.isfinite(float(log_vars[key]))
    _assert_backbone_learns(model)

    model.eval()
    with torch.no_grad():
        (result,) = model.test_step(test_batch)
    pred = result.pred_instances
    n = len(pred)
    assert pred.bboxes.shape == (n, 4)
    assert pred.scores.shape == (n,) and pred.labels.shape == (n,)
    assert pred.masks.shape == (n, 64, 64) and pred.masks.dtype == torch.bool
    if n:
        assert pred.labels.min() >= 0 and pred.labels.max() < 3
        assert (pred.bboxes[:, 2:] >= pred.bboxes[:, :2]).all()


def test_upernet_trains_one_iteration_and_predicts_a_label_map(tiny_shapes: Path) -> None:
    torch.manual_seed(0)
    model, train_batch, test_batch = _build(SEG_CONFIG, tiny_shapes)
    assert type(model.backbone).__name__ == "VMamba"
    loss, log_vars = _train_iteration(model, train_batch)
    assert torch.isfinite(loss)
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(log_vars)
    _assert_backbone_learns(model)

    model.eval()
    with torch.no_grad():
        (result,) = model.test_step(test_batch)
    labels = result.pred_sem_seg.data
    assert labels.shape == (1, 64, 64)
    assert labels.min() >= 0 and labels.max() < 4
    assert result.seg_logits.data.shape == (4, 64, 64)
