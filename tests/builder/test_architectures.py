"""The family table: registry, torchvision's parameter names and counts, initialization.

torchvision cannot be installed beside torch 2.13 here, so its key lists are pinned in
``data/state_dict_keys.json``: per architecture the number of state-dict entries and of
parameters, and the sha256 of the lines ``"<key> [<shape>]"`` in state-dict order joined
by newlines. Explicit keys below spell out what the hashes stand for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from builder.architectures import ARCHITECTURES, ArchSpec, Layout
from builder.blocks import ZeroPadShortcut
from builder.registry import (
    REGISTRY,
    DuplicateArchitectureError,
    Registry,
    UnknownArchitectureError,
)
from builder.resnet import ModelOptions, ResNet, create_model

PINNED = json.loads((Path(__file__).parent / "data" / "state_dict_keys.json").read_text())

FAMILY = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
]  # fmt: skip

# torchvision's published counts; the CIFAR nets' exact counts (the paper rounds them:
# 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M).
PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
}
PAPER_CIFAR_MILLIONS = {
    "resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66,
    "resnet56": 0.85, "resnet110": 1.7, "resnet1202": 19.4,
}  # fmt: skip

SPOT_KEYS = {
    "resnet18": {
        "conv1.weight": [64, 3, 7, 7],
        "layer1.0.conv1.weight": [64, 64, 3, 3],
        "layer2.0.downsample.0.weight": [128, 64, 1, 1],
        "layer2.0.downsample.1.running_mean": [128],
        "layer4.1.bn2.num_batches_tracked": [],
        "fc.weight": [1000, 512],
    },
    "resnet34": {"layer3.5.conv2.weight": [256, 256, 3, 3], "fc.weight": [1000, 512]},
    "resnet50": {
        "layer1.0.downsample.0.weight": [256, 64, 1, 1],
        "layer1.0.conv2.weight": [64, 64, 3, 3],
        "layer4.2.conv3.weight": [2048, 512, 1, 1],
        "fc.weight": [1000, 2048],
    },
    "resnet101": {"layer3.22.conv3.weight": [1024, 256, 1, 1]},
    "resnet152": {"layer2.7.bn3.weight": [512], "layer3.35.conv1.weight": [256, 1024, 1, 1]},
    "resnext50_32x4d": {
        "layer1.0.conv1.weight": [128, 64, 1, 1],
        "layer1.0.conv2.weight": [128, 4, 3, 3],
        "layer1.0.conv3.weight": [256, 128, 1, 1],
        "layer4.0.conv2.weight": [1024, 32, 3, 3],
    },
    "resnext101_32x8d": {
        "layer1.0.conv2.weight": [256, 8, 3, 3],
        "layer4.2.conv2.weight": [2048, 64, 3, 3],
    },
    "wide_resnet50_2": {
        "layer1.0.conv1.weight": [128, 64, 1, 1],
        "layer1.0.conv2.weight": [128, 128, 3, 3],
        "layer4.0.conv2.weight": [1024, 1024, 3, 3],
        "layer4.2.conv3.weight": [2048, 1024, 1, 1],
    },
    "wide_resnet101_2": {"layer3.22.conv2.weight": [512, 512, 3, 3]},
    "resnet20": {
        "conv1.weight": [16, 3, 3, 3],
        "layer2.0.conv1.weight": [32, 16, 3, 3],
        "layer3.2.conv2.weight": [64, 64, 3, 3],
        "fc.weight": [10, 64],
    },
    "resnet1202": {"layer3.199.bn2.running_var": [64], "fc.bias": [10]},
}


def meta_model(name: str, layout: Layout = Layout.TORCHVISION) -> ResNet:
    """Shapes and names without allocating: even wide_resnet101_2 costs nothing."""
    spec = REGISTRY.get(name)
    with torch.device("meta"):
        return ResNet(spec, spec.default_num_classes, layout)


def key_lines(model: torch.nn.Module) -> list[str]:
    return [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()]


def test_registry_lists_the_family() -> None:
    assert REGISTRY.names() == FAMILY
    assert sorted(PINNED) == sorted(FAMILY)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownArchitectureError) as info:
        REGISTRY.get("resnet99")
    message = str(info.value)
    assert "resnet99" in message
    assert all(name in message for name in FAMILY)


def test_registry_refuses_a_duplicate() -> None:
    registry = Registry(ARCHITECTURES[:2])
    with pytest.raises(DuplicateArchitectureError, match="resnet18"):
        registry.register(ArchSpec("resnet18", "basic", (1, 1, 1, 1)))
    assert len(registry) == 2


@pytest.mark.parametrize("name", FAMILY)
def test_state_dict_keys_are_pinned(name: str) -> None:
    model = meta_model(name)
    lines = key_lines(model)
    pinned = PINNED[name]
    assert len(lines) == pinned["keys"]
    assert sum(1 for _ in model.parameters()) == pinned["parameters"]
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == pinned["sha256"]
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    for key, shape in SPOT_KEYS.get(name, {}).items():
        assert shapes[key] == shape, key


@pytest.mark.parametrize("name", FAMILY)
def test_parameter_count(name: str) -> None:
    counted = sum(p.numel() for p in meta_model(name).parameters())
    assert counted == PARAMETERS[name]
    spec = REGISTRY.get(name)
    assert abs(counted - spec.reference_params) <= spec.reference_params_tolerance
    if name in PAPER_CIFAR_MILLIONS:
        digits = 2 if counted < 1e6 else 1
        assert round(counted / 1e6, digits) == PAPER_CIFAR_MILLIONS[name]


def test_cifar_nets_have_no_projection_shortcuts() -> None:
    for name in PAPER_CIFAR_MILLIONS:
        keys = meta_model(name).state_dict()
        assert not any("downsample" in k for k in keys), name


def test_basic_nets_have_projection_only_where_the_shape_changes() -> None:
    keys = meta_model("resnet18").state_dict()
    downsampled = sorted({k.split(".downsample")[0] for k in keys if ".downsample." in k})
    assert downsampled == ["layer2.0", "layer3.0", "layer4.0"]


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "resnet152"])
def test_original_layout_moves_the_stride_to_the_1x1(name: str) -> None:
    torchvision_layout = meta_model(name, Layout.TORCHVISION)
    original = meta_model(name, Layout.ORIGINAL)
    assert key_lines(original) == key_lines(torchvision_layout)
    block_tv, block_orig = torchvision_layout.layer2[0], original.layer2[0]
    assert (block_tv.conv1.stride, block_tv.conv2.stride) == ((1, 1), (2, 2))
    assert (block_orig.conv1.stride, block_orig.conv2.stride) == ((2, 2), (1, 1))


def test_basic_block_refuses_groups() -> None:
    spec = ArchSpec("basic_grouped", "basic", (1, 1, 1, 1), groups=32, width_per_group=4)
    with pytest.raises(ValueError, match="groups=1"):
        ResNet(spec, 10)


def test_initialization() -> None:
    model = create_model("resnet18", ModelOptions(seed=3))
    conv = model.layer3[1].conv2.weight  # 256 x 256 x 3 x 3, fan_out = 256 * 9
    assert conv.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    assert conv.mean().item() == pytest.approx(0.0, abs=1e-3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    bound = 1 / 512**0.5
    assert model.fc.weight.abs().max().item() <= bound
    assert model.fc.bias.abs().max().item() <= bound
    assert not model.training


def test_seed_decides_the_weights() -> None:
    first = create_model("resnet20", ModelOptions(seed=1)).state_dict()
    again = create_model("resnet20", ModelOptions(seed=1)).state_dict()
    other = create_model("resnet20", ModelOptions(seed=2)).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])


@pytest.mark.parametrize(("name", "last_bn"), [("resnet20", "bn2"), ("resnet50", "bn3")])
def test_zero_init_last(name: str, last_bn: str) -> None:
    model = create_model(name, ModelOptions(zero_init_last=True))
    for stage in model.stages():
        for block in stage:
            assert not getattr(block, last_bn).weight.any()
            assert block.bn1.weight.all()


def test_num_classes_sets_the_head() -> None:
    model = create_model("resnet20", ModelOptions(num_classes=7))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_zero_pad_shortcut_subsamples_and_pads() -> None:
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    out = ZeroPadShortcut(stride=2, extra_channels=4)(x)
    assert out.shape == (2, 8, 2, 2)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 6:].any()


def test_reference_figures_follow_the_head_and_layout() -> None:
    resnet50 = REGISTRY.get("resnet50")
    with torch.device("meta"):
        ten_classes = ResNet(resnet50, 10)
    counted = sum(p.numel() for p in ten_classes.parameters())
    assert resnet50.params_for(10) == counted == 23_528_522
    assert resnet50.macs_for(Layout.TORCHVISION, 10) == pytest.approx(4.09e9 - 2048 * 990)
    assert resnet50.macs_for(Layout.ORIGINAL, 1000) == pytest.approx(3.8e9)
    assert REGISTRY.get("resnet18").macs_for(Layout.ORIGINAL, 1000) == pytest.approx(1.8e9)
    assert REGISTRY.get("resnext50_32x4d").macs_for(Layout.ORIGINAL, 1000) is None
