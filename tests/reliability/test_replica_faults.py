"""Faults of one replica out of three, on loopback: SIGKILL under load, SIGSTOP.

- SIGKILL of one replica while calls are queued on it (its in-flight gauge above 0 at
  the kill): no call fails, with the SDK's retries (`ChannelOptions(retry=Retry(),
  wait_for_ready=True)`) over an `ipv4:` round-robin target and through nginx, and with
  tritonclient given the same gRPC retry policy as channel arguments.
- SIGSTOP of one replica: calls to it end DEADLINE_EXCEEDED within their deadline
  (plus `DEADLINE_SLACK`), never hang; the SDK's keepalive (`Keepalive(time=1,
  timeout=1)`) drops the frozen connection, so calls started `DETECT_BOUND` seconds
  after the stop all go to the other replicas and succeed.
- The server's side: a client that stops answering pings (its process SIGSTOPped)
  with a call queued has its call cancelled and freed — the in-flight gauge back at
  0 — within `FREED_BOUND` seconds with `--keepalive-time 1 --keepalive-timeout 1`;
  its image leaves the queue (`resnet_serve_queue_depth` 0) when its batch window
  (`max_queue_delay_us`, here 10 s) closes, dropped before compute.

The replicas serve the CIFAR net with a 50 ms queue delay, so calls are in flight
on the replica when it is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench import serving
from tests.deploy import nginx, procs
from tests.reliability.repos import derive

MODEL = "cifar"
SERVER_FLAGS = (
    "--instances", "1", "--intra-op-threads", "1", "--decode-workers", "1",
    "--min-ping-interval", "0.5",  # the clients here ping every second
)  # fmt: skip
QUEUE_DELAY_US = 50_000  # a call waits this long for its batch: it is in flight at a kill
CONCURRENCY = 6  # client threads
BEFORE = 20  # calls answered before the fault
AFTER = 40  # calls answered after it
CALL_TIMEOUT = 30.0  # per call, in the SIGKILL test

DEADLINE = 2.0  # per call, in the SIGSTOP test
DEADLINE_SLACK = 0.5  # a call to the stopped replica ends within DEADLINE + this
KEEPALIVE_TIME, KEEPALIVE_TIMEOUT = 1.0, 1.0
DETECT_BOUND = 6.0  # calls started this long after SIGSTOP all succeed

SERVER_KEEPALIVE = ("--keepalive-time", "1", "--keepalive-timeout", "1")
HELD_QUEUE_DELAY_US = 10_000_000  # the held call's batch window: 10 s, past FREED_BOUND
FREED_BOUND = 5.0  # the stopped client's call is freed within this (keepalive 1 + 1 s)

pytestmark = pytest.mark.skipif(
    nginx.find() is None and not os.environ.get("CI"),
    reason="nginx is not installed (`make deps-system` installs it as root)",
)


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("replica-faults") / "models"
    repo.mkdir()
    derive(repo, model_repo / MODEL, max_batch_size=8, max_queue_delay_us=QUEUE_DELAY_US)
    return repo


def _metrics_port(server: serving.Server) -> int:
    return int(server.metrics_url.rsplit(":", 1)[1].split("/")[0])


def _gauge(server: serving.Server, name: str) -> float:
    return sum(v for k, v in procs.scrape(_metrics_port(server)).items()
               if k.startswith(name + "{"))  # fmt: skip


class Replicas:
    """Three servers; a killed or stopped one is brought back on its own ports."""

    def __init__(self, repo: Path, logs: Path) -> None:
        self.repo, self.logs, self.starts = repo, logs, 0
        self.servers = [self._start() for _ in range(3)]

    def _start(self, like: serving.Server | None = None) -> serving.Server:
        self.starts += 1
        log = self.logs / f"server-{self.starts}.log"
        if like is None:
            return serving.start(self.repo, log, SERVER_FLAGS)
        port = int(like.address.rsplit(":", 1)[1])
        return serving.start(self.repo, log, SERVER_FLAGS, port=port,
                             metrics_port=_metrics_port(like))  # fmt: skip

    def heal(self) -> None:
        for i, server in enumerate(self.servers):
            if server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
            else:
                self.servers[i] = self._start(like=server)

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(s.address for s in self.servers)

    def stop(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                os.kill(server.process.pid, signal.SIGCONT)
                server.stop()


@pytest.fixture(scope="module")
def replicas(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    started = Replicas(repo, tmp_path_factory.mktemp("replica-logs"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def healthy(replicas: Replicas) -> Iterator[Replicas]:
    replicas.heal()
    yield replicas
    replicas.heal()


@dataclass
class Outcome:
    started: float  # monotonic
    seconds: float
    error: str | None  # the status code's name, None for OK


@dataclass
class Load:
    """CONCURRENCY threads making one call each in a loop until told to stop."""

    call: Callable[[], None]
    code_of: Callable[[Exception], str]
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.threads = [threading.Thread(target=self._worker, daemon=True)
                        for _ in range(CONCURRENCY)]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def _worker(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                self.call()
                error = None
            except Exception as exc:
                error = self.code_of(exc)
            with self.lock:
                self.outcomes.append(Outcome(start, time.monotonic() - start, error))

    def ok_since(self, moment: float) -> int:
        with self.lock:
            return sum(o.error is None and o.started >= moment for o in self.outcomes)

    def wait_ok(self, count: int, since: float = 0.0, limit: float = 60.0) -> None:
        procs.wait_until(lambda: self.ok_since(since) >= count, None,
                         f"{count} calls answered", limit=limit, every=0.01)  # fmt: skip

    def finish(self) -> list[Outcome]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=CALL_TIMEOUT + 10)
        return self.outcomes


def _sdk(target: str, **options: object) -> tuple[Callable[[], None], Callable[[], None]]:
    from resnet_serve_client import ChannelOptions, Client

    client = Client(target, model=MODEL, timeout=options.pop("timeout", CALL_TIMEOUT),
                    options=ChannelOptions(**options))  # type: ignore[arg-type]  # fmt: skip
    image = procs.jpeg(32)

    def call() -> None:
        (result,) = client.classify(image, top_k=1)
        assert result.model == MODEL

    return call, client.close


def _sdk_code(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return code.name if isinstance(code, grpc.StatusCode) else type(exc).__name__


# The gRPC service config a tritonclient user passes as channel arguments: the same
# retry policy as the SDK's `Retry()` default, for the v2 service.
TRITON_RETRY_CONFIG = (
    '{"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [{'
    '"name": [{"service": "inference.GRPCInferenceService"}], "waitForReady": true, '
    '"retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "5s", '
    '"backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}}]}'
)


def _tritonclient(target: str) -> tuple[Callable[[], None], Callable[[], None]]:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(target, channel_args=[
        ("grpc.service_config", TRITON_RETRY_CONFIG), ("grpc.enable_retries", 1),
    ])  # fmt: skip
    (spec,) = client.get_model_metadata(MODEL).inputs
    shape = [1, *(int(d) for d in spec.shape[1:])]
    data = triton.InferInput(spec.name, shape, "FP32")
    data.set_data_from_numpy(np.zeros(shape, np.float32))

    def call() -> None:
        result = client.infer(MODEL, [data], client_timeout=CALL_TIMEOUT)
        assert result.get_response().model_name == MODEL

    return call, client.close


def _triton_code(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return str(status()).removeprefix("StatusCode.") if callable(status) else type(exc).__name__


def _kill_with_calls_in_flight(victim: serving.Server) -> tuple[float, float]:
    """SIGKILL `victim` at a moment its in-flight gauge is above 0: when, and the gauge."""
    seen = [0.0]

    def in_flight() -> bool:
        seen[0] = _gauge(victim, "resnet_serve_inflight_requests")
        return seen[0] > 0

    procs.wait_until(in_flight, None, "calls in flight on the replica", limit=30, every=0.005)
    victim.process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    victim.process.wait(timeout=10)
    return killed, seen[0]


@pytest.mark.parametrize("client", ["sdk-round-robin", "sdk-nginx", "tritonclient"])
def test_sigkill_of_a_replica_under_load_fails_no_call(
    healthy: Replicas, client: str, tmp_path: Path
) -> None:
    from resnet_serve_client import Retry

    proxy = None
    if client == "sdk-nginx":
        proxy = nginx.start(tmp_path / "nginx", [s.address for s in healthy.servers])
        # behind nginx a stream reset by the dying replica can arrive as CANCELLED
        retry = Retry(also_on=(grpc.StatusCode.CANCELLED,))
        call, close = _sdk(proxy.address, retry=retry, wait_for_ready=True)
        code_of = _sdk_code
    elif client == "sdk-round-robin":
        call, close = _sdk(healthy.target, retry=Retry(), wait_for_ready=True)
        code_of = _sdk_code
    else:
        call, close = _tritonclient(healthy.target)
        code_of = _triton_code
    load = Load(call, code_of)
    try:
        load.wait_ok(BEFORE)
        killed, in_flight = _kill_with_calls_in_flight(healthy.servers[0])
        load.wait_ok(AFTER, since=killed)
    finally:
        outcomes = load.finish()
        close()
        if proxy is not None:
            proxy.stop()
    failed = [o.error for o in outcomes if o.error is not None]
    assert failed == [], f"{len(failed)} of {len(outcomes)} calls failed: {failed[:10]}"
    assert len(outcomes) >= BEFORE + AFTER
    print(f"\nSIGKILL, {client}: {len(outcomes)} calls, none failed; {in_flight:g} in flight "
          f"on the replica just before the kill")  # fmt: skip


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive", "no-keepalive-control"])
def test_sigstop_of_a_replica_deadlines_fire_and_keepalive_moves_calls(
    healthy: Replicas, keepalive: bool
) -> None:
    """Every call ends within its deadline. With keepalive, the calls in flight on the
    frozen replica end UNAVAILABLE when its ping goes unanswered and are retried on
    another, and every call started `DETECT_BOUND` s after the stop succeeds; without
    (the control), calls go on reaching the frozen replica and ending DEADLINE_EXCEEDED."""
    from resnet_serve_client import Keepalive, Retry

    pings = Keepalive(time=KEEPALIVE_TIME, timeout=KEEPALIVE_TIMEOUT) if keepalive else None
    call, close = _sdk(healthy.target, retry=Retry(), timeout=DEADLINE, keepalive=pings)
    frozen = healthy.servers[1]
    load = Load(call, _sdk_code)
    try:
        load.wait_ok(BEFORE)
        frozen.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        load.wait_ok(AFTER, since=stopped + DETECT_BOUND, limit=DETECT_BOUND + 60)
    finally:
        outcomes = load.finish()
        os.kill(frozen.process.pid, signal.SIGCONT)
        close()
    failed = [o for o in outcomes if o.error is not None]
    assert {o.error for o in failed} <= {"DEADLINE_EXCEEDED"}, [o.error for o in failed]
    slowest = max(o.seconds for o in outcomes)
    assert slowest <= DEADLINE + DEADLINE_SLACK, f"a call took {slowest:.2f} s"
    late = [o for o in failed if o.started >= stopped + DETECT_BOUND]
    print(f"\nSIGSTOP, keepalive {keepalive}: {len(outcomes)} calls, {len(failed)} "
          f"DEADLINE_EXCEEDED ({len(late)} started {DETECT_BOUND:g} s or more after the "
          f"stop); slowest call {slowest:.2f} s")  # fmt: skip
    if keepalive:
        assert late == [], f"{len(late)} calls failed after the detection bound"
    else:
        assert late, "without keepalive the frozen replica keeps its share of calls"


HELD_CALL = textwrap.dedent("""
    import sys, time
    import grpc
    from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
    from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
    channel = grpc.insecure_channel(sys.argv[1])
    image = pb.Image(encoded=sys.stdin.buffer.read())
    request = pb.ClassifyRequest(model=sys.argv[2], images=[image])
    future = pb_grpc.ClassifierStub(channel).Classify.future(request, timeout=300)
    print("started", flush=True)
    time.sleep(300)
