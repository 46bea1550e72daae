"""The images' HEALTHCHECK probe (server/healthcheck.py) against a real grpc health service.

A grpc server with grpcio-health-checking's own servicer stands in for every
state the probe must tell apart; the probe runs as the image runs it
(`python -m server.healthcheck ADDRESS`). The server's own health service is
probed as the HEALTHCHECK in tests/deploy/test_image_commands.py and in the
containers of tests/deploy/test_containers.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench import serving
from tests.deploy import procs
from tests.deploy.dockerfile import ROOT

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def probe(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.healthcheck", address, *args],
        cwd=ROOT, env=procs.clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_serving_and_not_serving(service: tuple[str, health.HealthServicer]) -> None:
    address, servicer = service
    servicer.set("", SERVING)
    result = probe(address)
    assert result.returncode == 0 and result.stdout.strip() == "SERVING", result
    servicer.set("", NOT_SERVING)  # warming up or draining
    assert probe(address).returncode == 1
    servicer.set("", SERVING)


def test_a_named_service(service: tuple[str, health.HealthServicer]) -> None:
    address, servicer = service
    servicer.set("resnet50", SERVING)
    servicer.set("resnet18", NOT_SERVING)
    assert probe(address, "--service", "resnet50").returncode == 0
    assert probe(address, "--service", "resnet18").returncode == 1
    # unknown: NOT_FOUND in the trailers, no answer message
    assert probe(address, "--service", "no-such-model").returncode == 1


def test_nothing_listening() -> None:
    result = probe(f"127.0.0.1:{serving.free_port()}")
    assert result.returncode == 1 and "Refused" in result.stderr


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        started = time.monotonic()
        result = probe(f"127.0.0.1:{listener.getsockname()[1]}", "--timeout", "1")
    assert result.returncode == 1 and "timed out" in result.stderr
    assert time.monotonic() - started < 30


def test_imports_no_grpc() -> None:
    """What makes it cheap: the standard library only."""
    code = ("import sys, server.healthcheck; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('grpc', 'google', 'resnet_serve_client', 'numpy', 'asyncio', 'ssl')))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=procs.clean_env(),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
