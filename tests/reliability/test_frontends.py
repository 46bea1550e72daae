"""Faults of the engine and its front ends (``resnet-serve serve --frontends N``), on real
processes, with real gRPC clients, over the null model (`bench.null_model`: uint8 in,
microseconds of compute) with a 20 ms batch window, so calls are always in flight.

Each client channel has a TCP connection of its own (``grpc.use_local_subchannel_pool``);
which front end accepted it is read from /proc (psutil): the client's local port among
the server-side connections of each ``rs-frontend-<i>``. So a call's outcome is known
together with the front end that served its connection.

- SIGKILL of one front end under load: another ``rs-frontend-<i>`` (a new pid) replaces
  it; the calls that fail are on the killed front end's connections and fail UNAVAILABLE,
  among them one held in the engine's queue at the kill (on `HELD`, whose batch window
  outlasts the test); every call on the other connections succeeds; new connections
  reach the replacement and are answered.
- Repeated SIGKILLs of front ends under load (5 here, 50 marked ``soak``): afterwards no
  segment name of the engine is left in /dev/shm, the engine maps exactly one segment
  per live front end, and its shared memory (``RssShmem``) and RSS are back near their
  baseline (`SHMEM_SLACK`, `RSS_SLACK` say how near and why).
- A call held on a front end is counted in its row of the engine's tally (the
  server-wide limits); killed, its row is cleared before a front end replaces it.
- A shared-memory registration through one front end waits for the other's ``sync``:
  not answered while that front end is stopped (SIGSTOP), answered once it runs again.
- SIGKILL of the engine: every front end's health is NOT_SERVING (or its connection
  refused) within `ENGINE_GONE_BOUND`, every front end exits non-zero, no process of the
  server remains, and the calls under way end OK or UNAVAILABLE, none hangs. The front
  ends, orphaned, are collected by this process made a child subreaper, so their exit
  codes can be read.
- SIGTERM under load with every front end taking calls: no call lost (each OK, or
  UNAVAILABLE refused before it was accepted: the drain's refusal or a refused
  connection, as tests/reliability/test_drain.py defines it), calls in flight at the
  signal answered after it, engine exit code 0, every front end gone, no segment left.
- The segments: each mapped by the engine is 0600, has no name any more, and is named
  ``resnet-serve.<engine pid>.<hex>`` with at least 64 random bits, different for every
  front end; a stale name of a dead engine pid is removed at start, one of a live pid kept.
- ``ps -o comm`` shows ``rs-engine`` and ``rs-frontend-0`` … ``rs-frontend-<N-1>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from bench import null_model, serving
from server.shm import Tally
from tests.reliability.load import until_gauges, until_idle
from tests.reliability.repos import derive
from tests.reliability.wire import classify, infer, uint8_image

MODEL = null_model.NAME
FRONTENDS = 2
QUEUE_DELAY_US = 20_000  # a call waits this long for its batch: calls are in flight at a kill
HELD = "held"  # the null model again, waiting HELD_DELAY_US for a batch: a call on it is
HELD_DELAY_US = 600_000_000  # in flight until its deadline, or until its front end dies
GRACE_SECONDS = 20.0
FLAGS = (
    "--frontends", str(FRONTENDS), "--device", "cpu", "--instances", "1",
    "--intra-op-threads", "1", "--decode-workers", "1", "--grace-period", str(GRACE_SECONDS),
)  # fmt: skip
CALL_TIMEOUT = 30.0
PER_FRONTEND = 2  # client connections on each front end, at least
MAX_CONNECTIONS = 40  # opened at most to get them (SO_REUSEPORT spreads them by hash)
# generous: the machine may be busy; none of these is a speed requirement
REPLACED_WITHIN = 60.0  # a killed front end's successor serving
SETTLE_WITHIN = 30.0
# requirement: after the engine dies, health is NOT_SERVING (or the port refuses) within this
ENGINE_GONE_BOUND = 1.0
FRONTENDS_EXIT_WITHIN = 15.0  # they take ENGINE_GONE_GRACE (2 s) at most; margin for a busy box

SHM = Path("/dev/shm")
REFUSED = re.compile(r"^server is shutting down; retry|failed to connect|connection refused", re.I)
SEGMENT = re.compile(r"resnet-serve\.(\d+)\.([0-9a-f]+)")
LOCAL_POOL = (("grpc.use_local_subchannel_pool", 1),)
PIXELS = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = tmp_path_factory.mktemp("null-built")
    null_model.build(built)
    repo = tmp_path_factory.mktemp("frontends") / "models"
    repo.mkdir()
    derive(repo, built / MODEL, max_batch_size=8, max_queue_delay_us=QUEUE_DELAY_US)
    derive(repo, built / MODEL, HELD, max_batch_size=8, max_queue_delay_us=HELD_DELAY_US)
    return repo


# the server's processes


class Cluster:
    """A running ``resnet-serve serve --frontends N``: the engine and its front ends."""

    def __init__(self, server: serving.Server) -> None:
        self.server = server
        self.engine = psutil.Process(server.process.pid)
        self.port = int(server.address.rsplit(":", 1)[1])
        self.seen: dict[int, psutil.Process] = {}  # every front end met, for the teardown

    def frontends(self) -> dict[int, psutil.Process]:
        """The live front ends, by index (a killed one not yet reaped is left out)."""
        found: dict[int, psutil.Process] = {}
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = self.engine.children()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
                if match := re.fullmatch(r"rs-frontend-(\d+)", child.name()):
                    found[int(match[1])] = child
                    self.seen.setdefault(child.pid, child)
        return found

    async def replaced(self, index: int, old_pid: int) -> psutil.Process:
        """The front end started in place of `old_pid`, once it says it serves."""
        deadline = time.monotonic() + REPLACED_WITHIN
        while time.monotonic() < deadline:
            fresh = self.frontends().get(index)
            serving = (
                fresh is not None
                and fresh.pid != old_pid
                and (f"front end {index} (pid {fresh.pid}) serving" in self.server.log())
            )
            if serving:
                assert fresh is not None
                return fresh
            await asyncio.sleep(0.1)
        raise AssertionError(f"front end {index} not replaced in {REPLACED_WITHIN:.0f} s:\n"
                             f"{self.server.log()[-4000:]}")  # fmt: skip

    def mapped_segments(self) -> dict[str, str]:
        """The engine's shared-memory mappings: segment name -> address range."""
        found = {}
        for line in Path(f"/proc/{self.engine.pid}/maps").read_text().splitlines():
            if "/dev/shm/" in line and (match := SEGMENT.search(line)):
                found[match[0]] = line.split()[0]
        return found

    def named_segments(self) -> dict[str, int]:
        """Names in /dev/shm of this engine's segments, with their sizes."""
        sizes = {}
        for path in SHM.glob(f"resnet-serve.{self.engine.pid}.*"):
            with contextlib.suppress(FileNotFoundError):
                sizes[path.name] = path.stat().st_size
        return sizes

    def stop(self) -> None:
        """Teardown: SIGTERM (SIGKILL if it hangs) to the engine, SIGKILL to any front end
        still running, whatever happened before."""
        self.frontends()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.server.stop(timeout=GRACE_SECONDS + serving.STOP_TIMEOUT)
        for process in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.is_running():
                    process.kill()
                    process.wait(10)


