"""Small building blocks of the VMamba backbone: norms, linears, MLP, stems, downsamples, drop path.

Every block works in one of two tensor layouts, chosen once per model:

* channel-first ("ln2d"): tensors are [B, C, H, W]; norms are ``LayerNorm2d`` and linears are
  ``Linear2d`` (a 1x1 convolution that keeps ``nn.Linear``'s weight shape);
* channel-last ("ln"): tensors are [B, H, W, C]; norms are ``nn.LayerNorm``, linears ``nn.Linear``.

Both layouts hold exactly the same parameters under the same names and shapes as the official
VMamba code, so one state_dict loads into either and gives the same outputs.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# The official VMamba norms all use the PyTorch default epsilon.
NORM_EPS = 1e-5


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of a [B, C, H, W] tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises over C.

        Args:
            x: [B, C, H, W].

        Returns:
            [B, C, H, W].
        """
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A per-pixel linear map on [B, C, H, W] tensors, stored with ``nn.Linear``'s weight shape.

    The weight stays (out, in) so that checkpoints of the channel-last model load unchanged;
    checkpoints that stored it as a (out, in, 1, 1) convolution kernel are reshaped on load.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the linear map to every pixel.

        Args:
            x: [B, in_features, H, W].

        Returns:
            [B, out_features, H, W].
        """
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is not None and weight.dim() == 4 and weight.shape[2:] == (1, 1):
            state_dict[key] = weight.reshape(weight.shape[0], weight.shape[1])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class Permute(nn.Module):
    """Permutes tensor dimensions; used to switch between NCHW and NHWC inside a Sequential."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def layer_norm_float32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Applies ``norm`` (``nn.LayerNorm`` or ``LayerNorm2d``) in float32, whatever the dtypes.

    The selective scan returns float32 and its output must be normalised in float32 even when the
    model was converted with ``.to(torch.bfloat16)`` / ``.half()``: the norm's weight and bias
    are upcast for this call (the module keeps its own dtype). With float32 input and parameters
    this computes exactly what ``norm(x)`` computes.

    Args:
        norm: the LayerNorm module; its layout (channel-first for ``LayerNorm2d``) is respected.
        x: [B, C, H, W] for ``LayerNorm2d``, [..., C] for ``nn.LayerNorm``, any floating dtype.

    Returns:
        The normalised tensor, same shape as ``x``, float32.
    """
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    x = x.float()
    if isinstance(norm, LayerNorm2d):
        x = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, weight, bias, norm.eps)
        return x.permute(0, 3, 1, 2)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def make_norm(dim: int, channel_first: bool) -> nn.LayerNorm:
    """Returns the LayerNorm for the chosen layout (``LayerNorm2d`` or ``nn.LayerNorm``)."""
    return LayerNorm2d(dim, eps=NORM_EPS) if channel_first else nn.LayerNorm(dim, eps=NORM_EPS)


def make_linear(in_features: int, out_features: int, bias: bool, channel_first: bool) -> nn.Linear:
    """Returns the linear layer for the chosen layout (``Linear2d`` or ``nn.Linear``)."""
    cls = Linear2d if channel_first else nn.Linear
    return cls(in_features, out_features, bias=bias)


def _to_channel_last(channel_first: bool) -> nn.Module:
    # The official Sequentials keep an Identity where the other layout needs a Permute, so
    # that parameter indices (patch_embed.2, downsample.3, ...) are the same in both layouts.
    return nn.Identity() if channel_first else Permute(0, 2, 3, 1)


def _to_channel_first(channel_first: bool) -> nn.Module:
    return nn.Identity() if channel_first else Permute(0, 3, 1, 2)


class Mlp(nn.Module):
    """The feed-forward half of a VSSBlock: fc1 -> GELU -> fc2 (keys ``fc1``, ``fc2``).

    Args:
        dim: input and output channels C.
        hidden_dim: hidden channels (``int(C * mlp_ratio)``).
        channel_first: layout of the input ([B, C, H, W] if True, else [B, H, W, C]).
    """

    def __init__(self, dim: int, hidden_dim: int, channel_first: bool) -> None:
        super().__init__()
        self.fc1 = make_linear(dim, hidden_dim, bias=True, channel_first=channel_first)
        self.act = nn.GELU()
        self.fc2 = make_linear(hidden_dim, dim, bias=True, channel_first=channel_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x in the block layout with C channels. Returns: the same shape."""
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: zeroes the residual branch of whole samples with probability ``drop_prob``.

    Kept samples are scaled by 1 / (1 - drop_prob) so the expectation is unchanged.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}.")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, ...]. Returns: x, with some samples zeroed in training mode."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def build_patch_embed(kind: str, in_channels: int, dim: int, channel_first: bool) -> nn.Sequential:
    """Builds the stride-4 stem.

    Args:
        kind: "conv4" (vanilla models: one 4x4 stride-4 conv, keys ``0``, ``2``) or "two-conv"
            (v2 models: two 3x3 stride-2 convs with a norm and GELU between, keys ``0, 2, 5, 7``).
        in_channels: image channels.
        dim: output channels C0.
        channel_first: output layout.

    Returns:
        A Sequential mapping [B, in_channels, H, W] to C0 channels at stride 4 in the chosen layout
        (spatial ceil(H/4) x ceil(W/4) for "two-conv", floor for "conv4").
    """
    if kind == "conv4":
        return nn.Sequential(
            nn.Conv2d(in_channels, dim, kernel_size=4, stride=4, bias=True),
            _to_channel_last(channel_first),
            make_norm(dim, channel_first),
        )
    if kind == "two-conv":
        half = dim // 2
        return nn.Sequential(
            nn.Conv2d(in_channels, half, kernel_size=3, stride=2, padding=1, bias=True),
            _to_channel_last(channel_first),
            make_norm(half, channel_first),
            _to_channel_first(channel_first),
            nn.GELU(),
            nn.Conv2d(half, dim, kernel_size=3, stride=2, padding=1, bias=True),
            _to_channel_last(channel_first),
            make_norm(dim, channel_first),
        )
    raise ValueError(f"patch_embed {kind!r} is not one of 'conv4', 'two-conv'.")