""")  # fmt: skip


@pytest.fixture
def held_server(model_repo: Path, tmp_path: Path) -> Iterator[serving.Server]:
    repo = tmp_path / "models"
    repo.mkdir()
    derive(repo, model_repo / MODEL, max_batch_size=8, max_queue_delay_us=HELD_QUEUE_DELAY_US)
    server = serving.start(repo, tmp_path / "server.log", (*SERVER_FLAGS, *SERVER_KEEPALIVE))
    yield server
    server.stop()


def test_a_client_that_stops_answering_pings_has_its_call_freed(
    held_server: serving.Server,
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HELD_CALL, held_server.address, MODEL],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(procs.jpeg(32))
        child.stdin.close()
        assert child.stdout.readline().strip() == b"started"

        def inflight() -> float:
            return _gauge(held_server, "resnet_serve_inflight_requests")

        procs.wait_until(lambda: inflight() == 1, child, "the call in flight", limit=30)
        child.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        procs.wait_until(lambda: inflight() == 0, None, "the call freed",
                         limit=FREED_BOUND + 10, every=0.05)  # fmt: skip
        freed = time.monotonic() - stopped
        assert freed <= FREED_BOUND, f"freed after {freed:.2f} s"
        # its image leaves the queue when its batch window closes (dropped, not computed)
        window = HELD_QUEUE_DELAY_US / 1e6
        procs.wait_until(lambda: _gauge(held_server, "resnet_serve_queue_depth") == 0, None,
                         "the queue emptied", limit=window + 5, every=0.05)  # fmt: skip
        dropped = time.monotonic() - stopped
        assert held_server.serving()
        print(f"\nheld call freed {freed:.2f} s after the client stopped, "
              f"its queued image {dropped:.2f} s after")  # fmt: skip
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait(timeout=10)
