"""One constructor for every residual row of the family table (DenseNets: `builder.densenet`),
stochastic depth, and seeded initialization in one place."""

from __future__ import annotations

import math

import torch
from torch import nn

from builder.architectures import ArchSpec, Layout
from builder.blocks import (
    RESIDUAL_BLOCKS,
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    ZeroPadShortcut,
    conv1x1,
)
from builder.densenet import DenseNet
from builder.options import ModelOptions
from builder.registry import REGISTRY


def drop_probabilities(blocks: int, survival_last: float | None) -> list[float]:
    """Stochastic depth's linear decay: block l of L survives with p_l = 1 − (l/L)(1 − p_L)."""
    if survival_last is None:
        return [0.0] * blocks
    if not 0.0 < survival_last <= 1.0:
        raise ValueError(f"stochastic depth p_L must be in (0, 1], got {survival_last}")
    return [(index / blocks) * (1.0 - survival_last) for index in range(1, blocks + 1)]


class ResNet(nn.Module):
    """A ResNet built from one :class:`ArchSpec` row; stages are ``layer1``…``layerN``.

    Pre-activation rows have no BN-ReLU in the stem (each block starts with one) and a final
    ``bn`` + ReLU before pooling.
    """

    def __init__(
        self,
        spec: ArchSpec,
        num_classes: int,
        layout: Layout = Layout.TORCHVISION,
        stochastic_depth: float | None = None,
    ) -> None:
        super().__init__()
        if not spec.residual:
            raise ValueError(f"{spec.name} is not a residual net")
        if spec.block == "basic" and (spec.groups != 1 or spec.width_per_group != 64):
            raise ValueError(f"{spec.name}: basic blocks support only groups=1, width_per_group=64")
        if spec.preact and spec.shortcut != "projection":
            raise ValueError(f"{spec.name}: pre-activation nets use projection shortcuts")
        self.spec = spec
        self.layout = layout
        self.inplanes = spec.widths[0]
        self._drops = iter(drop_probabilities(sum(spec.layers), stochastic_depth))
        if spec.stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1: nn.Module = nn.Identity() if spec.preact else nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            if spec.stem == "imagenet"
            else nn.Identity()
        )
        for index, (planes, blocks) in enumerate(zip(spec.widths, spec.layers, strict=True)):
            stride = 1 if index == 0 else 2
            self.add_module(f"layer{index + 1}", self._make_stage(planes, blocks, stride))
        self.bn: nn.Module = nn.BatchNorm2d(spec.num_features) if spec.preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(spec.num_features, num_classes)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        spec = self.spec
        out_planes = planes * spec.expansion
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != out_planes:
            if spec.preact:
                downsample = nn.Sequential(conv1x1(self.inplanes, out_planes, stride))
            elif spec.shortcut == "projection":
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes)
                )
            else:
                downsample = ZeroPadShortcut(stride, out_planes - self.inplanes)
        layers = [self._block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers += [self._block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _block(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> nn.Module:
        drop_path = next(self._drops)
        if self.spec.block == "basic":
            basic = PreActBasicBlock if self.spec.preact else BasicBlock
            return basic(inplanes, planes, stride, downsample, drop_path=drop_path)
        bottleneck = PreActBottleneck if self.spec.preact else Bottleneck
        return bottleneck(
            inplanes,
            planes,
            stride,
            downsample,
            groups=self.spec.groups,
            base_width=self.spec.width_per_group,
            stride_in_1x1=self.layout is Layout.ORIGINAL,
            drop_path=drop_path,
        )

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.spec.layers))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        if self.spec.preact:
            x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


TorchNet = ResNet | DenseNet  # the PyTorch network of any row of the table


def initialize(model: nn.Module, seed: int, zero_init_last: bool = False) -> None:
    """Kaiming normal (fan_out) convolutions, BN weight 1 / bias 0, torch's default Linear init.

    Every random draw comes from one generator seeded with ``seed``, in module order.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        if zero_init_last:
            for module in model.modules():
                if isinstance(module, RESIDUAL_BLOCKS):
                    module.zero_init_last()


def create_model(name: str, options: ModelOptions | None = None) -> TorchNet:
    """The seeded, initialized model for a registered architecture, in eval mode."""
    options = options or ModelOptions()
    spec = REGISTRY.get(name)
    num_classes = spec.default_num_classes if options.num_classes is None else options.num_classes
    if not spec.residual and (options.zero_init_last or options.stochastic_depth is not None):
        raise ValueError(f"{name} has no residual blocks: no zero_init_last, no stochastic depth")
    # Parameters are allocated on the meta device and materialized once, by initialize().
    with torch.device("meta"):
        model: TorchNet = (
            ResNet(spec, num_classes, options.layout, options.stochastic_depth)
            if spec.residual
            else DenseNet(spec, num_classes)
        )
    model.to_empty(device="cpu")
    initialize(model, options.seed, options.zero_init_last)
    return model.eval()
