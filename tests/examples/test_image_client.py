"""Done-when check: a Triton image client, with only the model name changed, runs against us.

``examples/image_client.py`` follows Triton's own image_client
example (metadata + config parsing, client-side scaling, FP32 NCHW or UINT8
NHWC batches, classification extension; sync, async and streaming). Each run
is a separate process, as a user would start it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.servers import InProcessServer
from tests.shared_data import PHOTOS

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "image_client.py"
LINE = re.compile(r"^    (-?\d+\.\d{6}) \((\d+)\) = (.+)$")


def run(server: InProcessServer, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "-u", server.address, "-i", "grpc", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "PASS", done.stdout
    return lines


@pytest.mark.parametrize("mode", [[], ["-a"], ["--streaming"]], ids=["sync", "async", "streaming"])
def test_resnet50_example_command_with_our_model_name(
    model_server: InProcessServer, model_repo: Path, mode: list[str]
) -> None:
    labels = (model_repo / "resnet18" / "labels.txt").read_text().splitlines()
    lines = run(
        model_server, *mode, "-m", "resnet18", "-c", "3", "-s", "INCEPTION",
        str(PHOTOS / "coffee.jpg"),
    )  # fmt: skip
    assert lines[0] == "Request 1, batch size 1"
    classes = [LINE.match(line) for line in lines[1:4]]
    assert all(classes), lines
    values = [float(m.group(1)) for m in classes if m]
    assert values == sorted(values, reverse=True)
    for match in classes:
        assert match is not None and labels[int(match.group(2))] == match.group(3)


def test_batches_of_a_folder_on_the_uint8_model(model_server: InProcessServer) -> None:
    folder = sorted(p for p in PHOTOS.iterdir() if p.is_file())
    lines = run(model_server, "-m", "resnet18_u8", "-b", "2", "-c", "2", str(PHOTOS))
    requests = [line for line in lines if line.startswith("Request ")]
    assert len(requests) == (len(folder) + 1) // 2
    assert all(line.endswith("batch size 2") for line in requests)
    assert sum(bool(LINE.match(line)) for line in lines) == 2 * 2 * len(requests)
