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
from builder.blocks import DropPath, ZeroPadShortcut
from builder.densenet import DenseNet
from builder.options import ModelOptions
from builder.registry import (
    REGISTRY,
    DuplicateArchitectureError,
    Registry,
    UnknownArchitectureError,
)
from builder.resnet import ResNet, TorchNet, create_model, drop_probabilities

PINNED = json.loads((Path(__file__).parent / "data" / "state_dict_keys.json").read_text())

FAMILY = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
    "preact_resnet50", "preact_resnet101", "preact_resnet152",
    "preact_resnet164", "preact_resnet1001",
    "densenet121", "densenet169", "densenet201", "densenet161",
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
    # no published figure for the ImageNet pre-activation nets: v1's count less the BN of
    # the stem, of each block's output and of each projection, plus each block's input BN
    # and the final BN
    "preact_resnet50": 25_549_352,
    "preact_resnet101": 44_541_480,
    "preact_resnet152": 60_185_128,
    "preact_resnet164": 1_703_258,
    "preact_resnet1001": 10_327_706,
    # torchvision's published counts, as the issue states them
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet161": 28_681_000,
}
PAPER_CIFAR_MILLIONS = {
    "resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66,
    "resnet56": 0.85, "resnet110": 1.7, "resnet1202": 19.4,
}  # fmt: skip
# "Identity Mappings", table 3: these figures count the convolution and fc weights only
PAPER_PREACT_MILLIONS = {"preact_resnet164": 1.7, "preact_resnet1001": 10.2}

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
    "preact_resnet50": {
        "conv1.weight": [64, 3, 7, 7],
        "layer1.0.bn1.weight": [64],
        "layer1.0.conv1.weight": [64, 64, 1, 1],
        "layer1.0.bn3.weight": [64],
        "layer1.0.conv3.weight": [256, 64, 1, 1],
        "layer1.0.downsample.0.weight": [256, 64, 1, 1],
        "layer2.0.bn1.running_var": [256],
        "layer4.2.conv3.weight": [2048, 512, 1, 1],
        "bn.weight": [2048],
        "fc.weight": [1000, 2048],
    },
    "preact_resnet164": {
        "conv1.weight": [16, 3, 3, 3],
        "layer1.0.bn1.weight": [16],
        "layer1.0.downsample.0.weight": [64, 16, 1, 1],
        "layer3.17.conv3.weight": [256, 64, 1, 1],
        "bn.weight": [256],
        "fc.weight": [10, 256],
    },
    "preact_resnet1001": {"layer3.110.conv2.weight": [64, 64, 3, 3]},
    "densenet121": {
        "features.conv0.weight": [64, 3, 7, 7],
        "features.norm0.weight": [64],
        "features.denseblock1.denselayer1.norm1.weight": [64],
        "features.denseblock1.denselayer1.conv1.weight": [128, 64, 1, 1],
        "features.denseblock1.denselayer1.norm2.running_mean": [128],
        "features.denseblock1.denselayer1.conv2.weight": [32, 128, 3, 3],
        "features.denseblock1.denselayer6.conv1.weight": [128, 224, 1, 1],
        "features.transition1.norm.weight": [256],
        "features.transition1.conv.weight": [128, 256, 1, 1],
        "features.denseblock4.denselayer16.conv2.weight": [32, 128, 3, 3],
        "features.norm5.weight": [1024],
        "classifier.weight": [1000, 1024],
    },
    "densenet161": {
        "features.conv0.weight": [96, 3, 7, 7],
        "features.denseblock1.denselayer1.conv1.weight": [192, 96, 1, 1],
        "features.transition3.conv.weight": [1056, 2112, 1, 1],
        "features.norm5.weight": [2208],
        "classifier.weight": [1000, 2208],
    },
    "densenet169": {"features.norm5.weight": [1664], "classifier.weight": [1000, 1664]},
    "densenet201": {"features.norm5.weight": [1920], "classifier.weight": [1000, 1920]},
}


