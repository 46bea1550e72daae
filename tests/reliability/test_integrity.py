"""Integrity of the repository: killed builds, and versions the runtime cannot open.

A build killed midway (SIGKILL, no cleanup runs) leaves no version in the repository.

The builder assembles a version in ``<repo>/<name>/.tmp-*`` and renames it
into place only after every check passed (builder/repository.py). The test
kills ``resnet-serve build`` the moment the staged ``model.onnx`` appears
(exported, not yet verified or published), then checks that no version
directory, config.json or labels.txt exists, that ``resnet-serve models``
lists nothing, and that the next build of the same name publishes version 1
as if nothing had happened. A killed build's ``.tmp-*`` directory stays
behind: the server and the builder ignore it, an operator may delete it.

A version whose sha256 matches but which ONNX Runtime cannot open is
refused with one log line, callers see a reason without paths or runtime
internals, and the other model serves.

A version whose ``model.onnx`` is a link out of the repository is refused with the
file named, in the server and in ``resnet-serve models``, while the other model serves.

Refusing tampered (sha256), failed and never-verified versions while the
other models serve, with their log lines: tests/server/core/test_manager.py
(test_refused_versions_full_queue_no_reflection_and_sigint).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from builder.repository import LOCK_SUFFIX, TMP_PREFIX
from server.core.loader import LOAD_FAILED
from server.repository import MODEL_FILE, VERIFICATION_FILE
from tests.fixtures.servers import InProcessServer
from tests.reliability.repos import derive
from tests.security.leaks import leaks

RESNET_SERVE = str(Path(sys.executable).with_name("resnet-serve"))
NAME = "killed"
BUILD_TIMEOUT = 300.0


def build(repo: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [RESNET_SERVE, "build", "resnet20", "--repo", str(repo), "--name", NAME],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def staged_model(model_dir: Path) -> Path | None:
    found = sorted(model_dir.glob(f"{TMP_PREFIX}*/model.onnx")) if model_dir.is_dir() else []
    return found[0] if found else None


def kill_when_staged(repo: Path, log: Path) -> Path:
    """Run a build and SIGKILL it once its model.onnx is staged; the staged file's path."""
    process = build(repo, log)
    deadline = time.monotonic() + BUILD_TIMEOUT
    try:
        while (staged := staged_model(repo / NAME)) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the build ended before it was caught staging:\n{log.read_text()}")
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    return staged


def models_listing(repo: Path) -> str:
    return subprocess.run(
        [RESNET_SERVE, "models", "--repo", str(repo)], capture_output=True, text=True, check=True,
        timeout=120,
    ).stdout  # fmt: skip


def test_build_killed_midway_leaves_no_version(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    staged = kill_when_staged(repo, tmp_path / "killed-build.log")

    model_dir = repo / NAME
    left = sorted(p.name for p in model_dir.iterdir())
    staging = staged.parent.name
    assert left == [staging, staging + LOCK_SUFFIX], left  # only the staging, no version
    assert models_listing(repo).rstrip().endswith(": no models")

    finished = build(repo, tmp_path / "build.log")
    assert finished.wait(BUILD_TIMEOUT) == 0, (tmp_path / "build.log").read_text()
    assert (model_dir / "1" / "verification.json").is_file()
    assert not (model_dir / "2").exists()
    # The next build removed what the killed one left, and said so.
    assert not any(p.name.startswith(TMP_PREFIX) for p in model_dir.iterdir())
    assert f"removed {staged.parent}, left by a build" in (tmp_path / "build.log").read_text()
    row = next(line.split() for line in models_listing(repo).splitlines()
               if line.startswith(f"{NAME} "))  # fmt: skip
    assert row[1] == "resnet20" and row[7:9] == ["1", "fp32"] and "verified" in row, row


def test_a_version_the_runtime_cannot_open_is_refused(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    repo = tmp_path / "repo"
    derive(repo, model_repo / "cifar")
    version = derive(repo, model_repo / "cifar", "unloadable") / "1"
    (version / MODEL_FILE).unlink()  # a hard link: replace, never write
    (version / MODEL_FILE).write_bytes(b"not an ONNX graph, with a matching sha256")
    report = json.loads((version / VERIFICATION_FILE).read_text())
    report["sha256"] = hashlib.sha256((version / MODEL_FILE).read_bytes()).hexdigest()
    (version / VERIFICATION_FILE).unlink()
    (version / VERIFICATION_FILE).write_text(json.dumps(report))

    server = inprocess_factory(repo)
    refused = [line for line in server.log().splitlines()
               if "model unloadable version 1 refused:" in line]  # fmt: skip
    assert len(refused) == 1, server.log()
    assert server.health("unloadable") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.health("cifar") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        info = stub.GetModel(pb.GetModelRequest(name="unloadable"), timeout=30)
    (state,) = info.versions
    assert (state.state, state.reason) == (pb.VersionInfo.UNAVAILABLE, LOAD_FAILED)
    assert leaks(state.reason, repo) == []


def test_a_version_linked_out_of_the_repository_is_refused(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    repo = tmp_path / "repo"
    derive(repo, model_repo / "cifar")
    version = derive(repo, model_repo / "cifar", "linked") / "1"
    (version / MODEL_FILE).unlink()  # the very graph, verified, but reached by a link out
    (version / MODEL_FILE).symlink_to((model_repo / "cifar" / "1" / MODEL_FILE).resolve())
    why = "1/model.onnx leads outside the model repository (a symbolic link); not served"

    server = inprocess_factory(repo)
    refused = [line for line in server.log().splitlines()
               if "model linked version 1 refused:" in line]  # fmt: skip
    assert len(refused) == 1 and refused[0].endswith(why), server.log()
    assert server.health("linked") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.health("cifar") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        info = stub.GetModel(pb.GetModelRequest(name="linked"), timeout=30)
    (state,) = info.versions
    assert (state.state, state.reason) == (pb.VersionInfo.UNAVAILABLE, why)
    assert leaks(state.reason, repo) == []
    row = next(line for line in models_listing(repo).splitlines() if line.startswith("linked "))
    assert "outside repository" in row, row
