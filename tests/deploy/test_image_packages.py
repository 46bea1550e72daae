"""What the images install, checked with pip instead of a Docker engine.

The builder stage's `pip wheel` step runs as written on a copy of exactly the
files its COPY lines bring in, and each runtime stage's `pip install` steps are
resolved by pip (`--dry-run`, against the index, for the image's Python and
platform): the runtime images get the server and the client, the pinned
onnxruntime build, and no torch.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy import dockerfile, procs
from tests.deploy.dockerfile import ROOT

# manylinux wheels the images' glibc (Debian 12: 2.36, Ubuntu 24.04: 2.39) can load
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")  # fmt: skip
UBUNTU_PYTHON = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}
NEVER_IN_RUNTIME = re.compile(r"^(torch|torchvision|onnx|onnxscript|safetensors|nvidia-.*)$")


def _steps(stage: dockerfile.Stage, prefix: str) -> list[str]:
    """The `&&`-separated commands of the stage's RUNs that start with `prefix`."""
    found = []
    for run in stage.all("RUN"):
        _flags, command = run.flags_and_rest()
        found += [c.strip() for c in command.split("&&") if c.strip().startswith(prefix)]
    return found


def _python_version(df: dockerfile.Dockerfile, stage: dockerfile.Stage) -> str:
    base = df.resolve(stage.base)
    if match := re.match(r"python:(\d+\.\d+)", base):
        return match[1]
    ubuntu = re.search(r"(ubuntu\d+\.\d+)$", base)
    assert ubuntu and ubuntu[1] in UBUNTU_PYTHON, f"which Python does {base} have?"
    return UBUNTU_PYTHON[ubuntu[1]]


def _dockerignored(directory: str, names: list[str]) -> set[str]:
    """shutil.copytree's ignore: what .dockerignore keeps out of the build context."""
    rel = Path(directory).relative_to(ROOT)
    return {n for n in names if dockerfile.is_ignored(str(rel / n))}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage's wheels, built from a copy of what its COPY lines copy."""
    df = dockerfile.load()
    builder = df.stage("builder")
    src = tmp_path_factory.mktemp("image-src")
    for copy in builder.all("COPY"):
        flags, rest = copy.flags_and_rest()
        assert "from" not in flags
        *sources, dest = rest.split()
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, src / dest, dirs_exist_ok=True, ignore=_dockerignored)
            else:
                target = src / dest / path.name if dest.endswith("/") else src / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    (step,) = _steps(builder, "pip wheel")
    out = tmp_path_factory.mktemp("wheels")
    args = shlex.split(step.replace("/wheels", str(out)))
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=src, env=procs.clean_env(**builder.env()),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _resolve(requirements: list[str], python: str, tmp_path: Path) -> dict[str, str]:
    """What `pip install REQUIREMENTS` would install on that Python and platform."""
    report = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--report", str(report), "--only-binary=:all:", "--implementation", "cp",
         "--python-version", python, *platforms, "--target", str(tmp_path / "target"),
         *requirements],
        env=procs.clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    return {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
            for i in installs}  # fmt: skip


def _requirements(step: str, df: dockerfile.Dockerfile, stage: dockerfile.Stage,
                  wheels: Path) -> list[str]:  # fmt: skip
    """The requirement arguments of a `pip install ...` step, ARGs and wheel globs expanded."""
    words = shlex.split(df.resolve(step, stage))[2:]
    out = []
    for word in words:
        assert not word.startswith("-"), f"unexpected pip option {word} in {step!r}"
        if word.startswith("/wheels/"):
            matched = sorted(wheels.glob(word.removeprefix("/wheels/")))
            assert matched, f"{word} matches no wheel the builder stage makes"
            out += map(str, matched)
        else:
            out.append(word)
    return out


def test_wheels_hold_the_packages_and_commands(wheels: Path) -> None:
    (server,) = wheels.glob("resnet_serve-*.whl")
    (client,) = wheels.glob("resnet_serve_client-*.whl")
    with zipfile.ZipFile(server) as whl:
        names = set(whl.namelist())
        entry_points = next(whl.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"server/serve.py", "server/app.py", "server/repository/config.py"} <= names
    assert "resnet-serve = server.cli:main" in entry_points
    with zipfile.ZipFile(client) as whl:
        names = set(whl.namelist())
        entry_points = next(whl.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert any(n.startswith("resnet_serve_client/proto/") for n in names)
    # the HEALTHCHECK runs it
    assert "resnet-serve-client = resnet_serve_client.cli:main" in entry_points


def test_gpu_runtime_resolves_to_the_pinned_onnxruntime_gpu_and_no_torch(
    wheels: Path, tmp_path: Path
) -> None:
    df = dockerfile.load()
    stage = df.stage("runtime")
    (step,) = _steps(stage, "pip install")
    installed = _resolve(_requirements(step, df, stage, wheels), _python_version(df, stage),
                         tmp_path)  # fmt: skip
    assert installed["onnxruntime-gpu"] == df.global_args["ORT_VERSION"]
    assert {"resnet-serve", "resnet-serve-client", "grpcio", "prometheus-client"} <= set(installed)
    assert "onnxruntime" not in installed
    assert not [n for n in installed if NEVER_IN_RUNTIME.match(n)], sorted(installed)


def test_cpu_runtime_installs_the_cpu_onnxruntime_and_no_torch(
    wheels: Path, tmp_path: Path
) -> None:
    df = dockerfile.load()
    stage = df.stage("runtime-cpu")
    (step,) = _steps(stage, "pip install")
    installed = _resolve(_requirements(step, df, stage, wheels), _python_version(df, stage),
                         tmp_path)  # fmt: skip
    assert installed["onnxruntime"] == df.global_args["ORT_VERSION"]
    assert "onnxruntime-gpu" not in installed, "the service's wheel pulls no GPU build"
    assert {"resnet-serve", "resnet-serve-client", "grpcio", "prometheus-client"} <= set(installed)
    assert not [n for n in installed if NEVER_IN_RUNTIME.match(n)], sorted(installed)
