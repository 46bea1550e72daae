"""The SDK beside the current tritonclient in one fresh environment, and the SDK alone on the
newest protobuf: the committed stubs run on protobuf 6 and 7.

Each case makes a fresh virtual environment, really installs into it (from the
package index this machine uses), and runs one process there that calls the
in-process ``model_server`` through the SDK and, with tritonclient, over v2 gRPC
and HTTP. tritonclient 2.73 requires protobuf < 7, which the stubs used to refuse.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.servers import InProcessServer
from tests.shared_data import PHOTOS

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"
TRITONCLIENT = "tritonclient[grpc,http]==2.73.0"

SCRIPT = textwrap.dedent(
    """
    import sys

    import google.protobuf
    import numpy as np
    from resnet_serve_client import Client

    grpc_address, http_address, photo, with_triton = sys.argv[1:5]
    with Client(grpc_address, model="cifar", timeout=60) as client:
        (result,) = client.classify(photo)
        assert len(result.classes) == 5, result
    if with_triton == "yes":
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        batch = np.zeros((1, 3, 32, 32), np.float32)
        with grpcclient.InferenceServerClient(grpc_address) as triton:
            tensor = grpcclient.InferInput("images", [1, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(batch)
            assert triton.infer("cifar", [tensor]).as_numpy("logits").shape == (1, 10)
        triton = httpclient.InferenceServerClient(http_address)
        tensor = httpclient.InferInput("images", [1, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(batch)
        assert triton.infer("cifar", [tensor]).as_numpy("logits").shape == (1, 10)
        triton.close()
    print("protobuf", google.protobuf.__version__)
    """
)


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("extra", "protobuf_major"),
    [([TRITONCLIENT], "6"), ([], "7")],
    ids=["with-tritonclient-2.73", "sdk-alone-newest-protobuf"],
)
def test_fresh_environment(
    model_server: InProcessServer, tmp_path: Path, extra: list[str], protobuf_major: str
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", str(CLIENT), *extra],
        capture_output=True, text=True, timeout=800,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert model_server.http_url is not None
    ran = subprocess.run(
        [python, "-c", SCRIPT, model_server.address,
         model_server.http_url.removeprefix("http://"), str(PHOTOS / "chelsea.jpg"),
         "yes" if extra else "no"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip().startswith(f"protobuf {protobuf_major}."), ran.stdout
