"""KServe's own SDK against resnet-serve, next to tritonclient: the v2 REST and gRPC
clients' health calls and inference, the logits equal to tritonclient's and ONNX
Runtime's. The SDK lives in a venv of its own, pinned by requirements/kserve.txt (it
wants psutil < 6; the service's lock has 7), made once per session (about 45 s)."""

from __future__ import annotations

import json
import subprocess
import venv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from server.repository import MODEL_FILE, latest_version
from tests.fixtures.servers import InProcessServer

ROOT = Path(__file__).resolve().parents[2]
CALLS = Path(__file__).with_name("kserve_calls.py")
MODEL = "cifar"


@pytest.fixture(scope="module")
def kserve_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("kserve-venv")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-r", ROOT / "requirements" / "kserve.txt"],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    return python


@pytest.fixture(scope="module")
def answers(
    kserve_python: Path, model_server: InProcessServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    x = np.random.default_rng(7).standard_normal((1, 3, 32, 32), dtype=np.float32)
    path = tmp_path_factory.mktemp("kserve-input") / "x.npy"
    np.save(path, x)
    result = subprocess.run(
        [kserve_python, CALLS, model_server.http_url, model_server.address, MODEL, path],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    yield {"x": x, **json.loads(result.stdout)}


def test_health_over_rest_and_grpc(answers: dict) -> None:
    for key in ("live", "ready", "model_ready"):
        assert answers[f"rest_{key}"] is True and answers[f"grpc_{key}"] is True


def test_logits_equal_tritonclient_and_onnxruntime(
    answers: dict, model_server: InProcessServer, model_repo: Path
) -> None:
    x = answers["x"]
    with grpcclient.InferenceServerClient(model_server.address) as triton:
        tensor = grpcclient.InferInput("images", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        reference = triton.infer(MODEL, [tensor]).as_numpy("logits")
    session = ort.InferenceSession(
        str(latest_version(model_repo / MODEL) / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    (expected,) = session.run(None, {"images": x})
    for key in ("rest_logits_binary_False", "rest_logits_binary_True", "grpc_logits"):
        got = np.asarray(answers[key], dtype=np.float32)
        np.testing.assert_array_equal(got, reference, err_msg=key)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=key)