@pytest.fixture
def start(repo: Path, tmp_path: Path) -> Iterator[Callable[[], Cluster]]:
    started: list[Cluster] = []

    def start_one() -> Cluster:
        log = tmp_path / "logs" / f"server-{len(started) + 1}.log"
        cluster = Cluster(serving.start(repo, log, FLAGS))
        started.append(cluster)
        assert len(cluster.frontends()) == FRONTENDS, cluster.server.log()
        return cluster

    yield start_one
    for cluster in started:
        cluster.stop()


# clients, each on a connection of its own, knowing which front end serves it


@dataclass
class Connection:
    number: int
    channel: grpc.aio.Channel
    index: int  # the front end that accepted it
    pid: int


def _client_ports(port: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port}  # fmt: skip


def _accepted(cluster: Cluster) -> dict[int, tuple[int, int]]:
    """Client port -> (front-end index, pid), from the front ends' sockets."""
    found = {}
    for index, process in cluster.frontends().items():
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in process.net_connections("tcp"):
                if c.raddr and c.laddr.port == cluster.port:
                    found[c.raddr.port] = (index, process.pid)
    return found


async def connect(cluster: Cluster, number: int) -> Connection:
    """A new channel, connected, and the front end that accepted its connection."""
    for _ in range(5):
        before = _client_ports(cluster.port)
        channel = grpc.aio.insecure_channel(cluster.server.address, options=LOCAL_POOL)
        await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT)
        deadline = time.monotonic() + SETTLE_WITHIN
        while time.monotonic() < deadline:
            new = _client_ports(cluster.port) - before
            if len(new) > 1:  # another connection of this process at the same moment
                break
            if new and (found := _accepted(cluster).get(next(iter(new)))):
                return Connection(number, channel, *found)
            await asyncio.sleep(0.05)
        await channel.close()
    raise AssertionError("cannot tell which front end accepted a new connection")


