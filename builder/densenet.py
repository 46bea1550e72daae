"""DenseNet-BC (Huang et al. 2017) with torchvision's module and parameter names.

``features.conv0``, ``features.norm0``, ``features.denseblock{i}.denselayer{j}.norm1/conv1/
norm2/conv2``, ``features.transition{i}.norm/conv``, ``features.norm5`` and ``classifier``
are a public API: a torchvision checkpoint loads with ``strict=True``. Only the parameterless
modules (ReLU, pooling) are kept too, so the printed structure reads like torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn

from builder.architectures import ArchSpec

BN_SIZE = 4  # bottleneck width: bn_size × growth_rate channels before each 3×3


class DenseLayer(nn.Module):
    """BN-ReLU-conv1×1 (bottleneck) then BN-ReLU-conv3×3 giving ``growth_rate`` new channels."""

    def __init__(self, in_features: int, growth_rate: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(
            in_features, BN_SIZE * growth_rate, kernel_size=1, stride=1, bias=False
        )
        self.norm2 = nn.BatchNorm2d(BN_SIZE * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            BN_SIZE * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(features)))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.ModuleDict):
    """``denselayer1``…: each layer sees the concatenation of the input and all earlier
    layers' outputs; the block returns that whole concatenation."""

    def __init__(self, layers: int, in_features: int, growth_rate: int) -> None:
        super().__init__()
        for index in range(layers):
            layer = DenseLayer(in_features + index * growth_rate, growth_rate)
            self.add_module(f"denselayer{index + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1×1 halving the channels, then 2×2 average pooling."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """A DenseNet from one "dense" :class:`ArchSpec` row (ImageNet stem, compression 0.5)."""

    def __init__(self, spec: ArchSpec, num_classes: int) -> None:
        super().__init__()
        if spec.block != "dense":
            raise ValueError(f"{spec.name} is not a DenseNet row")
        self.spec = spec
        width = spec.init_features
        self.features = nn.Sequential()
        self.features.add_module(
            "conv0", nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        )
        self.features.add_module("norm0", nn.BatchNorm2d(width))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        for index, layers in enumerate(spec.layers):
            block = DenseBlock(layers, width, spec.growth_rate)
            self.features.add_module(f"denseblock{index + 1}", block)
            width += layers * spec.growth_rate
            if index < len(spec.layers) - 1:
                self.features.add_module(f"transition{index + 1}", Transition(width, width // 2))
                width //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(width))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.features(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))
