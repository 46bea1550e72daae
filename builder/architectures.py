"""The family as rows of one table, with the reference figures each row is checked against.

Pure data: no torch here, so the torch-less runtime can read it.

References:

- parameters: torchvision's published counts for the ImageNet ResNets and DenseNets; for the
  CIFAR nets the papers' rounded counts (He et al. 2016, "Deep Residual Learning", table 6:
  0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M; He et al. 2016, "Identity Mappings", table 3:
  1.7M for pre-activation ResNet-164, 10.2M for ResNet-1001). No published figure for the
  ImageNet pre-activation nets of this layout (their count is pinned by the tests instead).
- multiply-adds per image: the ResNet paper's table 1 for the original layout (stride on the
  first 1×1); torchvision's published GFLOPS for its layout (stride on the 3×3) and for the
  DenseNets; the ResNeXt paper's 4.2 G for resnext50_32x4d, whose stride is on the 3×3 as in
  torchvision (no published figure for it, nor for the wide and 101-layer ResNeXt, with the
  stride moved); for the CIFAR nets the figures usually quoted for them (e.g. 41M for
  resnet20). A pre-activation net has the convolutions of its v1 namesake (only BatchNorm and
  ReLU move), so it is held to the same figures; the CIFAR pre-activation nets have no
  published figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Layout(StrEnum):
    """Where a bottleneck block puts its stride."""

    TORCHVISION = "torchvision"  # on the 3×3 convolution (ResNet v1.5)
    ORIGINAL = "original"  # on the first 1×1 convolution, as in the paper


class Dataset(StrEnum):
    IMAGENET = "imagenet"
    CIFAR10 = "cifar10"


@dataclass(frozen=True)
class ArchSpec:
    """One row of the family table.

    ``stem`` "imagenet" is the 7×7/2 convolution plus 3×3/2 max-pool of width 64; "cifar" is a
    3×3/1 convolution of width 16. ``shortcut`` "projection" uses a 1×1 convolution + BN
    (``downsample.0``/``downsample.1``; the convolution alone in a pre-activation net) where
    the shape changes; "zero_pad" subsamples and pads channels with zeros (the paper's option
    A, parameter-free). ``preact`` makes it a pre-activation (v2) net: BN-ReLU before each
    convolution, nothing after the addition, one BN-ReLU before pooling.

    A "dense" row is a DenseNet: ``layers`` are the dense layers per block, ``growth_rate``
    the channels each layer adds, ``init_features`` the stem's width.
    """

    name: str
    block: Literal["basic", "bottleneck", "dense"]
    layers: tuple[int, ...]
    stem: Literal["imagenet", "cifar"] = "imagenet"
    shortcut: Literal["projection", "zero_pad"] = "projection"
    groups: int = 1
    width_per_group: int = 64
    preact: bool = False
    growth_rate: int = 0
    init_features: int = 64
    dataset: Dataset = Dataset.IMAGENET
    reference_params: int | None = None  # None: no published figure
    reference_params_tolerance: int = 0
    reference_macs: tuple[tuple[Layout, float], ...] = ()
    # ONNX Runtime vs PyTorch limit (error / largest logit) where the default 1e-3 is too
    # tight for the depth: a pre-activation trunk adds up hundreds of unnormalized branches
    max_rel_error: float | None = None

    @property
    def widths(self) -> tuple[int, ...]:
        """Stage widths (``planes``) before the block expansion."""
        base = 64 if self.stem == "imagenet" else 16
        return tuple(base * 2**i for i in range(len(self.layers)))

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def residual(self) -> bool:
        """Whether the net is made of residual blocks (all rows but the DenseNets)."""
        return self.block != "dense"

    @property
    def num_features(self) -> int:
        """Width of the pooled features feeding the head."""
        if self.block == "dense":
            width = self.init_features
            for index, layers in enumerate(self.layers):
                width += layers * self.growth_rate
                if index < len(self.layers) - 1:
                    width //= 2  # each transition halves the channels
            return width
        return self.widths[-1] * self.expansion

    @property
    def default_num_classes(self) -> int:
        return 1000 if self.dataset is Dataset.IMAGENET else 10

    @property
    def input_size(self) -> int:
        return 224 if self.dataset is Dataset.IMAGENET else 32

    @property
    def has_layouts(self) -> bool:
        """Whether the stride placement option changes anything (bottleneck blocks only)."""
        return self.block == "bottleneck"

    def params_for(self, num_classes: int) -> int | None:
        """Reference parameter count with a head of ``num_classes`` outputs, or None when
        there is no published figure."""
        if self.reference_params is None:
            return None
        head = self.num_features + 1
        return self.reference_params + head * (num_classes - self.default_num_classes)

    def macs_for(self, layout: Layout, num_classes: int) -> float | None:
        """Reference multiply-adds per image, or None when the table has no figure."""
        table = dict(self.reference_macs)
        if not self.has_layouts:
            layout = Layout.TORCHVISION
        if layout not in table:
            return None
        return table[layout] + self.num_features * (num_classes - self.default_num_classes)


def _both(value: float) -> tuple[tuple[Layout, float], ...]:
    return ((Layout.TORCHVISION, value), (Layout.ORIGINAL, value))


def _cifar(depth: int, params: float, params_step: float, macs: float) -> ArchSpec:
    """A CIFAR net; ``params_step`` is the last digit of the paper's rounded count."""
    n = (depth - 2) // 6
    return ArchSpec(
        name=f"resnet{depth}",
        block="basic",
        layers=(n, n, n),
        stem="cifar",
        shortcut="zero_pad",
        dataset=Dataset.CIFAR10,
        reference_params=round(params),
        reference_params_tolerance=round(params_step / 2),
        reference_macs=_both(macs),
    )