async def spread(cluster: Cluster, per_frontend: int = PER_FRONTEND) -> list[Connection]:
    """Connections until every front end has accepted `per_frontend` of them; the others
    are closed."""
    kept: list[Connection] = []
    opened = 0
    while True:
        counts = {i: sum(c.index == i for c in kept) for i in range(FRONTENDS)}
        if min(counts.values()) >= per_frontend:
            return kept
        if opened == MAX_CONNECTIONS:
            break
        connection = await connect(cluster, len(kept))
        opened += 1
        if counts[connection.index] < per_frontend:
            kept.append(connection)
        else:
            await connection.channel.close()
    for connection in kept:
        await connection.channel.close()
    raise AssertionError(f"{MAX_CONNECTIONS} connections did not reach every front end "
                         f"{per_frontend} times: {counts}")  # fmt: skip


@dataclass
class Outcome:
    connection: int
    code: str
    details: str
    started: float
    ended: float


@dataclass
class Load:
    """One worker per connection, calling back to back (v1 Classify and v2 ModelInfer on
    alternate connections) until `stop` is set or its `until` says so."""

    connections: list[Connection]
    until: Callable[[Outcome], bool] = lambda _: False
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Load:
        self.tasks = [asyncio.ensure_future(self._worker(c)) for c in self.connections]
        return self

    async def _worker(self, connection: Connection) -> None:
        if connection.number % 2:
            stub = v2_grpc.GRPCInferenceServiceStub(connection.channel)
            request = infer(MODEL, datatype="UINT8", shape=(1, *PIXELS.shape),
                            raw=PIXELS.tobytes())  # fmt: skip
            method = stub.ModelInfer
        else:
            method = pb_grpc.ClassifierStub(connection.channel).Classify
            request = classify(MODEL, uint8_image(PIXELS.shape, PIXELS.tobytes()))
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                await method(request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                code, details = error.code().name, error.details() or ""
            else:
                code, details = "OK", ""
            outcome = Outcome(connection.number, code, details, started, time.monotonic())
            self.outcomes.append(outcome)
            if self.until(outcome):
                return

    def ok(self, number: int, since: float = 0.0) -> int:
        return sum(o.connection == number and o.code == "OK" and o.started >= since
                   for o in self.outcomes)  # fmt: skip

    async def until_each(self, calls: int, since: float = 0.0, within: float = 60.0) -> None:
        """Until every connection has had `calls` answered OK, started after `since`."""
        deadline = time.monotonic() + within
        while any(self.ok(c.number, since) < calls for c in self.connections):
            assert time.monotonic() < deadline, self.report()
            await asyncio.sleep(0.05)

    async def finish(self, within: float = CALL_TIMEOUT + 30) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), within)

    def report(self) -> str:
        counts: dict[tuple[int, str], int] = {}
        for o in self.outcomes:
            counts[o.connection, o.code] = counts.get((o.connection, o.code), 0) + 1
        first = {}
        for o in self.outcomes:
            if o.code != "OK":
                first.setdefault(o.code, o.details)
        on = {c.number: f"{c.index}/{c.pid}" for c in self.connections}
        return f"connection: front end/pid {on}; outcomes {counts}; first details {first}"


