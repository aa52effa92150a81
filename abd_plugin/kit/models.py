"""Model zoo: small classifiers (return plain logits) and data-free KD generators.

Classifiers take ``num_classes`` and ``in_channels`` and contain no input normalisation: they
are fed whatever :func:`abd_plugin.kit.datasets.to_model_input` gives for their dataset ([0, 1]
images, or normalised images for ``tinted32``), applied outside the model.

Generators take ``img_size`` (divisible by 4), ``channels`` and ``z_dim``, expose ``.z_dim``
and map ``z`` of shape (B, z_dim) to images (B, channels, img_size, img_size). By default
their output is a **sigmoid, i.e. images in [0, 1]** like the datasets and triggers of the
kit. ``out="bn"`` gives ZSKT/DFAD's original affine-free BatchNorm output (normalised-space
images), ``out="tanh"`` gives [-1, 1].

All weights are initialised from torch's global RNG only, so ``torch.manual_seed`` makes
construction deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registry

__all__ = ["get_model", "list_models", "LeNet5", "CNN5", "PlainCNN", "WideResNet", "ResNet",
           "ConvGenerator"]

_MODELS: Registry[nn.Module] = Registry("model", "abd_plugin.kit.models.list_models()")


# ---------------------------------------------------------------------------------------
# Classifiers
# ---------------------------------------------------------------------------------------
class LeNet5(nn.Module):
    """LeNet-5 with ReLU: conv c1@5x5 - maxpool - conv c2@5x5 - maxpool - conv c3@5x5 - fc f - fc C
    (``batch_norm=True``: a BatchNorm after every conv, the kit's ``lenet5_bn``).

    Exact at 32x32 input (conv3 output 1x1). Larger inputs are average-pooled to 1x1 after conv3.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (6, 16, 120, 84),
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3, f = widths

        def conv(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_channels, c1), nn.MaxPool2d(2), *conv(c1, c2), nn.MaxPool2d(2), *conv(c2, c3),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c3, f), nn.ReLU(inplace=True), nn.Linear(f, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(h)


class CNN5(nn.Module):
    """Five 3x3 conv-BN-ReLU layers (widths w, w, 2w, 2w, 4w; max-pool after the 2nd and 4th),
    global average pooling, linear head. Any input size >= 8."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        widths = [width, width, 2 * width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(widths):
            layers += [
                nn.Conv2d(prev, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
            prev = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class PlainCNN(nn.Module):
    """A plain CNN, no residual connections and no BatchNorm: three [conv3x3 - ReLU - max-pool 2]
    stages (widths ``widths``), flatten, Linear(hidden) - ReLU - Linear(C). The kit's student of
    ``resnet8`` (``cnn3``). Input side divisible by 8 (32x32 -> 4x4 before the head)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 32), hidden: int = 64, size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for w in widths:
            layers += [nn.Conv2d(prev, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev = w
        self.features = nn.Sequential(*layers)
        side = size // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(prev * side * side, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-(dropout)-conv3x3, 1x1 shortcut on
    shape change."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # the projection shortcut reads the pre-activated input, as in Zagoruyko & Komodakis
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR: 3x3 stem (16), three groups of (depth-4)/6 blocks with widths
    16k, 32k, 64k and strides 1, 2, 2, then BN-ReLU, global average pooling, linear."""

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                _WideBlock(
                    widths[g] if i == 0 else widths[g + 1],
                    widths[g + 1],
                    stride if i == 0 else 1,
                    dropout,
                )
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _BasicBlock(nn.Module):
    """Post-activation ResNet block: conv-BN-ReLU-conv-BN + shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 conv-BN-ReLU stem (``widths[0]`` channels, stride 1, no
    max-pool), one stage of ``blocks[i]`` basic blocks per width (strides 1, 2, 2, ...), average
    pooling to ``head_pool`` x ``head_pool`` (1: global average pooling), flatten, linear.
    Default widths (64, 128, 256, 512): ResNet-18/34 with ``blocks=(2, 2, 2, 2)`` /
    ``(3, 4, 6, 3)``; ``resnet8`` is widths (16, 32, 64), one block each, ``head_pool=4``.
    Stages are ``layer1``, ``layer2``, ..."""

    def __init__(self, blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512), head_pool: int = 1) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"ResNet needs one block count per width, got {blocks} / {widths}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        self.stages: list[str] = []
        for s, (planes, count) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for i in range(count):
                stride = (1 if s == 0 else 2) if i == 0 else 1
                layers.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
            self.stages.append(f"layer{s + 1}")
            self.add_module(self.stages[-1], nn.Sequential(*layers))
        self.head_pool = head_pool
        self.fc = nn.Linear(in_planes * head_pool * head_pool, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for name in self.stages:
            out = getattr(self, name)(out)
        return self.fc(F.adaptive_avg_pool2d(out, self.head_pool).flatten(1))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out), unit BN, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------
class ConvGenerator(nn.Module):
    """z -> Linear(z_dim, c1 * (S/4)^2) -> BN -> [x2 upsample -> conv3x3 -> BN -> LeakyReLU(0.2)]
    x 2 -> conv3x3 -> output head.

    Args:
        z_dim: latent size; kept as ``.z_dim``.
        img_size: output side S (divisible by 4).
        channels: output channels.
        widths: channels (c1, c2, c3): after the linear layer, after the 1st and 2nd up-block.
        conv_bias: bias in the two up-block convs.
        pre_act: ``"tanh"`` applies tanh before the ``"bn"`` head (DFAD); unused by the other heads.
        out: ``"sigmoid"`` ([0, 1], default), ``"bn"`` (affine-free BatchNorm, ZSKT/DFAD) or
            ``"tanh"``.
    """

    def __init__(
        self,
        z_dim: int,
        img_size: int = 32,
        channels: int = 3,
        widths: Sequence[int] = (128, 128, 64),
        conv_bias: bool = True,
        pre_act: str | None = None,
        out: str = "sigmoid",
    ) -> None:
        super().__init__()
        if img_size % 4 != 0:
            raise ValueError(f"generator img_size must be divisible by 4, got {img_size}")
        if out not in ("sigmoid", "bn", "tanh"):
            raise ValueError(f"generator out must be 'sigmoid', 'bn' or 'tanh', got {out!r}")
        c1, c2, c3 = widths
        self.z_dim, self.img_size, self.channels, self.out_kind = z_dim, img_size, channels, out
        self.init_size = img_size // 4
        self.fc = nn.Linear(z_dim, c1 * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(c1)
        self.blocks = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(c1, c2, 3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(c2), nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2), nn.Conv2d(c2, c3, 3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(c3), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(c3, channels, 3, padding=1),
        )
        self.pre_act = pre_act
        self.out_bn = nn.BatchNorm2d(channels, affine=False) if out == "bn" else None

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z.flatten(1)).view(z.shape[0], -1, self.init_size, self.init_size)
        img = self.blocks(self.bn0(h))
        if self.out_kind == "sigmoid":
            return torch.sigmoid(img)
        if self.out_kind == "tanh":
            return torch.tanh(img)
        if self.pre_act == "tanh":
            img = torch.tanh(img)
        return self.out_bn(img)  # type: ignore[misc]

    def sample_z(
        self, n: int, *, device: Any = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Standard-normal latents of shape (n, z_dim)."""
        return torch.randn(n, self.z_dim, device=device, generator=generator)


# ---------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------
@_MODELS.register("lenet5")
def _lenet5(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return LeNet5(num_classes, in_channels, (6, 16, 120, 84))


@_MODELS.register("lenet5_half")
def _lenet5_half(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return LeNet5(num_classes, in_channels, (3, 8, 60, 42))


@_MODELS.register("lenet5_bn")
def _lenet5_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """LeNet-5 with a BatchNorm after each conv: the benchmark's BatchNorm teacher (the kit's
    ZSKT/DFAD loops cannot distill cnn5 or WRN teachers on mnist5k in 400 iterations: those map
    the generator's first, grey samples to one class with certainty and the loop stalls)."""
    return LeNet5(num_classes, in_channels, (6, 16, 120, 84), batch_norm=True)


@_MODELS.register("cnn5")
def _cnn5(num_classes: int = 10, in_channels: int = 3, width: int = 32) -> nn.Module:
    return CNN5(num_classes, in_channels, width)


@_MODELS.register("wrn16_1")
def _wrn16_1(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 1, num_classes, in_channels, dropout)


@_MODELS.register("wrn16_2")
def _wrn16_2(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 2, num_classes, in_channels, dropout)


@_MODELS.register("wrn40_2")
def _wrn40_2(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(40, 2, num_classes, in_channels, dropout)


@_MODELS.register("resnet18")
def _resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


@_MODELS.register("resnet8")
def _resnet8(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-8 (He et al.'s CIFAR family with n = 1): conv-BN-ReLU stem (16), three stages of
    one basic block each at widths 16, 32, 64 (strides 1, 2, 2), then the 8x8 map average-pooled
    to 4x4 and flattened into the linear head (about 88 k parameters). The kit's BatchNorm /
    residual teacher of ``tinted32``.

    Not global average pooling, on purpose: with GAP the kit's 400-iteration ZSKT loop stalled
    on tinted32 (the teacher put the generator's samples in two or three classes; student
    10-17 % ACC after 150 iterations, also with label smoothing, noise or shift augmentation in
    the teacher's training), as it does for the GAP networks cnn5/WRN on mnist5k; with the 4x4
    head (2x2: stalled too) the student reached 58 % after 100 iterations (one seed each)."""
    return ResNet((1, 1, 1), num_classes, in_channels, widths=(16, 32, 64), head_pool=4)


@_MODELS.register("cnn3")
def _cnn3(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """:class:`PlainCNN` (16, 32, 32 channels, hidden 64; about 47 k parameters, no BatchNorm,
    no residual connections): the student of ``resnet8``, for 32x32 inputs."""
    return PlainCNN(num_classes, in_channels, (16, 32, 32), 64)


@_MODELS.register("resnet34")
def _resnet34(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet((3, 4, 6, 3), num_classes, in_channels)


def _generator_channels(in_channels: int, channels: int | None) -> int:
    return channels if channels is not None else in_channels


@_MODELS.register("generator_zskt")
def _generator_zskt(
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    z_dim: int = 100,
    img_size: int = 32,
    channels: int | None = None,
    ngf: int = 64,
    out: str = "sigmoid",
) -> nn.Module:
    """ZSKT generator (2ngf-2ngf-ngf channels, 128-128-64 by default); ZSKT itself ends with
    ``out="bn"``."""
    return ConvGenerator(
        z_dim,
        img_size,
        _generator_channels(in_channels, channels),
        (2 * ngf, 2 * ngf, ngf),
        out=out,
    )


@_MODELS.register("generator_dfad")
def _generator_dfad(
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    z_dim: int = 256,
    img_size: int = 32,
    channels: int | None = None,
    ngf: int = 64,
    out: str = "sigmoid",
) -> nn.Module:
    """DFAD generator (2ngf-2ngf-ngf channels); ``out="bn"`` is DFAD's own tanh + affine-free BN
    head."""
    return ConvGenerator(
        z_dim,
        img_size,
        _generator_channels(in_channels, channels),
        (2 * ngf, 2 * ngf, ngf),
        pre_act="tanh",
        out=out,
    )


@_MODELS.register("generator_cmi")
def _generator_cmi(
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    z_dim: int = 256,
    img_size: int = 32,
    channels: int | None = None,
    ngf: int = 64,
    out: str = "sigmoid",
) -> nn.Module:
    """CMI generator (nz=256, ngf=64: 2ngf-2ngf-ngf channels, bias-free convs, sigmoid output)."""
    return ConvGenerator(
        z_dim,
        img_size,
        _generator_channels(in_channels, channels),
        (2 * ngf, 2 * ngf, ngf),
        conv_bias=False,
        out=out,
    )


def get_model(name: str, *, num_classes: int = 10, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build the model registered as ``name``.

    Args:
        name: one of :func:`list_models`.
        num_classes: classifier outputs (ignored by generators).
        in_channels: classifier input channels; for generators the default output ``channels``.
        **kw: model-specific (``width`` for cnn5, ``dropout`` for WRNs; ``z_dim``, ``img_size``,
            ``channels``, ``ngf``, ``out`` for generators).
    """
    return _MODELS.get(name, num_classes=num_classes, in_channels=in_channels, **kw)


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`, sorted."""
    return _MODELS.names()
