"""The server under test: ``resnet-serve serve`` as a subprocess on free loopback ports."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT = 300.0
STOP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    address: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all threads."""
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def settings_lines(self) -> list[str]:
        """The server's log lines saying how each model runs (provider, threads, instances)."""
        pattern = re.compile(r"intra-op thread|READY in|decode")
        return [line.strip() for line in self.log().splitlines() if pattern.search(line)]

    def serving(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        return status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def running(repo: Path, log_path: Path, flags: list[str]) -> Iterator[Server]:
    """A SERVING server over `repo` with extra `flags`; SIGTERM and wait on exit."""
    port, metrics_port = free_port(), free_port()
    command = [
        str(Path(sys.executable).with_name("resnet-serve")),
        "serve",
        "--repo",
        str(repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
        "--device",
        "cpu",
        "--no-reflection",
        *flags,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(
        f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", process, log_path
    )
    try:
        _wait_serving(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_serving(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(grpc.RpcError):
            if server.serving():
                return
        time.sleep(0.2)
    raise RuntimeError(f"server not SERVING after {START_TIMEOUT:.0f} s:\n{server.log()}")
