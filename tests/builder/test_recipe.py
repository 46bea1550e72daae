"""What verification.json records is enough to rebuild the exported PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from builder.architectures import Layout
from builder.options import ModelOptions
from builder.recipe import Recipe, set_batchnorm_statistics
from builder.resnet import create_model


def logits(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(images)


def recipe(arch: str, num_classes: int, **options: Any) -> Recipe:
    return Recipe(arch=arch, name=arch, version=1, num_classes=num_classes, **options)


def test_json_round_trip() -> None:
    for recorded in (
        recipe(
            "resnet50",
            1000,
            layout=Layout.ORIGINAL,
            seed=3,
            zero_init_last=True,
            weights=Path("/ckpt/resnet50.pth"),
            weights_sha256="ab" * 32,
        ),
        recipe("resnet20", 7, seed=5),
    ):
        text = json.dumps(recorded.model_dump(mode="json"))
        assert Recipe.model_validate(json.loads(text)) == recorded


def test_random_weights_are_rebuilt_exactly() -> None:
    first = recipe("resnet20", 10, seed=2).model()
    again = recipe("resnet20", 10, seed=2).model()
    assert torch.equal(logits(first), logits(again))


def test_batchnorm_statistics_keep_deep_random_nets_finite_and_unit_scaled() -> None:
    untrained_statistics = create_model("resnet110", ModelOptions(seed=0))
    assert logits(untrained_statistics).abs().max() > 1e4  # the variance doubles at every block
    measured = create_model("resnet110", ModelOptions(seed=0))
    set_batchnorm_statistics(measured, seed=0)
    out = logits(measured)
    assert torch.isfinite(out).all() and out.abs().max() < 100
    assert not measured.training
    for module in measured.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.momentum == 0.1  # restored after the statistics pass
            assert torch.equal(module.weight, torch.ones_like(module.weight))
