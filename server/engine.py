"""The engine process: the models of one device, fed by front-end processes.

`run(settings, n)` is ``resnet-serve serve`` with front ends (``--frontends N``). This
process (named ``rs-engine``) owns the sessions, the batchers and the inference threads
(`server.app.serving_core`: the registry, the loader, the repository manager, health),
serves /metrics for every process, and starts N front ends (`server.frontend`, each
named ``rs-frontend-<i>``) that share the gRPC and HTTP ports and do everything else.
It holds both ports bound (SO_REUSEPORT, never listening) so that a port 0 becomes one
number for all front ends and a replaced front end finds its port free.

Per front end (`Link`): a Unix socket pair (`server.ipc.Channel`, messages batched per
wake-up) and the front end's shared-memory segment (`server.shm`). Every front end also
maps the engine's `server.shm.Board` read-only (its descriptor is the front end's third
argument), where each batcher's queued images are in sight, and its row of the engine's
`server.shm.Tally` (the fourth), where it counts the calls it answers, the HTTP bodies
it reads and the images it has waiting for decoding, so that ``max_concurrent_calls``,
``http_max_body_reads`` and ``max_decode_backlog`` hold over every front end. The
messages:

front end → engine
    ``("hello", segment name, size)``: once; the engine maps the segment
    ``("infer", key, model, version, offset, dtype, shape, deadline, request id, size,
    trace)``: the tensor at ``offset`` of the segment; the answer may use ``size`` bytes
    there; ``trace``: the call's span context (trace id, span id, flags) or None
    (`server.tracing`)
    ``("cancel", key)``: the caller went away; dropped before compute if still queued
    ``("control", id, "load"|"unload", model)``: model control (v2 repository API)
    ``("shared_memory", id, "register", name, key, offset, byte_size)``,
    ``("shared_memory", id, "unregister", name)``: the engine's table of system
    shared-memory regions (`server.shared_memory`)
    ``("families", id)``: every process's metric families (v2 statistics)
    ``("collected", id, families)``: the answer to ``collect``
    ``("synced", id)``: the answer to ``sync``
engine → front end
    ``("settings", Settings)``, then ``("registry", snapshot, loaded)`` at each change
    (each version's row ends with its cell on the board, or None)
    ``("regions", snapshot)``: the shared-memory regions, at start and at each change
    ``("sync", id)``: answered ``synced`` once every message before it is applied; the
    ``answer`` to a ``control`` or ``shared_memory`` waits for every front end's (or its
    end, or `SYNC_TIMEOUT`), so a change made through one front end is in force on all
    of them when its call returns
    ``("done", key, dtype, shape)``: outputs written at the request's offset
    ``("done", key, array)``: outputs too large for the slot, carried in the message
    ``("failed", key, exception)``, ``("cancelled", key)``
    ``("answer", id, value, exception or None)``: to ``control`` and ``families``
    ``("collect", id)``: this front end's own metric families, for /metrics
    ``("forget", model, version)``: the engine forgot an unloaded version's series

A request is answered exactly once, and only then may the front end reuse its slot.
A front end that dies (its socket closes) has its requests cancelled (dropped before
compute; a batch already running finishes on the mapping, which outlives the front
end), its segment's name removed if it was still there, its tally row cleared, and is
started again unless the server is draining: after 1 s, or longer after failed starts
(`restart_delay`).
SIGTERM or SIGINT: every front end drains (they answer what they accepted, the engine
computing it), then the engine stops; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import mmap
import os
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.metrics_core import Metric

from server import app, ipc, shm, threads, tracing
from server.config import Settings
from server.core.batcher import Batcher
from server.core.instances import Item
from server.core.registry import ModelRegistry, ModelVersion
from server.errors import ServeError
from server.logs import one_line
from server.metrics import merge_families
from server.sessions import ProviderLost

log = logging.getLogger(__name__)

# A front end that does not say hello within this many seconds is stopped and replaced.
HELLO_TIMEOUT = 60.0
# How long /metrics waits for a front end's families.
COLLECT_TIMEOUT = 2.0
# How long a change's answer waits for a front end that does not say it has applied it.
SYNC_TIMEOUT = 2.0
# A dead front end is started again after RESTART_DELAY. One that ends on its own (not by
# SIGKILL, which comes from outside: the OOM killer, an operator) within STABLE_AFTER
# seconds of starting is a failed start: the next wait doubles, up to RESTART_DELAY_MAX.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 10.0


def snapshot(registry: ModelRegistry, board: shm.Board | None = None) -> list[tuple[Any, ...]]:
    """The registry as plain data for the front ends' mirror (`server.frontend`); with
    `board`, each batcher's cell there (the cells of batchers no longer served released
    first, then one assigned to each new batcher), so that front ends see its queue."""
    if board is not None:
        served = {mv.batcher for model in registry.models() for mv in model.versions.values()}
        for batcher in board.release(served):
            assert isinstance(batcher, Batcher)
            batcher.on_queued = None  # its cell may be another's now
    return [
        (model.name, model.config, [_version_row(mv, board) for mv in model.versions.values()])
        for model in registry.models()
    ]


def _version_row(mv: ModelVersion, board: shm.Board | None) -> tuple[Any, ...]:
    cell = None
    if board is not None and isinstance(mv.batcher, Batcher):
        cell = board.assign(mv.batcher)
        if cell is not None and mv.batcher.on_queued is None:
            mv.batcher.on_queued = functools.partial(board.cells.__setitem__, cell)
            mv.batcher.on_queued(mv.batcher.queued)
    return (mv.version, mv.labels, mv.path, mv.state.value, mv.reason, mv.providers,
            mv.weights, mv.random_weights, cell)  # fmt: skip


def frontend_environment() -> dict[str, str]:
    """A front end's environment: the engine's, with the directory the engine's own `server`
    package came from first on PYTHONPATH (unless it is a site-packages directory, which
    every interpreter has). The front end runs with ``-P``, which keeps its working
    directory off `sys.path`: it imports the engine's code, never a ``server`` package that
    happens to be in the directory the server was started from."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    environment = dict(os.environ)
    everywhere = [*site.getsitepackages(), site.getusersitepackages()]
    if root not in {os.path.realpath(path) for path in everywhere}:
        paths = [root, *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
        environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


class Link:
    """One front end as the engine sees it: its process, channel, segment, requests."""

    # what the front end's process runs, before its socket's fd and its index
    # (`bench.engine_load` runs a load generator that speaks the same messages instead)
    program: tuple[str, ...] = ("-m", "server.frontend")

    def __init__(self, engine: Engine, index: int) -> None:
        self.engine = engine
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: ipc.Channel | None = None
        self.segment: str = ""
        self.buffer: mmap.mmap | None = None
        self.requests: dict[int, Request] = {}
        self.hello = asyncio.Event()
        self.gone = asyncio.Event()
        # id -> the future of a `collect` or `sync` asked of it, until it answers
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.last: list[Metric] = []  # its families as last collected
        self.started = 0.0  # time.monotonic() when its process started

    async def start(self) -> None:
        self.started = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            board, tally = self.engine.board.fd, self.engine.tally.fd
            self.process = subprocess.Popen(
                [sys.executable, "-P", *self.program, str(theirs.fileno()), str(self.index),
                 str(board), str(tally)],
                pass_fds=(theirs.fileno(), board, tally),
                env=frontend_environment(),
            )
        self.channel = await ipc.Channel.open(ours, self.on_messages, self.on_closed)
        self.channel.send(("settings", self.engine.frontend_settings))
        self.channel.send(("registry", self.engine.snapshot(), self.engine.health_loaded()))
        self.channel.send(("regions", self.engine.shared_memory.snapshot()))

    # from the front end

    def on_messages(self, messages: list[tuple[Any, ...]]) -> None:
        for message in messages:
            kind = message[0]
            if kind == "infer":
                self._infer(*message[1:])
            elif kind == "cancel":
                request = self.requests.get(message[1])
                if request is not None:
                    request.cancel()
            elif kind in ("collected", "synced"):  # ("collected", id, families)
                future = self.waiting.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_result(message[2] if kind == "collected" else None)
            elif kind == "control":
                self.engine.spawn(self._control(*message[1:]))
            elif kind == "families":
                self.engine.spawn(self._families(message[1]))
            elif kind == "shared_memory":
                self._shared_memory(*message[1:])
            elif kind == "hello":
                self._hello(message[1], message[2])

    def _hello(self, segment: str, size: int) -> None:
        try:
            self.buffer = shm.attach(segment, size)
        except (OSError, ValueError) as exc:
            log.error("front end %d: cannot map its shared memory: %s", self.index, exc)
            self.stop()
            return
        self.segment = segment
        self.hello.set()
        assert self.channel is not None
        self.channel.send(("attached",))

    def _infer(
        self,
        key: int,
        model: str,
        version: str,
        offset: int,
        dtype: str,
        shape: tuple[int, ...],
        deadline: float | None,
        request_id: str,
        size: int,
        trace: tuple[int, int, int] | None = None,
    ) -> None:
        """Queue the request on its version's batcher; answered as its last item is settled
        (`Request.item_done`: no task or loop callback per request)."""
        assert self.buffer is not None and self.channel is not None
        request = Request(self, key, offset, size)
        try:
            served = self.engine.registry.get(model, version)
            batcher = served.scheduler()
            assert isinstance(batcher, Batcher)
            batch = shm.view(self.buffer, offset, dtype, shape)
            request.items = batcher.enqueue(
                batch, deadline=deadline, request_id=request_id, trace=tracing.received(trace),
                on_done=request.item_done,
            )  # fmt: skip
        except ServeError as exc:
            self.channel.send(("failed", key, exc))
            return
        served.acquire()  # released once answered: an unload waits for it
        request.served = served
        self.requests[key] = request

    def answer(self, request: Request) -> None:
        """Every item of `request` is done: its outputs into its slot, or why not."""
        channel = self.channel
        assert channel is not None
        del self.requests[request.key]
        assert request.served is not None
        request.served.release()
        outputs = request.outcome()
        if isinstance(outputs, asyncio.CancelledError):
            channel.send(("cancelled", request.key))
            return
        if isinstance(outputs, BaseException):
            error = outputs
            if isinstance(error, ProviderLost):
                error = request.served.lost(error)
            channel.send(("failed", request.key, _portable(error)))
            return
        if outputs.nbytes <= request.size and self.buffer is not None:
            shm.view(self.buffer, request.offset, outputs.dtype.str, outputs.shape)[...] = outputs
            channel.send(("done", request.key, outputs.dtype.str, outputs.shape))
        else:
            channel.send(("done", request.key, outputs))

    async def _control(self, ident: int, op: str, name: str) -> None:
        assert self.channel is not None
        try:
            manager = self.engine.manager
            await (manager.load(name) if op == "load" else manager.unload(name))
        except Exception as exc:
            error: BaseException | None = _portable(exc)
        else:
            error = None
        self.engine.broadcast_now()  # the registry the answer speaks of
        await self.engine.synced()  # in force on every front end before the answer
        self.channel.send(("answer", ident, None, error))

    def _shared_memory(self, ident: int, op: str, *args: Any) -> None:
        """A registration on the engine's table, applied here in message order; answered
        once every front end's mirror has the new table."""
        assert self.channel is not None
        try:
            self.engine.shared_memory.apply(op, *args)
        except Exception as exc:
            self.channel.send(("answer", ident, None, _portable(exc)))
            return
        self.engine.broadcast_regions()
        self.engine.spawn(self._answer_synced(ident))

    async def _answer_synced(self, ident: int) -> None:
        await self.engine.synced()
        assert self.channel is not None
        self.channel.send(("answer", ident, None, None))  # dropped if the front end is gone

    async def synced(self) -> None:
        """Until the front end has applied every message sent to it before now (it answers
        ``sync`` in order); at once when it is gone or not attached yet (it applies them
        before it serves), after `SYNC_TIMEOUT` when it does not answer."""
        if not self._attached():
            return
        try:
            await self._round_trip("sync", SYNC_TIMEOUT)
        except TimeoutError:
            log.warning("front end %d did not confirm a change within %.0f s; answering "
                        "without it", self.index, SYNC_TIMEOUT)  # fmt: skip

    async def _families(self, ident: int) -> None:
        assert self.channel is not None
        self.channel.send(("answer", ident, await self.engine.families(), None))

    async def collect(self) -> list[Metric]:
        """The front end's metric families; the last it gave when it does not answer in time
        (so that a counter never goes backwards because a front end was busy)."""
        if self._attached():
            with contextlib.suppress(TimeoutError):
                self.last = await self._round_trip("collect", COLLECT_TIMEOUT) or self.last
        return self.last

    def _attached(self) -> bool:
        """The front end is there and has its segment mapped (it serves, or is about to)."""
        return self.channel is not None and not self.channel.closed and self.hello.is_set()

    async def _round_trip(self, kind: str, timeout: float) -> Any:
        """Send ``(kind, id)`` and wait for the front end's answer with that id: its value,
        None if the front end goes first; TimeoutError after `timeout`."""
        assert self.channel is not None
        ident = next(self.engine.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[ident] = future
        self.channel.send((kind, ident))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(ident, None)

    def on_closed(self) -> None:
        """The front end is gone: drop its requests, forget its segment."""
        for request in list(self.requests.values()):
            request.cancel()
        for future in self.waiting.values():
            if not future.done():
                future.set_result(None)  # `collect` keeps its last families, `synced` is done
        if self.segment:
            shm.unlink(self.segment)  # if it died before it could
        self.buffer = None  # unmapped once the last batch reading it lets go
        self.engine.tally.clear(self.index)  # what it held went with it
        self.gone.set()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


class Request:
    """One front end's request in the engine: its queued items, answered once all are done
    (in the callback that settles the last one)."""

    __slots__ = ("_pending", "items", "key", "link", "offset", "served", "size")

    def __init__(self, link: Link, key: int, offset: int, size: int) -> None:
        self.link, self.key, self.offset, self.size = link, key, offset, size
        self.items: list[Item] = []
        self.served: ModelVersion | None = None
        self._pending = 0

    def item_done(self, item: Item) -> None:
        """An item's future is settled (`Item.on_done`)."""
        self._pending += 1
        if self._pending == len(self.items):
            self.link.answer(self)
        elif item.future.cancelled() or item.future.exception() is not None:
            for sibling in self.items:  # not computed: each one's cancel comes back here
                sibling.cancel()

    def cancel(self) -> None:
        """The caller went away: items still queued are dropped before compute."""
        for item in self.items:
            item.cancel()

    def outcome(self) -> np.ndarray | BaseException:
        """Once every item is done: the rows of all, in order; else the first failure (its
        siblings were cancelled, not computed); else `asyncio.CancelledError`."""
        futures = [item.future for item in self.items]
        for future in futures:
            if not future.cancelled() and future.exception() is not None:
                return future.exception()  # type: ignore[return-value]
        if any(future.cancelled() for future in futures):
            return asyncio.CancelledError()
        if len(futures) == 1:
            return futures[0].result()
        return np.concatenate([future.result() for future in futures])


def counting(families: list[Metric], forget: tuple[str, str] | None = None) -> list[Metric]:
    """The counters, histograms and summaries of `families` (without the series of the
    model version `forget`)."""
    kept = []
    for family in families:
        if family.type not in ("counter", "histogram", "summary"):
            continue
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [
            sample
            for sample in family.samples
            if forget is None
            or (sample.labels.get("model"), sample.labels.get("version")) != forget
        ]
        kept.append(copy)
    return kept


def _portable(exc: BaseException) -> BaseException:
    """`exc` as it crosses to a front end: a domain error as is, anything else as an internal
    error that says nothing of its internals (the engine logs it)."""
    if isinstance(exc, ServeError):
        return exc
    log.error("request failed in the engine: %s", one_line(exc))
    return RuntimeError("the engine could not compute the request")


class Engine:
    def __init__(self, settings: Settings, core: app.Core, frontends: int) -> None:
        self.settings = settings
        self.core = core
        self.registry = core.registry
        self.manager = core.manager
        assert core.shared_memory is not None
        self.shared_memory = core.shared_memory  # the server's one table of regions
        self.frontend_settings = settings
        self.links = [Link(self, i) for i in range(frontends)]
        self.board = shm.Board()  # every batcher's queue, for the front ends to see
        self.tally = shm.Tally(frontends)  # what each front end holds, for server-wide limits
        self.ids = itertools.count()
        self.draining = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._dirty = False
        self._supervisors: list[asyncio.Task[None]] = []
        self._reserved: list[socket.socket] = []
        # the counters and histograms of front ends that died, still shown on /metrics
        self.retired: list[Metric] = []
        core.health.listeners.append(self._changed)
        core.metrics.on_forget = self._forget_everywhere

    def _forget_everywhere(self, model: str, version: str) -> None:
        """An unloaded version's series leave every front end too (its counts of requests
        live there), before the registry change that follows the unload."""
        self.retired = counting(self.retired, forget=(model, version))
        for link in self.links:
            link.last = counting(link.last, forget=(model, version))
            if link.channel is not None and not link.channel.closed:
                link.channel.send(("forget", model, version))

    def health_loaded(self) -> bool:
        return self.core.health.is_loaded

    def snapshot(self) -> list[tuple[Any, ...]]:
        return snapshot(self.registry, self.board)

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # the registry mirrored in the front ends

    def _changed(self) -> None:
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_soon(self.broadcast_now)

    def broadcast_now(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        message = ("registry", self.snapshot(), self.health_loaded())
        for link in self.links:
            if link.channel is not None and not link.channel.closed:
                link.channel.send(message)

    async def synced(self) -> None:
        """Until every live front end has applied what was sent to it before now."""
        await asyncio.gather(*(link.synced() for link in self.links))

    def broadcast_regions(self) -> None:
        message = ("regions", self.shared_memory.snapshot())
        for link in self.links:
            if link.channel is not None and not link.channel.closed:
                link.channel.send(message)

    # ports and front ends

    def reserve_ports(self) -> None:
        """Bind the gRPC and HTTP ports (a taken one: StartupError), keep them bound with
        SO_REUSEPORT for the front ends, and tell the front ends their numbers."""
        ports = {"port": self.settings.port}
        if self.settings.http_port:
            ports["http_port"] = self.settings.http_port
        # each front end's decode pool takes its share of the cores
        chosen: dict[str, int] = {"decode_workers": self.settings.decode_threads(
            frontends=len(self.links))}  # fmt: skip
        for field, port in ports.items():
            sock = _reserve(self.settings.host, port, field)
            self._reserved.append(sock)
            chosen[field] = sock.getsockname()[1]
        self.frontend_settings = self.settings.model_copy(update=chosen)

    async def start_frontends(self) -> None:
        """Start every front end; StartupError if one does not come up."""
        for link in self.links:
            await link.start()
        waits = [asyncio.ensure_future(link.hello.wait()) for link in self.links]
        exits = [asyncio.ensure_future(link.gone.wait()) for link in self.links]
        await asyncio.wait(
            [asyncio.gather(*waits), *exits], timeout=HELLO_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )  # fmt: skip
        for future in [*waits, *exits]:
            future.cancel()
        if not all(link.hello.is_set() for link in self.links):
            for link in self.links:
                link.stop()
            raise app.StartupError("a front end did not start; its log lines say why")
        self._supervisors = [
            asyncio.ensure_future(self._supervise(link)) for link in self.links
        ]

    async def _supervise(self, link: Link) -> None:
        """Start `link`'s front end again whenever it dies, until the drain; failed starts
        back off (`restart_delay`)."""
        delay = RESTART_DELAY
        while True:
            await link.gone.wait()
            process = link.process
            assert process is not None
            code = await asyncio.to_thread(process.wait)
            if self.draining:
                return
            lived = time.monotonic() - link.started
            wait, delay = restart_delay(delay, code, lived)
            log.error("front end %d (pid %d) ended with %s after %.1f s; starting another in "
                      "%.0f s", link.index, process.pid, _exit_status(code), lived,
                      wait)  # fmt: skip
            await asyncio.sleep(wait)
            if self.draining:
                return
            # what it counted stays counted: /metrics' counters never go backwards
            self.retired = merge_families([self.retired, counting(link.last)])
            fresh = Link(self, link.index)
            self.links[link.index] = link = fresh
            await link.start()

    async def drain(self, grace_period: float) -> None:
        """Every front end drains and exits (the engine answering what they accepted)."""
        self.draining = True
        for link in self.links:
            link.stop(signal.SIGTERM)
        deadline = time.monotonic() + grace_period + 10
        for link in self.links:
            if link.process is None:
                continue
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.to_thread(link.process.wait), remaining)
            except TimeoutError:
                log.warning("front end %d did not stop within the grace period; killing it",
                            link.index)  # fmt: skip
                link.stop()
                await asyncio.to_thread(link.process.wait)
        for supervisor in self._supervisors:
            supervisor.cancel()
        for sock in self._reserved:
            sock.close()

    # /metrics: one view of every process

    def collect(self) -> Iterable[Metric]:
        """Called by the /metrics thread: `families`."""
        future = asyncio.run_coroutine_threadsafe(self.families(), self._loop)
        try:
            return future.result(COLLECT_TIMEOUT + 1)
        except Exception:  # the loop is gone (stopping): the engine's own
            return list(self.core.metrics.registry.collect())

    async def families(self) -> list[Metric]:
        """The engine's metric families merged with every front end's (one that is gone or
        slow shows nothing this time)."""
        own = list(self.core.metrics.registry.collect())
        theirs = await asyncio.gather(*(link.collect() for link in self.links))
        return merge_families([own, *theirs, self.retired])

    def metrics_registry(self) -> CollectorRegistry:
        self._loop = asyncio.get_running_loop()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return registry


def _reserve(host: str, port: int, field: str) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    probe = socket.socket(family, kind, proto)
    try:  # taken by anyone (another server included): refuse, as one process would
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        port = probe.getsockname()[1]
    except OSError as exc:
        probe.close()
        name = "gRPC" if field == "port" else "HTTP"
        raise app.StartupError(
            f"cannot bind the {name} port {app.host_port(host, port)}: {exc}"
        ) from exc
    probe.close()
    held = socket.socket(family, kind, proto)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind((*address[:1], port, *address[2:]))
    return held


def restart_delay(delay: float, code: int, lived: float) -> tuple[float, float]:
    """How long to wait before starting a dead front end again, and the wait after the next
    failed start: `delay` as it stands for a failed start (it ended on its own within
    STABLE_AFTER s), doubled next time up to RESTART_DELAY_MAX; RESTART_DELAY, and the
    doubling forgotten, for one that served longer or was killed (SIGKILL)."""
    if code == -signal.SIGKILL or lived >= STABLE_AFTER:
        return RESTART_DELAY, RESTART_DELAY
    return delay, min(2 * delay, RESTART_DELAY_MAX)


def _exit_status(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


async def run(settings: Settings, frontends: int) -> int:
    """The engine's process: see the module docstring."""
    threads.name_process("rs-engine")
    threads.name_current("event_loop")
    tracing.configure(settings.trace_endpoint, "engine")
    removed = shm.remove_stale()
    if removed:
        log.info("removed %d shared-memory segment(s) left by a server that crashed",
                 len(removed))  # fmt: skip
    disable_created_metrics()
    core = app.serving_core(settings)
    engine = Engine(settings, core, frontends)
    engine.reserve_ports()
    exporter = app.serve_metrics(settings, core.metrics, engine.metrics_registry())
    try:
        await core.health.start()
        await engine.start_frontends()
    except BaseException:
        exporter.shutdown()
        for sock in engine._reserved:
            sock.close()
        raise
    fs = engine.frontend_settings
    log.info("engine pid %d: %d front end(s) on gRPC port %d%s, metrics on http://%s/metrics",
             os.getpid(), frontends, fs.port,
             f" and HTTP port {fs.http_port}" if fs.http_port else "",
             app.host_port(settings.metrics_host, exporter.server_port))  # fmt: skip
    signalled = app.on_signals(settings.grace_period)
    loading = asyncio.ensure_future(app.load(settings, core.manager, core.health))
    signal_wait = asyncio.ensure_future(signalled.wait())
    await asyncio.wait({loading, signal_wait}, return_when=asyncio.FIRST_COMPLETED)
    error = loading.exception() if loading.done() and not loading.cancelled() else None
    if error is None:
        await signal_wait
    else:
        signal_wait.cancel()
    await core.health.drain()
    await engine.drain(settings.grace_period)
    await core.manager.stop()
    loading.cancel()
    await asyncio.gather(loading, return_exceptions=True)
    await core.registry.close()
    exporter.shutdown()
    exporter.server_close()
    if error is not None:
        raise app.StartupError(str(error))
    await app.exiting()
    return 0