def _preact_cifar(
    depth: int, params: float, tolerance: int, max_rel_error: float | None = None
) -> ArchSpec:
    """A CIFAR pre-activation bottleneck net (depth = 9n + 2).

    The paper's figures match the convolution and fc weights alone (1.68M, 10.18M); with
    BatchNorm's weights and biases (24k, 149k) the counts are 1,703,258 and 10,327,706, so
    ``tolerance`` is the rounding (0.05M) plus that BatchNorm share.
    """
    n = (depth - 2) // 9
    return ArchSpec(
        name=f"preact_resnet{depth}",
        block="bottleneck",
        layers=(n, n, n),
        stem="cifar",
        preact=True,
        dataset=Dataset.CIFAR10,
        reference_params=round(params),
        reference_params_tolerance=tolerance,
        max_rel_error=max_rel_error,
    )


def _densenet(
    depth: int, layers: tuple[int, ...], growth: int, init: int, params: int, macs: float
) -> ArchSpec:
    return ArchSpec(
        name=f"densenet{depth}",
        block="dense",
        layers=layers,
        growth_rate=growth,
        init_features=init,
        reference_params=params,
        reference_macs=((Layout.TORCHVISION, macs),),
    )


G = 1e9
M = 1e6

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        "resnet18",
        "basic",
        (2, 2, 2, 2),
        reference_params=11_689_512,
        reference_macs=_both(1.8 * G),
    ),
    ArchSpec(
        "resnet34",
        "basic",
        (3, 4, 6, 3),
        reference_params=21_797_672,
        reference_macs=_both(3.6 * G),
    ),
    ArchSpec(
        "resnet50",
        "bottleneck",
        (3, 4, 6, 3),
        reference_params=25_557_032,
        reference_macs=((Layout.ORIGINAL, 3.8 * G), (Layout.TORCHVISION, 4.09 * G)),
    ),
    ArchSpec(
        "resnet101",
        "bottleneck",
        (3, 4, 23, 3),
        reference_params=44_549_160,
        reference_macs=((Layout.ORIGINAL, 7.6 * G), (Layout.TORCHVISION, 7.80 * G)),
    ),
    ArchSpec(
        "resnet152",
        "bottleneck",
        (3, 8, 36, 3),
        reference_params=60_192_808,
        reference_macs=((Layout.ORIGINAL, 11.3 * G), (Layout.TORCHVISION, 11.51 * G)),
    ),
    ArchSpec(
        "resnext50_32x4d",
        "bottleneck",
        (3, 4, 6, 3),
        groups=32,
        width_per_group=4,
        reference_params=25_028_904,
        reference_macs=((Layout.TORCHVISION, 4.2 * G),),
    ),
    ArchSpec(
        "resnext101_32x8d",
        "bottleneck",
        (3, 4, 23, 3),
        groups=32,
        width_per_group=8,
        reference_params=88_791_336,
        reference_macs=((Layout.TORCHVISION, 16.41 * G),),
    ),
    ArchSpec(
        "wide_resnet50_2",
        "bottleneck",
        (3, 4, 6, 3),
        width_per_group=128,
        reference_params=68_883_240,
        reference_macs=((Layout.TORCHVISION, 11.40 * G),),
    ),
    ArchSpec(
        "wide_resnet101_2",
        "bottleneck",
        (3, 4, 23, 3),
        width_per_group=128,
        reference_params=126_886_696,
        reference_macs=((Layout.TORCHVISION, 22.75 * G),),
    ),
    _cifar(20, 0.27 * M, 0.01 * M, 41 * M),
    _cifar(32, 0.46 * M, 0.01 * M, 69 * M),
    _cifar(44, 0.66 * M, 0.01 * M, 98 * M),
    _cifar(56, 0.85 * M, 0.01 * M, 125 * M),
    _cifar(110, 1.7 * M, 0.1 * M, 253 * M),
    _cifar(1202, 19.4 * M, 0.1 * M, 2.83 * G),
    ArchSpec(
        "preact_resnet50",
        "bottleneck",
        (3, 4, 6, 3),
        preact=True,
        reference_macs=((Layout.ORIGINAL, 3.8 * G), (Layout.TORCHVISION, 4.09 * G)),
    ),
    ArchSpec(
        "preact_resnet101",
        "bottleneck",
        (3, 4, 23, 3),
        preact=True,
        reference_macs=((Layout.ORIGINAL, 7.6 * G), (Layout.TORCHVISION, 7.80 * G)),
    ),
    ArchSpec(
        "preact_resnet152",
        "bottleneck",
        (3, 8, 36, 3),
        preact=True,
        reference_macs=((Layout.ORIGINAL, 11.3 * G), (Layout.TORCHVISION, 11.51 * G)),
    ),
    _preact_cifar(164, 1.7 * M, 75_000),
    _preact_cifar(1001, 10.2 * M, 200_000, max_rel_error=5e-3),  # measured 1.7e-3
    _densenet(121, (6, 12, 24, 16), 32, 64, 7_978_856, 2.83 * G),
    _densenet(169, (6, 12, 32, 32), 32, 64, 14_149_480, 3.36 * G),
    _densenet(201, (6, 12, 48, 32), 32, 64, 20_013_928, 4.29 * G),
    _densenet(161, (6, 12, 36, 24), 48, 96, 28_681_000, 7.73 * G),
)
