"""The digits model, trained once per session by ``builder.train`` and built in three forms.

``digits`` (session) → `TrainedDigits`: a repository holding

    ``digits``          resnet20 trained on the digits, fp32 (float32 IO)
    ``digits_int8``     the same checkpoint, int8 QDQ, calibrated on the training PNGs
    ``digits_fp16``     the same checkpoint, fp16 with float16 graph inputs and outputs

plus the PyTorch model, the held-out split and its PNG files. Six epochs reach the 97 %
target on this split (eight, the CLI's default, about 99.5 %), in about half a minute on
two cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from builder.digits import LABELS, Digits, inputs, load_digits
from builder.options import ModelOptions
from builder.precision import Precision
from builder.resnet import create_model
from builder.weights import load_weights
from server.repository import ModelConfig
from tests.fixtures.repos import BuildModel

TEST_EPOCHS = 6


@dataclass(frozen=True)
class TrainedDigits:
    repo: Path
    out: Path
    accuracy: float  # held-out, PyTorch
    model: nn.Module  # the trained fp32 PyTorch model, eval mode
    data: Digits
    config: ModelConfig

    def held_out_inputs(self) -> np.ndarray:
        return inputs(self.data.held_out.pixels, self.config)

    def held_out_pngs(self) -> list[Path]:
        """The PNG files `builder.train` wrote, in split order."""
        labels = self.data.held_out.labels
        return [self.out / "held_out" / LABELS[y] / f"{i:04d}.png" for i, y in enumerate(labels)]


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory, build_model: BuildModel) -> TrainedDigits:
    from builder.train import TrainRequest, train

    root = tmp_path_factory.mktemp("digits")
    request = TrainRequest(
        out=root / "out",
        repo=root / "repo",
        epochs=TEST_EPOCHS,
        precisions=(Precision.FP32, Precision.INT8),
    )
    result = train(request)
    build_model(
        "resnet20",
        request.repo,
        name="digits_fp16",
        weights=result.checkpoint,
        labels=LABELS,
        precision=Precision.FP16,
        fp16_io=True,
    )
    model = create_model("resnet20", ModelOptions(num_classes=len(LABELS)))
    load_weights(model, result.checkpoint, "resnet20")
    return TrainedDigits(
        repo=request.repo,
        out=request.out,
        accuracy=result.accuracy,
        model=model,
        data=load_digits(),
        config=ModelConfig.load(request.repo / "digits"),
    )