async def hold(connection: Connection) -> tuple[str, str]:
    """A v2 call on `HELD` over `connection`: (code, details) once it ends."""
    stub = v2_grpc.GRPCInferenceServiceStub(connection.channel)
    request = infer(HELD, datatype="UINT8", shape=(1, *PIXELS.shape), raw=PIXELS.tobytes())
    try:
        await stub.ModelInfer(request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


@contextlib.asynccontextmanager
async def closing(connections: list[Connection]) -> AsyncIterator[list[Connection]]:
    try:
        yield connections
    finally:
        for connection in connections:
            await connection.channel.close()


# 1. one front end killed under load


async def test_frontend_sigkill_fails_only_its_calls_and_is_replaced(
    start: Callable[[], Cluster],
) -> None:
    cluster = start()
    async with closing(await spread(cluster)) as connections:
        load = Load(connections).start()
        try:
            await load.until_each(3)
            victim = cluster.frontends()[0]
            survivors = {i: p.pid for i, p in cluster.frontends().items() if i != 0}
            # one call certainly in flight on the victim: queued in the engine at the kill
            held = asyncio.ensure_future(hold(next(c for c in connections if c.index == 0)))
            await until_gauges(cluster.server, HELD, depth=1)
            victim.kill()
            fresh = await cluster.replaced(0, victim.pid)
            replaced_at = time.monotonic()
            # every connection is answered again, the killed ones' too (reconnected)
            await load.until_each(3, since=replaced_at)
        finally:
            await load.finish()
        held_code, held_details = await asyncio.wait_for(held, CALL_TIMEOUT)

        on_victim = {c.number for c in connections if c.pid == victim.pid}
        failed = [o for o in load.outcomes if o.code != "OK"]
        report = load.report()
        assert held_code == "UNAVAILABLE", f"the held call: {held_code} {held_details}"
        assert {o.code for o in failed} <= {"UNAVAILABLE"}, report
        assert {o.connection for o in failed} <= on_victim, report
        assert all(o.started < replaced_at for o in failed), report
        assert cluster.engine.is_running()
        assert {i: p.pid for i, p in cluster.frontends().items() if i != 0} == survivors

        # a new connection reaches the replacement, and is answered
        async with closing([]) as extra:
            for number in range(100, 100 + MAX_CONNECTIONS):
                connection = await connect(cluster, number)
                extra.append(connection)
                if connection.pid == fresh.pid:
                    break
            else:
                raise AssertionError("no new connection reached the replacement")
            again = Load([connection]).start()
            try:
                await again.until_each(3)
            finally:
                await again.finish()
            assert {o.code for o in again.outcomes} == {"OK"}, again.report()


# a killed front end's share of the server-wide limits goes with it


def tally(cluster: Cluster) -> np.ndarray:
    """The engine's tally (`server.shm.Tally`: a row per front end, a column per limit),
    read through the engine's descriptor in /proc."""
    for fd in Path(f"/proc/{cluster.engine.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(fd).startswith("/memfd:resnet-serve-tally"):
                return np.frombuffer(fd.read_bytes(), "<i8").reshape(-1, FRONTENDS)
    raise AssertionError("the engine holds no tally")


async def test_a_killed_front_end_holds_nothing_of_the_server_wide_limits(
    start: Callable[[], Cluster],
) -> None:
    """A call held on front end 0 is counted in its row of the tally; once it is killed,
    the engine clears that row before anything replaces the front end (which would start
    its row at zero itself): the limits count only the calls of live front ends."""
    cluster = start()
    async with closing(await spread(cluster, per_frontend=1)) as connections:
        held = asyncio.ensure_future(hold(next(c for c in connections if c.index == 0)))
        await until_gauges(cluster.server, HELD, depth=1)
        calls = Tally.COLUMNS.index("calls")
        assert tally(cluster)[calls].tolist() == [1, 0]
        victim = cluster.frontends()[0]
        victim.kill()

        def replacement() -> psutil.Process | None:
            fresh = cluster.frontends().get(0)
            return fresh if fresh is not None and fresh.pid != victim.pid else None

        deadline = time.monotonic() + SETTLE_WITHIN
        while tally(cluster)[calls][0] != 0:
            assert replacement() is None, "replaced before its row was cleared"
            assert time.monotonic() < deadline, tally(cluster)
            await asyncio.sleep(0.01)
        assert replacement() is None, "replaced before its row was seen cleared"
        assert (await asyncio.wait_for(held, CALL_TIMEOUT))[0] == "UNAVAILABLE"
        await cluster.replaced(0, victim.pid)
        assert not tally(cluster).any()


# a change through one front end is in force on every one when its call returns


async def test_a_registration_returns_once_every_front_end_has_it(
    start: Callable[[], Cluster],
) -> None:
    """A system shared-memory registration through one front end is answered only once the
    other front end has the new table: while that one is stopped (SIGSTOP) the call
    waits; when it runs again the call returns."""
    cluster = start()
    key = f"/resnet-serve-test-{secrets.token_hex(8)}"
    (SHM / key[1:]).write_bytes(bytes(64))
    try:
        async with closing([await connect(cluster, 0)]) as (connection,):
            other = next(p for i, p in cluster.frontends().items() if i != connection.index)
            stub = v2_grpc.GRPCInferenceServiceStub(connection.channel)
            request = v2.SystemSharedMemoryRegisterRequest(name="r", key=key, byte_size=64)
            other.suspend()
            try:
                call = asyncio.ensure_future(
                    stub.SystemSharedMemoryRegister(request, timeout=CALL_TIMEOUT)
                )
                await asyncio.sleep(0.3)  # far below the engine's SYNC_TIMEOUT (2 s)
                assert not call.done(), "answered while a front end had not the new table"
            finally:
                other.resume()
            await call
            status = await stub.SystemSharedMemoryStatus(
                v2.SystemSharedMemoryStatusRequest(), timeout=CALL_TIMEOUT
            )
            assert list(status.regions) == ["r"]
    finally:
        (SHM / key[1:]).unlink()


# 2. many front ends killed under load: shared memory and RSS back near the baseline

# RssShmem counts the pages of the live front ends' segments that requests have touched
# (slots are taken first fit from the start, so: the most calls a front end ever held at
# once, times a slot). A replacement's segment is touched by the same load, so after the
# kills the figure is about what it was. It can differ by where the reconnected channels
# land: a slot is one image (150,528 bytes, 148 KiB in 4 KiB chunks), a connection holds
# one call at a time, and one front end may end up with all 2 × PER_FRONTEND connections
# where it had PER_FRONTEND: at most 4 × 148 KiB more in all, under 1 MiB. A segment the
# engine kept mapped after its front end died adds its touched pages for every kill; the
# count of mapped segments (exact) catches even one.
SHMEM_SLACK = 1 << 20
# RSS moves with allocator state (Python heap, ONNX Runtime, the malloc arenas of
# gRPC and the event loop) by a few MiB between two idle points of the same load; what a
# killed front end left in the engine (its link, its requests, its mapping) would grow
# with every kill. 16 MiB is above that noise and below 50 kills of a leak of a third MiB.
RSS_SLACK = 16 << 20


@dataclass
class Footprint:
    names: dict[str, int]  # this engine's segment names in /dev/shm, with sizes
    mapped: dict[str, str]
    rss_shmem: int
    rss: int
    system_shmem: int

    def __str__(self) -> str:
        return (
            f"{len(self.names)} names ({sum(self.names.values())} bytes), "
            f"{len(self.mapped)} segments mapped, RssShmem {self.rss_shmem >> 10} KiB, "
            f"RSS {self.rss >> 20} MiB, system Shmem {self.system_shmem >> 20} MiB"
        )


def _kib(text: str, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, field
    return int(match[1]) << 10


def footprint(cluster: Cluster) -> Footprint:
    status = Path(f"/proc/{cluster.engine.pid}/status").read_text()
    return Footprint(
        names=cluster.named_segments(),
        mapped=cluster.mapped_segments(),
        rss_shmem=_kib(status, "RssShmem"),
        rss=_kib(status, "VmRSS"),
        system_shmem=_kib(Path("/proc/meminfo").read_text(), "Shmem"),
    )


async def settled(cluster: Cluster) -> Footprint:
    """The footprint once the model is idle and the engine maps one segment per front end."""
    await until_idle(cluster.server, MODEL)
    deadline = time.monotonic() + SETTLE_WITHIN
    while len((now := footprint(cluster)).mapped) != FRONTENDS:
        assert time.monotonic() < deadline, f"after {SETTLE_WITHIN:.0f} s: {now}"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # the allocator's deferred frees
    return footprint(cluster)


@pytest.mark.parametrize(
    "kills",
    [5, pytest.param(50, marks=[pytest.mark.soak, pytest.mark.timeout(1800)])],
)
async def test_frontend_kills_leave_no_shared_memory_or_rss_behind(
    start: Callable[[], Cluster], kills: int
) -> None:
    cluster = start()
    async with closing(await spread(cluster)) as connections:
        warm = Load(connections).start()
        try:
            await warm.until_each(100)
        finally:
            await warm.finish()
        before = await settled(cluster)
        load = Load(connections).start()
        try:
            for kill in range(kills):
                index = kill % FRONTENDS
                victim = cluster.frontends()[index]
                await load.until_each(2, since=time.monotonic())
                victim.kill()
                await cluster.replaced(index, victim.pid)
            await load.until_each(100, since=time.monotonic(), within=120)
        finally:
            await load.finish()
        after = await settled(cluster)

    report = f"before: {before}\nafter {kills} kills: {after}\n{load.report()}"
    assert {o.code for o in load.outcomes} <= {"OK", "UNAVAILABLE"}, report
    assert before.names == {} and after.names == {}, report
    live = {p.pid for p in cluster.frontends().values()}
    assert len(live) == FRONTENDS and len(after.mapped) == FRONTENDS, report
    assert after.rss_shmem <= before.rss_shmem + SHMEM_SLACK, report
    assert after.rss <= before.rss + RSS_SLACK, report


# 3. the engine killed


PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Orphans of this process's descendants become its children while the block runs, so
    their exit codes can be read (`reap`); the teardown kills and reaps any left."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reap(pid: int, within: float) -> int | None:
    """The exit status of child `pid` (a negative signal number if killed), waited for up to
    `within` seconds; None if it is still running."""
    deadline = time.monotonic() + within
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


async def _not_serving(connection: Connection, started: float, bound: float) -> float:
    """Seconds from `started` until this connection's front end says NOT_SERVING or the
    connection fails (infinite if not within `bound` and a margin)."""
    stub = health_pb2_grpc.HealthStub(connection.channel)
    while time.monotonic() - started < bound + 10:
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                return time.monotonic() - started
        else:
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - started
        await asyncio.sleep(0.02)
    return float("inf")


async def test_engine_sigkill_ends_every_frontend(start: Callable[[], Cluster]) -> None:
    cluster = start()
    with subreaper():
        async with closing(await spread(cluster)) as connections:
            # each worker stops at its first failure
            load = Load(connections, until=lambda o: o.code != "OK").start()
            frontends = cluster.frontends()
            probes = {i: next(c for c in connections if c.index == i) for i in frontends}
            try:
                await load.until_each(3)
                cluster.server.process.kill()
                killed_at = time.monotonic()
                gone = await asyncio.gather(*(_not_serving(c, killed_at, ENGINE_GONE_BOUND)
                                              for c in probes.values()))  # fmt: skip
                await asyncio.wait_for(asyncio.gather(*load.tasks), CALL_TIMEOUT + 30)
            finally:
                load.stop.set()
            codes = {
                i: await asyncio.to_thread(reap, p.pid, FRONTENDS_EXIT_WITHIN)
                for i, p in frontends.items()
            }
        assert cluster.server.process.wait(10) == -signal.SIGKILL

    log = cluster.server.log()
    report = f"{load.report()}\nseconds to NOT_SERVING {gone}; exit codes {codes}\n{log[-3000:]}"

    assert all(seconds <= ENGINE_GONE_BOUND for seconds in gone), report
    assert all(code is not None and code != 0 for code in codes.values()), report
    # the calls under way at the kill; a later one may meet the port's close, which a client
    # that ignores the drain's pushback can (`server.drain`)
    under_way = {o.code for o in load.outcomes if o.started < killed_at}
    assert under_way <= {"OK", "UNAVAILABLE"}, report
    assert not _server_processes(), report
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", cluster.port), timeout=5).close()


def _server_processes() -> list[tuple[int, str]]:
    """This process's descendants named as the server's processes are."""
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.name().startswith("rs-") and process.status() != psutil.STATUS_ZOMBIE:
                found.append((process.pid, process.name()))
    return found


# 4. SIGTERM under load on every front end


def refused(outcome: Outcome) -> bool:
    """An UNAVAILABLE that the server refused before accepting the call: the drain's
    refusal (`server.interceptors`), or a connection to a port no longer listening."""
    return outcome.code == "UNAVAILABLE" and bool(REFUSED.search(outcome.details))


async def test_sigterm_drains_every_frontend(start: Callable[[], Cluster]) -> None:
    cluster = start()
    engine_pid = cluster.engine.pid
    async with closing(await spread(cluster)) as connections:
        # each worker stops at its first refusal
        load = Load(connections, until=lambda o: o.code == "UNAVAILABLE").start()
        try:
            await load.until_each(3)
            await until_gauges(cluster.server, MODEL, inflight=len(connections) // 2)
            frontends = list(cluster.frontends().values())
            signalled = time.monotonic()
            cluster.server.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*load.tasks), GRACE_SECONDS + 60)
        finally:
            load.stop.set()
        code = await asyncio.to_thread(cluster.server.process.wait, GRACE_SECONDS + 30)

    log = cluster.server.log()
    report = f"{load.report()}\n{log[-3000:]}"

    lost = [o for o in load.outcomes if o.code != "OK" and not refused(o)]
    assert not lost, f"lost: {lost[:5]}\n{report}"
    answered_after = [o for o in load.outcomes if o.code == "OK" and o.ended > signalled]
    assert answered_after, f"no call in flight at SIGTERM was answered after it: {report}"
    assert code == 0, report
    assert not [p for p in frontends if p.is_running()], report
    assert not list(SHM.glob(f"resnet-serve.{engine_pid}.*")), report
    assert log.rstrip().endswith("exiting"), report


# 5. the segments


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


async def test_segments_are_private_and_stale_ones_removed(start: Callable[[], Cluster]) -> None:
    dead = SHM / f"resnet-serve.{_dead_pid()}.{secrets.token_hex(16)}"
    alive = SHM / f"resnet-serve.{os.getpid()}.{secrets.token_hex(16)}"
    try:
        for path in (dead, alive):
            path.write_bytes(b"stale")
        cluster = start()
        assert not dead.exists(), "a segment of a dead engine pid was kept"
        assert alive.exists(), "a segment of a live engine pid was removed"

        first = cluster.mapped_segments()
        assert len(first) == FRONTENDS, first
        assert cluster.named_segments() == {}
        for name, addresses in first.items():
            match = SEGMENT.fullmatch(name)
            assert match and int(match[1]) == cluster.engine.pid, name
            assert len(match[2]) * 4 >= 64, f"{name}: fewer than 64 random bits"
            mapped = os.stat(f"/proc/{cluster.engine.pid}/map_files/{addresses}")
            assert stat.S_IMODE(mapped.st_mode) == 0o600, (name, oct(mapped.st_mode))
            assert mapped.st_uid == os.getuid() and mapped.st_nlink == 0, (name, mapped)

        # a replacement's segment is a new one, not a name seen before
        victim = cluster.frontends()[1]
        victim.kill()
        await cluster.replaced(1, victim.pid)
        deadline = time.monotonic() + SETTLE_WITHIN
        while len(second := cluster.mapped_segments()) != FRONTENDS or second == first:
            assert time.monotonic() < deadline, (first, second)
            await asyncio.sleep(0.1)
        assert len(set(first) | set(second)) == FRONTENDS + 1, (first, second)
    finally:
        for path in (dead, alive):
            path.unlink(missing_ok=True)


# 5b. a front end that keeps failing at its start is started again less and less often


async def test_failed_starts_back_off_and_a_kill_does_not(start: Callable[[], Cluster]) -> None:
    """A front end that ends on its own (here: it drains and exits, told by SIGTERM) soon
    after it started waits 1 s, then 2 s, then 4 s before the next start; one killed by
    SIGKILL (the OOM killer, an operator) is started again after 1 s, and the doubling is
    forgotten."""
    cluster = start()
    waits = []
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        victim = cluster.frontends()[0]
        os.kill(victim.pid, sig)
        await cluster.replaced(0, victim.pid)
        line = re.search(
            rf"front end 0 \(pid {victim.pid}\) ended with ([\w ]+) after [\d.]+ s; "
            rf"starting another in (\d+) s", cluster.server.log()
        )  # fmt: skip
        assert line, cluster.server.log()[-3000:]
        waits.append((line[1], int(line[2])))
    done = "exit code 0"
    assert waits == [(done, 1), (done, 2), (done, 4), ("signal SIGKILL", 1)], waits
    assert 1 in cluster.frontends(), "the other front end was touched"


# 6. process names


def test_process_names(start: Callable[[], Cluster]) -> None:
    cluster = start()
    pids = [cluster.engine.pid, *(p.pid for p in cluster.frontends().values())]
    shown = subprocess.run(
        ["ps", "-o", "pid=,ppid=,comm=", "-p", ",".join(map(str, pids))],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = {int(pid): (int(ppid), comm) for pid, ppid, comm in
            (line.split(None, 2) for line in shown.splitlines())}  # fmt: skip
    assert rows[cluster.engine.pid][1] == "rs-engine", shown
    names = sorted(comm for pid, (ppid, comm) in rows.items() if ppid == cluster.engine.pid)
    assert names == [f"rs-frontend-{i}" for i in range(FRONTENDS)], shown


def test_the_front_ends_share_the_decode_workers_out(start: Callable[[], Cluster]) -> None:
    """Each front end's decode pool is its share of the cores, not one per core each."""
    cluster = start()
    said = re.findall(r"CPU: (\d+) usable core\(s\).*?, (\d+) decode worker\(s\)",
                      cluster.server.log())  # fmt: skip
    cores = int(said[0][0])
    workers = [int(w) for _, w in said]
    assert workers == [max(1, cores // FRONTENDS)] * FRONTENDS, said  # each front end's line