class PatchMerging2D(nn.Module):
    """The vanilla downsample: 2x2 neighbourhoods concatenated, normed, and reduced to ``out_dim``.

    Odd heights/widths are zero-padded at the bottom/right first, so the output is ceil(H/2) x
    ceil(W/2). The concatenation order is (even row, even col), (odd, even), (even, odd),
    (odd, odd), as in the official checkpoints. Keys ``norm`` (4C) and ``reduction`` (2C x 4C).

    Args:
        dim: input channels C.
        out_dim: output channels.
        channel_first: layout of input and output.
    """

    def __init__(self, dim: int, out_dim: int, channel_first: bool) -> None:
        super().__init__()
        self.channel_first = channel_first
        self.norm = make_norm(4 * dim, channel_first)
        self.reduction = make_linear(4 * dim, out_dim, bias=False, channel_first=channel_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merges 2x2 neighbourhoods.

        Args:
            x: [B, C, H, W] or [B, H, W, C].

        Returns:
            out_dim channels at ceil(H/2) x ceil(W/2), same layout.
        """
        if self.channel_first:
            height, width = x.shape[2], x.shape[3]
            if height % 2 or width % 2:
                x = F.pad(x, (0, width % 2, 0, height % 2))
            parts = [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2],
                     x[:, :, 1::2, 1::2]]
            x = torch.cat(parts, dim=1)
        else:
            height, width = x.shape[1], x.shape[2]
            if height % 2 or width % 2:
                x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
            parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
            x = torch.cat(parts, dim=-1)
        return self.reduction(self.norm(x))


def build_downsample(kind: str, dim: int, out_dim: int, channel_first: bool) -> nn.Module:
    """Builds the stride-2 downsample that ends a stage.

    Args:
        kind: "merge" (vanilla ``PatchMerging2D``) or "conv3" (v2 models: 3x3 stride-2 conv then a
            norm; keys ``1``, ``3``).
        dim: input channels C.
        out_dim: output channels (2C in all released models).
        channel_first: layout of input and output.

    Returns:
        A module mapping C channels at H x W to out_dim channels at ceil(H/2) x ceil(W/2).
    """
    if kind == "merge":
        return PatchMerging2D(dim, out_dim, channel_first)
    if kind == "conv3":
        return nn.Sequential(OrderedDict([
            ("0", _to_channel_first(channel_first)),
            ("1", nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=True)),
            ("2", _to_channel_last(channel_first)),
            ("3", make_norm(out_dim, channel_first)),
        ]))
    raise ValueError(f"downsample {kind!r} is not one of 'merge', 'conv3'.")
