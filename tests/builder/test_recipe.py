"""What verification.json records is enough to rebuild the exported PyTorch model."""

from __future__ import annotations

from pathlib import Path

import torch

from builder.architectures import Layout
from builder.options import ModelOptions
from builder.recipe import Recipe, set_batchnorm_statistics
from builder.resnet import create_model
from builder.weights import WeightsSource


def logits(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(images)


def test_json_round_trip() -> None:
    weights = WeightsSource(path=Path("/ckpt/resnet50.pth"), sha256="ab" * 32)
    for recipe in (
        Recipe("resnet50", 1000, Layout.ORIGINAL, seed=3, zero_init_last=True, weights=weights),
        Recipe("resnet20", 7, seed=5),
    ):
        assert Recipe.from_json(recipe.to_json()) == recipe


def test_random_weights_are_rebuilt_exactly() -> None:
    first = Recipe("resnet20", 10, seed=2).model()
    again = Recipe("resnet20", 10, seed=2).model()
    assert torch.equal(logits(first), logits(again))


def test_calibration_keeps_deep_random_nets_finite_and_unit_scaled() -> None:
    uncalibrated = create_model("resnet110", ModelOptions(seed=0))
    assert logits(uncalibrated).abs().max() > 1e4  # the variance doubles at every block
    calibrated = create_model("resnet110", ModelOptions(seed=0))
    set_batchnorm_statistics(calibrated, seed=0)
    out = logits(calibrated)
    assert torch.isfinite(out).all() and out.abs().max() < 100
    assert not calibrated.training
    for module in calibrated.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.momentum == 0.1  # restored after the calibration pass
            assert torch.equal(module.weight, torch.ones_like(module.weight))
