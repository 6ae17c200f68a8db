"""Classical PyTorch models: an MLP, DLG's LeNet, a small ConvNet and CIFAR-style ResNets.

Every model is registered in `fedsim.core.registry.MODELS` and built as
`Model(params, input_shape, num_classes)`: `input_shape` is one example's shape as the
dataset gives it, (C, H, W) for images or (F,) for feature vectors, with values in [0, 1];
the forward pass returns logits of shape (batch, num_classes). Nothing here draws random
numbers except through torch's global generator, so `torch.manual_seed` fixes every weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedsim.core.errors import UserError
from fedsim.core.registry import MODELS

Activation = Literal["relu", "sigmoid", "tanh"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}

NormFactory = Callable[[int], nn.Module]


def norm_factory(kind: Literal["none", "batch", "group"], groups: int) -> NormFactory:
    """A `channels -> normalisation layer` function shared by the conv models.

    GroupNorm uses gcd(groups, channels) groups, i.e. at most `groups` and always a divisor
    of the channel count, so any width is valid. GroupNorm (unlike BatchNorm) keeps no
    statistics across examples, which DP-SGD (Opacus) requires.
    """
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels: nn.GroupNorm(math.gcd(groups, channels), channels)
    return lambda channels: nn.Identity()


def image_channels(input_shape: Sequence[int], model: str) -> int:
    """Channel count of a (C, H, W) input; conv models cannot take flat feature vectors."""
    if len(input_shape) != 3:
        raise UserError(
            f"model '{model}' needs image input (C, H, W), got shape {tuple(input_shape)}; "
            "use model 'mlp' for feature vectors"
        )
    return input_shape[0]


@MODELS.register("mlp")
class MLP(nn.Module):
    """Fully connected network on the flattened input (any input shape)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        hidden: list[Annotated[int, Field(ge=1)]] = Field(
            default_factory=lambda: [128, 64], description="hidden layer widths, in order"
        )
        activation: Activation = Field("relu", description="activation after each hidden layer")

    def __init__(self, params: Params, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = math.prod(input_shape)
        for width in params.hidden:
            layers += [nn.Linear(in_features, width), ACTIVATIONS[params.activation]()]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@MODELS.register("lenet")
class LeNet(nn.Module):
    """LeNet of Zhu et al. 2019, "Deep Leakage from Gradients" (DLG), the usual inversion target.

    As in the DLG code: three 5x5 convolutions with 12 channels, padding 2 and strides
    2, 2, 1, each followed by the activation (sigmoid: smooth and twice differentiable, which
    the gradient-matching attack needs), no pooling, then one linear layer. DLG initialises
    every weight and bias uniformly in [-0.5, 0.5]; that large init is part of why the attack
    succeeds, so it is the default.
    """

    STRIDES = (2, 2, 1)
    CHANNELS = 12

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        activation: Literal["sigmoid", "relu"] = Field(
            "sigmoid", description="activation after each convolution (DLG: sigmoid)"
        )
        init: Literal["uniform", "default"] = Field(
            "uniform",
            description="uniform: all weights and biases ~ U(-0.5, 0.5) as in DLG; default: torch's",
        )

    def __init__(self, params: Params, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        channels = image_channels(input_shape, "lenet")
        height, width = input_shape[1:]
        layers: list[nn.Module] = []
        for stride in self.STRIDES:
            layers += [
                nn.Conv2d(channels, self.CHANNELS, kernel_size=5, padding=2, stride=stride),
                ACTIVATIONS[params.activation](),
            ]
            channels = self.CHANNELS
            # A 5x5 kernel with padding 2 maps size n to ceil(n / stride).
            height, width = (height - 1) // stride + 1, (width - 1) // stride + 1
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(channels * height * width, num_classes)
        if params.init == "uniform":
            for parameter in self.parameters():
                nn.init.uniform_(parameter, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def conv_block(in_channels: int, out_channels: int, norm: NormFactory) -> list[nn.Module]:
    """3x3 convolution (size-preserving), normalisation, ReLU."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), norm(out_channels), nn.ReLU()]


@MODELS.register("convnet")
class ConvNet(nn.Module):
    """Small ConvNet (conv-conv-maxpool-conv, then a linear layer) for 8x8 up to 32x32 images.

    One 2x2 max-pool keeps 8x8 digits at a useful 4x4; an adaptive average pool to 4x4 then
    gives the classifier the same size for any input resolution.
    """

    POOLED_SIDE = 4

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        width: int = Field(32, ge=1, description="channels of the first conv layer (later: 2x)")
        norm: Literal["none", "group"] = Field(
            "none", description="normalisation after each conv (group keeps it DP-SGD compatible)"
        )
        groups: int = Field(8, ge=1, description="GroupNorm groups (reduced to divide the channels)")

    def __init__(self, params: Params, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        channels = image_channels(input_shape, "convnet")
        norm = norm_factory(params.norm, params.groups)
        width = params.width
        self.body = nn.Sequential(
            *conv_block(channels, width, norm),
            *conv_block(width, 2 * width, norm),
            nn.MaxPool2d(2),
            *conv_block(2 * width, 2 * width, norm),
            nn.AdaptiveAvgPool2d(self.POOLED_SIDE),
        )
        self.fc = nn.Linear(2 * width * self.POOLED_SIDE**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs plus a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, stages of BasicBlocks, global average pool.

    Each stage after the first halves the resolution; the global pool makes any input size
    (8x8 digits included) valid.
    """

    def __init__(
        self,
        stage_blocks: Sequence[int],
        widths: Sequence[int],
        norm: NormFactory,
        input_shape: Sequence[int],
        num_classes: int,
        name: str,
    ) -> None:
        super().__init__()
        channels = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(image_channels(input_shape, name), channels, 3, padding=1, bias=False),
            norm(channels),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        for stage, (count, width) in enumerate(zip(stage_blocks, widths)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, norm))
                channels = width
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class ResNetParams(BaseModel):
    """Normalisation choice shared by both ResNets."""

    model_config = ConfigDict(extra="forbid")

    norm: Literal["batch", "group"] = Field(
        "batch", description="batch: standard; group: no batch statistics, needed for DP-SGD"
    )
    groups: int = Field(8, ge=1, description="GroupNorm groups (reduced to divide the channels)")


@MODELS.register("resnet18")
class ResNet18(CifarResNet):
    """ResNet-18 for small images (He et al. 2016; BasicBlocks [2, 2, 2, 2], widths 64-512)."""

    Params = ResNetParams

    def __init__(self, params: Params, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__(
            stage_blocks=(2, 2, 2, 2),
            widths=(64, 128, 256, 512),
            norm=norm_factory(params.norm, params.groups),
            input_shape=input_shape,
            num_classes=num_classes,
            name="resnet18",
        )


@MODELS.register("resnet20")
class ResNet20(CifarResNet):
    """ResNet-20 of He et al. 2016 for CIFAR (BasicBlocks [3, 3, 3], widths 16, 32, 64)."""

    class Params(ResNetParams):
        width: int = Field(1, ge=1, description="multiplier on the widths 16, 32, 64")

    def __init__(self, params: Params, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__(
            stage_blocks=(3, 3, 3),
            widths=tuple(params.width * w for w in (16, 32, 64)),
            norm=norm_factory(params.norm, params.groups),
            input_shape=input_shape,
            num_classes=num_classes,
            name="resnet20",
        )
