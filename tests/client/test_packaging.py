"""`pip install ./clients/python` in a fresh venv pulls the SDK's few dependencies, no
torch and no onnxruntime. Resolved with `pip install --dry-run --report`: the same
resolution a real install does, without the download and unpack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"
BASE = {"resnet-serve-client", "grpcio", "grpcio-health-checking", "protobuf", "numpy",
        "typing-extensions"}
NEVER = ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "tritonclient")


@pytest.fixture(scope="module")
def fresh_pip(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], check=True,
                            capture_output=True, text=True).stdout
    assert not {p["name"] for p in json.loads(listed)} & {"grpcio", "numpy", "torch"}
    return [str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report"]


def _resolve(pip: list[str], requirement: str, report: Path) -> set[str]:
    subprocess.run([*pip, str(report), requirement], check=True, capture_output=True,
                   timeout=300)
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-") for item in installs}


def test_fresh_install_pulls_only_the_sdk_dependencies(fresh_pip: list[str],
                                                      tmp_path: Path) -> None:
    resolved = _resolve(fresh_pip, str(CLIENT), tmp_path / "base.json")
    assert resolved == BASE


def test_extras_pull_no_torch_or_onnxruntime(fresh_pip: list[str], tmp_path: Path) -> None:
    resolved = _resolve(fresh_pip, f"{CLIENT}[resize,plot]", tmp_path / "extras.json")
    assert {"pillow", "matplotlib"} <= resolved
    assert not resolved & set(NEVER)
