"""Health that means something: a model version whose session runs keep failing, or one
whose run hangs past ``--session-run-timeout``, stops serving — grpc.health.v1 NOT_SERVING
for its name, v2 ModelReady false, calls UNAVAILABLE, one log line saying why — while the
other models and the server stay SERVING. (A dead batch scheduler and a session that left
the GPU take the same way: `server.core.health.Health.not_serving`.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from tests.reliability import images
from tests.reliability.repos import derive
from tests.reliability.wire import call, classify
from tests.security.test_exposure import add_broken_model

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def until_health(server: Any, name: str, status: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while server.health(name) != status:
        assert time.monotonic() < deadline, f"{name!r} never {status}:\n{server.log()}"
        time.sleep(0.05)


def model_ready(server: Any, name: str) -> bool:
    with server.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelReady(v2.ModelReadyRequest(name=name), timeout=10).ready


def test_failing_batches_turn_the_model_not_serving(
    model_repo: Path, tmp_path: Path, inprocess_factory: Any
) -> None:
    repo = tmp_path / "repo"
    derive(repo, model_repo / "cifar")
    add_broken_model(repo, model_repo / "cifar")
    server = inprocess_factory(repo, "--max-failed-batches", "2")
    photo = images.jpeg(images.photo())
    with server.channel() as channel:
        code, _, _ = call(channel, classify("broken", photo, photo))
        assert code is grpc.StatusCode.INTERNAL
        assert server.health("broken") == SERVING  # one failure is not a pattern
        code, _, _ = call(channel, classify("broken", photo, photo))
        assert code is grpc.StatusCode.INTERNAL
        until_health(server, "broken", NOT_SERVING)
        assert not model_ready(server, "broken")
        code, details, _ = call(channel, classify("broken", photo))
        assert code is grpc.StatusCode.UNAVAILABLE, details
        assert "model 'broken' has no READY version" in details
        assert call(channel, classify("cifar", photo))[0] is grpc.StatusCode.OK
    assert server.health("cifar") == SERVING and server.health() == SERVING
    assert model_ready(server, "cifar")
    assert ("model broken version 1 UNAVAILABLE, no longer serving: 2 session runs in a row "
            "failed (max_failed_batches 2)") in server.log()  # fmt: skip


def test_a_session_run_past_its_bound_turns_the_model_not_serving(
    model_repo: Path, tmp_path: Path, inprocess_factory: Any
) -> None:
    derive(tmp_path / "repo", model_repo / "cifar")
    server = inprocess_factory(tmp_path / "repo", "--session-run-timeout", "0.000001")
    with server.channel() as channel:
        # the run goes on past the bound: its caller still gets the answer
        code, details, _ = call(channel, classify("cifar", images.one_pixel()))
        assert code is grpc.StatusCode.OK, details
    until_health(server, "cifar", NOT_SERVING)
    until_health(server, "", NOT_SERVING)  # its only model
    assert not model_ready(server, "cifar")
    assert ("model cifar version 1 UNAVAILABLE, no longer serving: a session run has taken "
            "more than 1e-06 s (session_run_timeout)") in server.log()
