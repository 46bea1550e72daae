"""`pip install ./clients/python` in a fresh venv pulls the SDK's few dependencies, no
torch and no onnxruntime. Resolved with `pip install --dry-run --report`: the same
resolution a real install does, without the download and unpack. The SDK's wheel is
typed (py.typed, the stubs' .pyi) and licensed; both distributions have one version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
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


ROOT = CLIENT.parents[1]


def test_one_version_and_the_service_pins_its_sdk() -> None:
    """clients/python/VERSION is the version of both distributions, and the service
    depends on exactly that SDK version."""
    wanted = (CLIENT / "VERSION").read_text().strip()
    assert metadata.version("resnet-serve") == metadata.version("resnet-serve-client") == wanted
    service = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d.split("#")[0].strip() for d in service["dependencies"]
            if d.startswith("resnet-serve-client")]  # fmt: skip
    assert pins == [f"resnet-serve-client=={wanted}"]


def test_the_sdk_wheel_is_typed_and_licensed(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: setuptools leaves build/ beside what it builds
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path)]
    subprocess.run([*command, str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("resnet_serve_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "resnet_serve_client/py.typed" in names
    assert "resnet_serve_client/proto/inference/grpc_service_pb2.pyi" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta
    assert (CLIENT / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    for project in (ROOT, CLIENT):
        config = tomllib.loads((project / "pyproject.toml").read_text())
        (setuptools,) = config["build-system"]["requires"]
        assert setuptools == "setuptools>=77", project  # builds the `license` expression