def meta_model(name: str, layout: Layout = Layout.TORCHVISION) -> TorchNet:
    """Shapes and names without allocating: even wide_resnet101_2 costs nothing."""
    spec = REGISTRY.get(name)
    with torch.device("meta"):
        if not spec.residual:
            return DenseNet(spec, spec.default_num_classes)
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
    if spec.reference_params is not None:
        assert abs(counted - spec.reference_params) <= spec.reference_params_tolerance
    if name in PAPER_CIFAR_MILLIONS:
        digits = 2 if counted < 1e6 else 1
        assert round(counted / 1e6, digits) == PAPER_CIFAR_MILLIONS[name]
    if name in PAPER_PREACT_MILLIONS:
        model = meta_model(name)
        batchnorm = sum(
            p.numel()
            for m in model.modules()
            if isinstance(m, torch.nn.BatchNorm2d)
            for p in m.parameters()
        )
        assert round((counted - batchnorm) / 1e6, 1) == PAPER_PREACT_MILLIONS[name]


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


@pytest.mark.parametrize("name", ["preact_resnet50", "preact_resnet164"])
def test_preact_nets_activate_before_each_convolution(name: str) -> None:
    model = meta_model(name)
    keys = model.state_dict()
    assert "bn1.weight" not in keys  # no BN-ReLU in the stem: each block starts with one
    assert keys["bn.weight"].shape == (REGISTRY.get(name).num_features,)
    projections = sorted(k for k in keys if ".downsample." in k)
    assert all(k.endswith("downsample.0.weight") for k in projections)  # convolution only
    block = model.layer1[0]
    assert block.bn1.num_features == block.conv1.in_channels


def test_preact_block_has_no_relu_after_the_sum() -> None:
    model = create_model("preact_resnet164", ModelOptions(seed=0))
    block = model.layer2[1]
    x = torch.randn(2, 128, 16, 16)
    with torch.no_grad():
        out = block(x)
        branch = block.conv3(block.relu(block.bn3(block.conv2(block.relu(block.bn2(
            block.conv1(block.relu(block.bn1(x)))
        ))))))  # fmt: skip
    assert (out < 0).any()
    assert torch.allclose(out, x + branch)


def test_densenet_matches_the_table() -> None:
    spec = REGISTRY.get("densenet121")
    assert spec.num_features == 1024 and not spec.residual and not spec.has_layouts
    model = create_model("densenet121", ModelOptions(num_classes=5))
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="no residual blocks"):
        create_model("densenet121", ModelOptions(stochastic_depth=0.5))


def test_stochastic_depth_decays_linearly() -> None:
    assert drop_probabilities(4, None) == [0.0] * 4
    assert drop_probabilities(4, 0.5) == pytest.approx([0.125, 0.25, 0.375, 0.5])
    model = create_model("resnet20", ModelOptions(stochastic_depth=0.5))
    drops = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert len(drops) == 9 and drops[-1] == pytest.approx(0.5)
    assert drops == sorted(drops)
    with pytest.raises(ValueError, match="p_L"):
        drop_probabilities(4, 0.0)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet164"])
def test_stochastic_depth_adds_no_keys_and_vanishes_in_eval(name: str) -> None:
    plain = create_model(name, ModelOptions(seed=1))
    deep = create_model(name, ModelOptions(seed=1, stochastic_depth=0.5))
    assert key_lines(deep) == key_lines(plain)
    size = REGISTRY.get(name).input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(deep(x), plain(x))


def test_drop_path_drops_whole_samples_and_rescales() -> None:
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    out = drop(torch.ones(4000, 3, 2, 2))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # survivors scaled by 1 / 0.5
    assert (per_sample == per_sample[:, :1]).all()  # a sample is kept or dropped whole
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)  # the expectation is unchanged
    assert torch.equal(drop.eval()(out), out)
