"""The CIFAR variant of ResNet-18 and a name -> factory registry (config.MODELS)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchinfo
from torch import Tensor, nn

from cifarexp.config import did_you_mean


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    # The no-BN variant drops BatchNorm and changes nothing else: Identity keeps the structure.
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = _norm(out_ch, batch_norm)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = _norm(out_ch, batch_norm)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                _norm(out_ch, batch_norm),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """Stem conv3x3 (no max-pool), four stages of two BasicBlocks, global pool, Linear(512, 10)."""

    def __init__(self, num_classes: int = 10, batch_norm: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = _norm(64, batch_norm)
        self.relu = nn.ReLU(inplace=True)
        stages, in_ch = [], 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(in_ch, out_ch, stride, batch_norm),
                    BasicBlock(out_ch, out_ch, 1, batch_norm),
                )
            )
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet18": ResNet18}


def build_model(name: str = "resnet18", *, batch_norm: bool = True) -> nn.Module:
    """Build a registered model; unknown names fail listing the known ones."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}{did_you_mean(name, MODELS)}; known: {', '.join(MODELS)}"
        ) from None
    return factory(batch_norm=batch_norm)


def summary(model: nn.Module, batch_size: int, device: torch.device) -> str:
    """torchinfo's summary of `model` for a batch of `batch_size` CIFAR images."""
    return str(
        torchinfo.summary(model, input_size=(batch_size, 3, 32, 32), device=device, verbose=0)
    )
