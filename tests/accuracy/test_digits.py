"""From training to served predictions: the digits model through the real server.

Every held-out digit is classified through a `resnet-serve serve` subprocess, as PNG bytes,
as uint8 HWC tensors and as float32 CHW tensors; the served top-1 must be exactly the
PyTorch model's. The int8 build must stay within one point of fp32 accuracy, the fp16 build
(float16 graph IO, fed by the server) must agree with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from resnet_serve_client import Client

from builder.__main__ import main
from builder.digits import load_digits
from builder.train import predictions
from server.repository import VERIFICATION_FILE
from tests.accuracy.conftest import TrainedDigits
from tests.fixtures.servers import InProcessServer, settings

TARGET = 0.97


@pytest.fixture(scope="module")
def digits_server(
    digits: TrainedDigits, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessServer]:
    server = InProcessServer(settings(digits.repo))
    yield server
    assert server.stop() == 0


def served_top1(server: InProcessServer, model: str, images: list) -> np.ndarray:
    with Client(server.address, model=model, timeout=60) as client:
        results = list(client.classify_many(images, top_k=1, concurrency=8))
    return np.array([int(result.top.label) for result in results])


def test_training_reaches_the_target(digits: TrainedDigits) -> None:
    assert digits.accuracy >= TARGET
    reference = predictions(digits.model, digits.held_out_inputs())
    assert (reference == digits.data.held_out.labels).mean() == pytest.approx(digits.accuracy)
    record = json.loads((digits.repo / "digits" / "1" / VERIFICATION_FILE).read_text())
    assert record["passed"] and record["recipe"]["weights"].endswith("digits.pth")
    assert (digits.repo / "digits" / "labels.txt").read_text().split() == list("0123456789")


@pytest.mark.parametrize("form", ["png", "uint8", "float32"])
def test_served_predictions_are_the_pytorch_models(
    digits: TrainedDigits, digits_server: InProcessServer, form: str
) -> None:
    held_out = digits.data.held_out
    tensors = digits.held_out_inputs()
    images: list = {
        "png": [Path(p).read_bytes() for p in digits.held_out_pngs()],
        "uint8": list(held_out.pixels),
        "float32": list(tensors),
    }[form]
    served = served_top1(digits_server, "digits", images)
    np.testing.assert_array_equal(served, predictions(digits.model, tensors))
    assert (served == held_out.labels).mean() >= TARGET


def test_int8_is_within_one_point_of_fp32(
    digits: TrainedDigits, digits_server: InProcessServer
) -> None:
    pngs = [Path(p).read_bytes() for p in digits.held_out_pngs()]
    labels = digits.data.held_out.labels
    fp32 = served_top1(digits_server, "digits", pngs)
    int8 = served_top1(digits_server, "digits_int8", pngs)
    assert (int8 == labels).mean() >= (fp32 == labels).mean() - 0.01
    assert (int8 == fp32).mean() >= 0.99
    record = json.loads((digits.repo / "digits_int8" / "1" / VERIFICATION_FILE).read_text())
    assert record["precision"] == "int8" and record["calibration"]["source"] == "folder"
    agreement = next(c for c in record["checks"] if c["name"] == "top1_agreement")
    assert agreement["figures"]["agreement"] >= 0.99


def test_fp16_io_model_is_fed_float16_by_the_server(
    digits: TrainedDigits, digits_server: InProcessServer
) -> None:
    tensors = digits.held_out_inputs()
    served = served_top1(digits_server, "digits_fp16", list(tensors))
    assert (served == predictions(digits.model, tensors)).mean() >= 0.99


def test_the_split_is_fixed(digits: TrainedDigits) -> None:
    data = digits.data
    assert data.train.pixels.shape == (1437, 32, 32, 3)
    assert data.held_out.pixels.shape == (360, 32, 32, 3)
    assert np.bincount(data.held_out.labels).min() >= 35  # stratified: ~36 of each digit
    assert np.array_equal(load_digits().held_out.labels, data.held_out.labels)


def test_train_takes_only_cifar_style_resnets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--arch", "densenet121", "--repo", str(tmp_path), "--out", str(tmp_path)])
    assert code == 2
    assert "CIFAR-style ResNet" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
