"""BF16AutocastOptimWrapper: bf16 autocast on CPU, optimizer steps, resume, registry, mmcv ops.

The wrapper is what ``tools/train.py --amp`` uses without CUDA; these tests check it on a small
VMamba with a linear head, and check the float32 adaptation of the mmcv ops (nms, roi_align) that
have no bf16 kernels.
"""

import copy
import importlib

import pytest
import torch
import torch.nn as nn

pytest.importorskip("mmengine")

from mmengine.optim import OptimWrapper, build_optim_wrapper  # noqa: E402

from vmamba_mm.engine import BF16AutocastOptimWrapper  # noqa: E402
from vmamba_mm.engine.amp import MMCV_FLOAT32_OPS, mmcv_ops_in_float32  # noqa: E402
from vmamba_mm.models import VMamba  # noqa: E402

SMALL_ARCH = dict(dims=8, depths=[1, 1, 1, 1])


class _Classifier(nn.Module):
    """A small VMamba with a linear head; records the dtypes its forward sees."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = VMamba(SMALL_ARCH, drop_path_rate=0.0)
        self.head = nn.Linear(64, 3)
        self.seen = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        self.seen["features"] = features[-1].dtype
        logits = self.head(features[-1].mean(dim=(2, 3)))
        self.seen["logits"] = logits.dtype
        return logits


def _model_and_wrapper(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = _Classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return model, BF16AutocastOptimWrapper(optimizer=optimizer, **kwargs)


def _train_steps(model: nn.Module, wrapper: OptimWrapper, steps: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        images = torch.randn(2, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 3, (2,), generator=generator)
        with wrapper.optim_context(model):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        wrapper.update_params(loss)
        losses.append(loss.item())
    return losses


def test_forward_runs_in_bf16_under_the_context_and_the_step_updates_fp32_parameters() -> None:
    model, wrapper = _model_and_wrapper(clip_grad=dict(max_norm=1.0))
    before = copy.deepcopy(model.state_dict())

    losses = _train_steps(model, wrapper, steps=1, seed=1)

    assert model.seen == {"features": torch.bfloat16, "logits": torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in changed and "backbone.patch_embed.0.weight" in changed
    # Outside the context the model runs in float32 again.
    model(torch.randn(1, 3, 32, 32))
    assert model.seen["logits"] == torch.float32


def test_state_dict_round_trips_and_resumed_training_matches_uninterrupted_training() -> None:
    model, wrapper = _model_and_wrapper()
    _train_steps(model, wrapper, steps=2, seed=1)
    saved_model = copy.deepcopy(model.state_dict())
    saved_optim = copy.deepcopy(wrapper.state_dict())
    assert saved_optim["state"], "AdamW has moments to save after two steps"
    continued = _train_steps(model, wrapper, steps=2, seed=2)

    resumed_model, resumed_wrapper = _model_and_wrapper(seed=123)
    resumed_model.load_state_dict(saved_model)
    resumed_wrapper.load_state_dict(copy.deepcopy(saved_optim))
    state = resumed_wrapper.state_dict()
    for index, moments in saved_optim["state"].items():
        for key, value in moments.items():
            assert torch.equal(state["state"][index][key], value), (index, key)
    assert state["param_groups"] == saved_optim["param_groups"]

    assert _train_steps(resumed_model, resumed_wrapper, steps=2, seed=2) == continued
    for key, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_checkpoint_of_mmengine_amp_optim_wrapper_loads_without_its_loss_scaler() -> None:
    model, wrapper = _model_and_wrapper()
    _train_steps(model, wrapper, steps=1, seed=1)
    state = wrapper.state_dict()
    state["loss_scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 0}

    _, other = _model_and_wrapper()
    other.load_state_dict(state)

    assert "loss_scaler" in state, "the caller's dict is left as it was"
    assert "loss_scaler" not in other.state_dict()
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


@pytest.mark.parametrize("dtype", ["float16", torch.float16, "float32"])
def test_other_dtypes_are_refused_with_a_pointer_to_amp_optim_wrapper(dtype) -> None:
    with pytest.raises(ValueError, match="bfloat16 autocast only.*AmpOptimWrapper"):
        _model_and_wrapper(dtype=dtype)


@pytest.mark.parametrize("scope", ["mmdet", "mmseg"])
def test_wrapper_builds_by_name_from_the_mmdet_and_mmseg_registries(scope: str) -> None:
    pytest.importorskip(scope)
    from mmengine.registry import DefaultScope

    model = nn.Linear(4, 2)
    cfg = dict(type="BF16AutocastOptimWrapper", dtype="bfloat16",
               optimizer=dict(type="SGD", lr=0.1))
    with DefaultScope.overwrite_default_scope(scope):
        wrapper = build_optim_wrapper(model, cfg)
    assert type(wrapper) is BF16AutocastOptimWrapper


def _ops():
    pytest.importorskip("mmcv.ops")
    return importlib.import_module("mmcv.ops.nms"), importlib.import_module("mmcv.ops.roi_align")


def test_mmcv_nms_and_roi_align_take_bf16_inputs_inside_the_context_only() -> None:
    nms_module, roi_module = _ops()
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    features = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([[0.0, 1.0, 2.0, 9.0, 12.0]])

    # The root cause: mmcv's compiled CPU kernels dispatch on float32/float64 only.
    with pytest.raises((RuntimeError, NotImplementedError)):
        nms_module.nms(boxes.bfloat16(), scores.bfloat16(), 0.5)
    with pytest.raises((RuntimeError, NotImplementedError)):
        roi_module.roi_align(features.bfloat16(), rois, (2, 2), 1.0, 0, "avg", True)

    expected_dets, expected_keep = nms_module.nms(boxes, scores, 0.5)
    expected_pooled = roi_module.roi_align(features, rois, (2, 2), 1.0, 0, "avg", True)
    bf16_features = features.bfloat16().requires_grad_()
    with mmcv_ops_in_float32(), torch.autocast("cpu", dtype=torch.bfloat16):
        dets, keep = nms_module.nms(boxes.bfloat16(), scores.bfloat16(), 0.5)
        dets_fp32_boxes, _ = nms_module.nms(boxes, scores.bfloat16(), 0.5)
        pooled = roi_module.roi_align(bf16_features, rois, (2, 2), 1.0, 0, "avg", True)
    pooled.float().sum().backward()

    assert torch.equal(keep, expected_keep)
    assert dets.dtype == torch.bfloat16, "outputs follow the first argument (bf16 boxes)"
    assert dets_fp32_boxes.dtype == torch.float32, "fp32 boxes are not rounded to bf16"
    torch.testing.assert_close(dets.float(), expected_dets, atol=5e-3, rtol=0)
    assert pooled.dtype == torch.bfloat16, "outputs follow the first argument (bf16 features)"
    torch.testing.assert_close(pooled.float(), expected_pooled, atol=2e-2, rtol=2e-2)
    assert bf16_features.grad.dtype == torch.bfloat16
    assert bf16_features.grad.abs().sum() > 0


def test_mmcv_ops_are_restored_when_the_outermost_context_exits() -> None:
    modules = dict(zip(("mmcv.ops.nms", "mmcv.ops.roi_align"), _ops()))
    originals = {(m, n): getattr(modules[m], n) for m, n in MMCV_FLOAT32_OPS}

    with mmcv_ops_in_float32():
        patched = {key: getattr(modules[key[0]], key[1]) for key in originals}
        with mmcv_ops_in_float32():
            assert all(getattr(modules[m], n) is patched[(m, n)] for m, n in originals)
        assert all(getattr(modules[m], n) is patched[(m, n)] for m, n in originals)
    assert all(patched[key] is not originals[key] for key in originals)
    assert all(getattr(modules[m], n) is originals[(m, n)] for m, n in originals)


def test_wrapper_context_adapts_mmcv_ops_and_undoes_it_afterwards() -> None:
    nms_module, _ = _ops()
    original = nms_module.nms
    model, wrapper = _model_and_wrapper()

    with wrapper.optim_context(model):
        assert nms_module.nms is not original
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert nms_module.nms is original
    assert not torch.is_autocast_enabled("cpu")
