"""VMamba converted to bf16 / fp16 runs, returns its own dtype and stays close to fp32.

The selective scan returns float32 (like the official "oflex" kernel), so SS2D normalises its
output in float32 and casts back; a model converted with ``.to(torch.bfloat16)`` must not trip
over its low-precision ``out_norm`` parameters. Also covers the input casting of
``VMamba.forward`` (fp32 images into a bf16 model) and its error for empty images.
"""

from typing import Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vmamba_mm.errors import ImageTooSmallError
from vmamba_mm.models import VMamba
from vmamba_mm.models.layers import LayerNorm2d, layer_norm_float32

ARCHS = ["tiny", "vanilla-tiny"]  # the "two-conv" (v2) and "conv4" (vanilla) stems
LAYOUTS = [True, False]
MAX_RELATIVE_ERROR = 0.05


def _fp32_model_and_outputs(arch: str, channel_first: bool
                            ) -> Tuple[VMamba, torch.Tensor, Tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = VMamba(arch, channel_first=channel_first, drop_path_rate=0.0).eval()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model(images)
    return model, images, outputs


def _relative_errors(outputs, reference) -> list:
    return [((out.float() - ref).norm() / ref.norm()).item()
            for out, ref in zip(outputs, reference)]


def _missing_cpu_half_kernel() -> Optional[str]:
    """Returns the error of the first fp16 CPU kernel VMamba needs that torch lacks, or None."""
    x = torch.randn(1, 4, 6, 6).half()
    probes = {
        "conv2d": lambda: F.conv2d(x, torch.randn(4, 1, 3, 3).half(), groups=4),
        "linear": lambda: F.linear(x.permute(0, 2, 3, 1), torch.randn(4, 4).half()),
        "layer_norm": lambda: F.layer_norm(x.permute(0, 2, 3, 1), (4,),
                                           torch.ones(4).half(), torch.zeros(4).half()),
        "gelu": lambda: F.gelu(x),
        "silu": lambda: F.silu(x),
    }
    for name, probe in probes.items():
        try:
            probe()
        except RuntimeError as err:
            return f"torch {torch.__version__} has no fp16 CPU kernel for {name}: {err}"
    return None


@pytest.mark.parametrize("channel_first", LAYOUTS, ids=["channel-first", "channel-last"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_model_returns_bf16_within_5_percent_of_fp32(arch: str, channel_first: bool) -> None:
    model, images, reference = _fp32_model_and_outputs(arch, channel_first)
    model = model.to(torch.bfloat16)

    with torch.no_grad():
        outputs = model(images.bfloat16())

    assert len(outputs) == len(reference) == 4
    assert all(out.dtype == torch.bfloat16 for out in outputs)
    assert [out.shape for out in outputs] == [ref.shape for ref in reference]
    errors = _relative_errors(outputs, reference)
    assert max(errors) < MAX_RELATIVE_ERROR, errors
    # bf16 keeps ~3 significant digits: an output equal to fp32 would mean nothing ran in bf16.
    assert min(errors) > 0, errors


@pytest.mark.parametrize("channel_first", LAYOUTS, ids=["channel-first", "channel-last"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_model_returns_fp16_within_5_percent_of_fp32_on_cpu(arch: str,
                                                                 channel_first: bool) -> None:
    missing = _missing_cpu_half_kernel()
    if missing:
        pytest.skip(missing)
    model, images, reference = _fp32_model_and_outputs(arch, channel_first)
    model = model.half()

    with torch.no_grad():
        outputs = model(images.half())

    assert all(out.dtype == torch.float16 for out in outputs)
    errors = _relative_errors(outputs, reference)
    assert all(torch.isfinite(out).all() for out in outputs)
    assert max(errors) < MAX_RELATIVE_ERROR, errors


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_images_are_cast_to_the_dtype_of_a_bf16_model(arch: str) -> None:
    # mmdet/mmseg data preprocessors hand float32 batches to the backbone.
    model, images, _ = _fp32_model_and_outputs(arch, channel_first=True)
    model = model.to(torch.bfloat16)

    with torch.no_grad():
        from_fp32 = model(images)
        from_bf16 = model(images.bfloat16())

    assert all(out.dtype == torch.bfloat16 for out in from_fp32)
    assert all(torch.equal(a, b) for a, b in zip(from_fp32, from_bf16))


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_model_under_cpu_bf16_autocast_stays_within_5_percent(arch: str) -> None:
    model, images, reference = _fp32_model_and_outputs(arch, channel_first=True)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)

    assert all(out.dtype == torch.bfloat16 for out in outputs), "autocast ran the model"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert max(_relative_errors(outputs, reference)) < MAX_RELATIVE_ERROR


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_model_backward_gives_finite_gradients_for_every_parameter(arch: str) -> None:
    torch.manual_seed(0)
    model = VMamba(arch, drop_path_rate=0.1).train().to(torch.bfloat16)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    loss = sum(out.float().square().mean() for out in model(images))
    loss.backward()

    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("norm", [nn.LayerNorm(8), LayerNorm2d(8)], ids=["ln", "ln2d"])
def test_layer_norm_float32_equals_the_module_in_fp32_and_upcasts_bf16_parameters(
    norm: nn.LayerNorm,
) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=generator))
        norm.bias.copy_(torch.randn(8, generator=generator))
    shape = (2, 8, 3, 5) if isinstance(norm, LayerNorm2d) else (2, 3, 5, 8)
    x = torch.randn(*shape, generator=generator)

    assert torch.equal(layer_norm_float32(norm, x), norm(x)), "fp32 path is unchanged"

    expected = type(norm)(8)
    expected.load_state_dict({k: v.bfloat16().float() for k, v in norm.state_dict().items()})
    norm = norm.to(torch.bfloat16)
    out = layer_norm_float32(norm, x)
    assert out.dtype == torch.float32
    assert norm.weight.dtype == torch.bfloat16, "the module keeps its dtype"
    torch.testing.assert_close(out, expected(x))


@pytest.mark.parametrize("size", [(0, 32), (32, 0), (0, 0)], ids=["no-rows", "no-cols", "none"])
@pytest.mark.parametrize("arch", ARCHS)
def test_empty_image_raises_image_too_small_error_naming_its_size(arch: str,
                                                                  size: Tuple[int, int]) -> None:
    model = VMamba(arch).eval()
    height, width = size

    with pytest.raises(ImageTooSmallError, match=rf"{height}x{width} pixels.*at least 1"):
        model(torch.randn(1, 3, height, width))


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (2, 3), (3, 3), (5, 1)])
@pytest.mark.parametrize("arch", ARCHS)
def test_images_of_one_to_five_pixels_pass_both_stems(arch: str, size: Tuple[int, int]) -> None:
    # The smallest non-empty sizes are accepted by both stems (the "two-conv" 3x3 convs are
    # padded, the "conv4" input is zero-padded to a multiple of 4), so only empty images raise.
    model = VMamba(arch).eval()
    height, width = size

    with torch.no_grad():
        outputs = model(torch.randn(1, 3, height, width))

    expected = [(-(-height // 2 ** (i + 2)), -(-width // 2 ** (i + 2))) for i in range(4)]
    assert [tuple(out.shape[2:]) for out in outputs] == expected
    assert all(torch.isfinite(out).all() for out in outputs)


def test_integer_images_raise_a_type_error_that_says_to_convert_them() -> None:
    model = VMamba("tiny").eval()

    with pytest.raises(TypeError, match="floating-point images.*torch.uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
