"""A real server as a subprocess: ``resnet-serve serve`` on loopback ports, waited for via
gRPC health. The one harness that the bench and the tests start processes with.

``start(repo, log_path, flags)`` returns once grpc.health.v1 says SERVING for ""
(every model loaded and warmed); ``Server.stop()`` sends SIGTERM and returns the
exit code. ``running(...)`` is the bench's form: a context manager, on CPU,
without reflection.

A server started with ``--tls-cert`` needs ``credentials`` (the client side,
``grpc.ssl_channel_credentials(...)``) for its health checks.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVE = [str(Path(sys.executable).with_name("resnet-serve")), "serve"]
ROOT = Path(__file__).resolve().parent.parent  # the checkout: git runs there
START_TIMEOUT = 300.0
STOP_TIMEOUT = 60.0


class StartError(RuntimeError):
    """The server exited or did not become SERVING in time; the message holds its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(kw_only=True)
class Endpoints:
    """Where a server answers, and the calls made there: gRPC channel, /metrics, health."""

    address: str
    metrics_url: str
    credentials: grpc.ChannelCredentials | None = None
    http_url: str | None = None  # the HTTP/REST port's base URL, ``http://host:port``

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def health(self, service: str = "") -> int:
        """The health status of `service` (health_pb2.HealthCheckResponse values)."""
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=service)
            return stub.Check(request, timeout=5).status

    def serving(self) -> bool:
        return self.health() == health_pb2.HealthCheckResponse.SERVING


@dataclass(kw_only=True)
class Server(Endpoints):
    """``resnet-serve serve`` running as a subprocess, its output in `log_path`."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all threads."""
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def settings_lines(self) -> list[str]:
        """The server's log lines saying how each model runs (provider, threads, instances)."""
        pattern = re.compile(r"intra-op thread|READY in|decode")
        return [line.strip() for line in self.log().splitlines() if pattern.search(line)]

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` (unless it has exited) and wait; killed if it outlasts `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start(
    repo: Path,
    log_path: Path,
    flags: Sequence[str] = (),
    *,
    port: int | None = None,
    metrics_port: int | None = None,
    http_port: int | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    attempts: int = 3,
    serving: bool = True,
    command: Sequence[str] = SERVE,
) -> Server:
    """`resnet-serve serve` over `repo` on loopback, SERVING; its output goes to `log_path`.
    With ``serving=False`` it returns as soon as the port answers health, whatever it says
    (models may still be loading).

    Ports not given (gRPC, metrics, HTTP) are free ones, chosen again (up to `attempts`
    times) if another process took one first. ``env`` adds variables (``RESNET_SERVE_*``
    settings) to this process's environment; ``cwd`` is its working directory (this
    process's when None). ``command`` is the program given these flags
    (the bench's floor server, `bench.floor`, takes them too). Raises `StartError`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        grpc_port, scrape_port = port or free_port(), metrics_port or free_port()
        rest_port = http_port or free_port()
        argv = [
            *command, "--repo", str(repo),
            "--host", "127.0.0.1", "--port", str(grpc_port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(scrape_port),
            "--http-port", str(rest_port),
            *flags,
        ]  # fmt: skip
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        server = Server(
            address=f"127.0.0.1:{grpc_port}",
            metrics_url=f"http://127.0.0.1:{scrape_port}/metrics",
            http_url=f"{'http' if credentials is None else 'https'}://127.0.0.1:{rest_port}",
            credentials=credentials,
            process=process,
            log_path=log_path,
        )
        if _wait_serving(server, time.monotonic() + START_TIMEOUT, serving):
            return server
        if process.poll() is None:
            process.kill()
            process.wait()
            raise StartError(f"server not SERVING after {START_TIMEOUT:.0f} s:\n{server.log()}")
        chosen = port is None or metrics_port is None or http_port is None
        if not chosen or attempt == attempts - 1 or "bind" not in server.log().lower():
            raise StartError(f"server exited with {process.returncode}:\n{server.log()}")
    raise AssertionError("unreachable")


def baseline_command(revision: str, into: Path) -> list[str]:
    """A `start` ``command`` that serves like ``resnet-serve serve`` with the ``server``
    package of `revision` (unpacked into ``into/<commit>`` from ``git archive``) ahead of
    this tree's: the bench's way to set a server of another commit beside this one's.
    SystemExit naming `revision` where git cannot resolve it (`commit_of`)."""
    commit = commit_of(revision, short=False)
    target = into / commit[:12]
    if not (target / "server").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = _git("archive", "--format=tar", commit, "server")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    code = (
        f"import sys, runpy; sys.path.insert(0, {str(target)!r}); "
        "runpy.run_module('server', run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", code]


def commit_of(revision: str, *, short: bool = True) -> str:
    """`revision`'s commit (abbreviated as git does unless not `short`); SystemExit naming
    it where git cannot resolve it in this checkout."""
    length = ["--short"] if short else []
    try:
        return _git("rev-parse", *length, "--verify", f"{revision}^{{commit}}").decode().strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        why = getattr(exc, "stderr", b"") or str(exc).encode()
        raise SystemExit(
            f"no commit {revision!r} in {ROOT}: {why.decode(errors='replace').strip()}"
        ) from exc


def _git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True).stdout


def _wait_serving(server: Server, deadline: float, serving: bool = True) -> bool:
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        with contextlib.suppress(grpc.RpcError):
            if server.serving() or not serving:
                return True
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def running(repo: Path, log_path: Path, flags: list[str]) -> Iterator[Server]:
    """A SERVING server over `repo` on CPU, without reflection, with extra `flags`;
    SIGTERM and wait on exit."""
    server = start(repo, log_path, ["--device", "cpu", "--no-reflection", *flags])
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()
