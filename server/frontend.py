"""A front-end process: every protocol, admission, validation and preprocessing of
`server.app`, with the models computed by the engine (`server.engine`).

Started by the engine as ``python -m server.frontend <socket fd> <index> <board fd>
<tally fd>`` and named ``rs-frontend-<index>``. It gets its settings and the engine's
registry over the socket (`server.ipc`), creates its shared-memory segment
(`server.shm`), and then serves the gRPC and HTTP ports, which every front end shares
(SO_REUSEPORT), exactly as one process would (`server.app.start`), except that:

- its registry is a mirror of the engine's, replaced at each change the engine sends;
  a READY version's scheduler is `EngineScheduler`: the request's tensor is written
  once into a slot of the segment, its header goes to the engine, and the outputs come
  back in the same slot; a call that would not fit in the engine's queue, as the engine's
  board shows it (`server.shm.Board`), is refused before it is decoded or sent;
- model control (v2 load and unload) is asked of the engine (`EngineManager`), and so are
  system shared-memory registrations: its table of regions is a mirror of the engine's
  (`server.shared_memory`), replaced at each change: the engine answers the call that
  made a change once every front end has applied it (``sync``, `server.engine`);
- it serves no /metrics: the engine asks each front end for its families and shows one
  view of all processes;
- it counts the calls it answers, the HTTP bodies it reads and the images waiting for its
  decode workers in its row of the engine's `server.shm.Tally`, and refuses one more when
  all front ends together are at the limit.

A call whose caller goes away sends ``cancel``: the engine drops the request before
compute. If the engine goes away, every request waiting for it fails with UNAVAILABLE,
health turns NOT_SERVING at once, and the front end exits with code 1 (the engine's
death ends the server). SIGTERM drains it as it would one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import mmap
import os
import socket
import sys
from typing import Any

import numpy as np
from prometheus_client.metrics_core import Metric

from server import app, ipc, logs, shm, threads, tracing
from server.config import Settings
from server.core.batcher import check_queue
from server.core.health import Health
from server.core.registry import Model, ModelRegistry, ModelVersion, State
from server.drain import Drain
from server.errors import ModelNotReady
from server.metrics import Metrics
from server.shared_memory import SharedMemory

log = logging.getLogger("server.frontend")  # also when run as __main__

EXIT_ENGINE_GONE = 1
# How long a front end whose engine died takes to answer what it holds before it exits.
ENGINE_GONE_GRACE = 2.0
# A busy front end holds its messages to the engine up to this long, while its loop has
# other work ready, and sends them in one frame (`server.ipc.Channel`).
FLUSH_HOLD = 0.001


class EngineLink:
    """The front end's side of its channel: requests out, answers in, the registry mirror."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.settings: asyncio.Future[Settings] = loop.create_future()
        self.attached: asyncio.Future[None] = loop.create_future()
        self.gone = asyncio.Event()
        self.channel: ipc.Channel | None = None
        self.buffer: mmap.mmap | None = None
        self.slots: shm.Slots | None = None
        self.mirror: Mirror | None = None
        self.board: shm.Board | None = None  # the engine's queues, read-only
        self.snapshot: tuple[list[tuple[Any, ...]], bool] | None = None
        self.loaded = asyncio.Event()
        self._keys = itertools.count()
        # key -> (future, slot offset, slot size)
        self._pending: dict[int, tuple[asyncio.Future[np.ndarray], int, int]] = {}
        self._asked: dict[int, asyncio.Future[tuple[Any, BaseException | None]]] = {}
        self.metrics: Metrics | None = None
        # the engine's regions, mirrored; registrations are asked of the engine
        self.shared_memory = SharedMemory(forward=functools.partial(self.ask, "shared_memory"))

    # requests

    async def submit(
        self,
        mv: ModelVersion,
        inputs: np.ndarray,
        deadline: float | None,
        request_id: str,
    ) -> np.ndarray:
        assert self.slots is not None and self.buffer is not None and self.channel is not None
        if self.gone.is_set():
            raise ModelNotReady("the engine is gone; the server is stopping")
        # the outputs come back in the same slot: logits, one row per image
        out_bytes = len(inputs) * max(len(mv.labels), 1) * 4
        offset, size = self.slots.take(max(inputs.nbytes, out_bytes))
        shm.view(self.buffer, offset, inputs.dtype.str, inputs.shape)[...] = inputs
        key = next(self._keys)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending[key] = (future, offset, size)
        trace = tracing.carried() if tracing.ENABLED else None  # the call's span context
        self.channel.send(("infer", key, mv.name, mv.version, offset, inputs.dtype.str,
                           inputs.shape, deadline, request_id, size, trace))  # fmt: skip
        try:
            return await future
        except asyncio.CancelledError:
            if key in self._pending:  # not answered yet: the engine drops it if it can
                self.channel.send(("cancel", key))
            raise

    def _answered(self, key: int) -> asyncio.Future[np.ndarray] | None:
        """The request's future, its slot given back (the engine is done with it)."""
        found = self._pending.pop(key, None)
        if found is None:
            return None
        future, offset, size = found
        assert self.slots is not None
        self.slots.give(offset, size)
        return None if future.done() else future

    async def ask(self, kind: str, *args: Any) -> Any:
        """What the engine answers to ``(kind, id, *args)``: model control, every process's
        metric families."""
        assert self.channel is not None
        if self.gone.is_set():
            raise ModelNotReady("the engine is gone; the server is stopping")
        ident = next(self._keys)
        future: asyncio.Future[tuple[Any, BaseException | None]]
        future = asyncio.get_running_loop().create_future()
        self._asked[ident] = future
        self.channel.send((kind, ident, *args))
        try:
            value, error = await future
        finally:
            self._asked.pop(ident, None)
        if error is not None:
            raise error
        return value

    async def families(self) -> list[Metric]:
        return list(await self.ask("families"))

    # from the engine

    def on_messages(self, messages: list[tuple[Any, ...]]) -> None:
        for message in messages:
            kind = message[0]
            if kind == "done":
                self._answered_done(message)
            elif kind == "failed":
                if (future := self._answered(message[1])) is not None:
                    future.set_exception(message[2])
            elif kind == "cancelled":
                if (future := self._answered(message[1])) is not None:
                    future.cancel()
            elif kind == "registry":
                self.snapshot = (message[1], message[2])
                if self.mirror is not None:
                    self.mirror.apply(*self.snapshot)
            elif kind == "regions":
                self.shared_memory.replace(message[1])
            elif kind == "collect":
                self._collect(message[1])
            elif kind == "sync":  # every message before it is applied
                assert self.channel is not None
                self.channel.send(("synced", message[1]))
            elif kind == "forget":  # the engine unloaded the version: its series go here too
                if self.metrics is not None:
                    self.metrics.forget(message[1], message[2])
            elif kind == "answer":
                found = self._asked.get(message[1])
                if found is not None and not found.done():
                    found.set_result((message[2], message[3]))
            elif kind == "settings":
                self.settings.set_result(message[1])
            elif kind == "attached":
                self.attached.set_result(None)

    def _answered_done(self, message: tuple[Any, ...]) -> None:
        key = message[1]
        found = self._pending.get(key)
        if found is None:
            return
        if len(message) == 3:  # carried in the message
            outputs = message[2]
        else:
            assert self.buffer is not None
            outputs = shm.view(self.buffer, found[1], message[2], message[3]).copy()
        future = self._answered(key)
        if future is not None:
            future.set_result(outputs)

    def _collect(self, ident: int) -> None:
        assert self.channel is not None
        families = list(self.metrics.registry.collect()) if self.metrics is not None else []
        self.channel.send(("collected", ident, families))

    def on_closed(self) -> None:
        """The engine is gone: every waiting request fails UNAVAILABLE, nothing is READY."""
        if self.gone.is_set():
            return
        self.gone.set()
        for starting in (self.settings, self.attached):  # gone before the front end started
            if not starting.done():
                starting.set_exception(ConnectionError("the engine process is gone"))
        error = ModelNotReady("the engine stopped before answering; retry")
        for future, _, _ in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for asked in self._asked.values():
            if not asked.done():
                asked.set_result((None, error))
        if self.mirror is not None:
            self.mirror.engine_gone()


class EngineScheduler:
    """A READY version's scheduler in a front end: the engine's batcher, over the link."""

    def __init__(self, link: EngineLink, mv: ModelVersion) -> None:
        self._link, self._mv = link, mv
        self.cell: int | None = None  # its batcher's cell on the engine's board

    async def submit(
        self, inputs: np.ndarray, *, deadline: float | None = None, request_id: str = ""
    ) -> np.ndarray:
        self.check_room(len(inputs))
        return await self._link.submit(self._mv, inputs, deadline, request_id)

    def check_room(self, count: int) -> None:
        """QueueFull unless `count` more images fit in the engine's queue as its board shows
        it (the engine, which also drops the cancelled and expired items first, decides
        again when the call reaches it); nothing when its batcher has no cell."""
        board = self._link.board
        if board is not None and self.cell is not None:
            mv = self._mv
            check_queue(board.cells[self.cell], count, mv.config.batching.max_queue_size,
                        mv.name, mv.version)  # fmt: skip

    async def close(self) -> None:
        """Nothing to close: the engine owns the batcher."""


class EngineManager:
    """Model control in a front end: what the engine's repository manager does."""

    def __init__(self, settings: Settings, link: EngineLink) -> None:
        self._settings, self._link = settings, link

    @property
    def mode(self) -> str:
        return self._settings.model_control_mode

    async def load_all(self) -> None:
        """Until the engine's start-up loading is done (or the engine is gone)."""
        loaded = asyncio.ensure_future(self._link.loaded.wait())
        gone = asyncio.ensure_future(self._link.gone.wait())
        await asyncio.wait({loaded, gone}, return_when=asyncio.FIRST_COMPLETED)
        loaded.cancel()
        gone.cancel()

    def start_polling(self) -> None:
        """The engine polls the repository."""

    async def stop(self) -> None:
        """Nothing runs here to stop."""

    async def load(self, name: str) -> None:
        await self._link.ask("control", "load", name)

    async def unload(self, name: str) -> None:
        await self._link.ask("control", "unload", name)


class Mirror:
    """The engine's registry as the front end sees it, and readiness following it."""

    def __init__(self, link: EngineLink, registry: ModelRegistry, health: Health,
                 metrics: Metrics) -> None:  # fmt: skip
        self._link, self._registry, self._health, self._metrics = link, registry, health, metrics
        self._publishing: set[asyncio.Task[None]] = set()

    def apply(self, models: list[tuple[Any, ...]], loaded: bool) -> None:
        changed: set[str] = set()
        seen = set()
        for name, config, versions in models:
            seen.add(name)
            model = self._registry.find(name)
            if model is None:
                model = Model(name, config)
                self._registry.add(model)
            model.config = config
            listed = set()
            for version, labels, path, state, reason, providers, weights, random, cell in versions:
                listed.add(version)
                mv = model.versions.get(version)
                if mv is None:
                    mv = ModelVersion(name, version, config, labels, path)
                    mv.batcher = EngineScheduler(self._link, mv)
                    model.put(mv)
                assert isinstance(mv.batcher, EngineScheduler)
                mv.batcher.cell = cell
                before = mv.state
                mv.config, mv.labels, mv.path = config, labels, path
                mv.state, mv.reason, mv.providers = State(state), reason, tuple(providers)
                mv.weights, mv.random_weights = weights, random
                if mv.state is not before:
                    changed.add(name)
                    if before is State.UNLOADING and mv.state is State.UNAVAILABLE:
                        self._metrics.forget(name, version)
            for version in set(model.versions) - listed:
                self._metrics.forget(name, version)
                model.versions = {v: m for v, m in model.versions.items() if v != version}
                changed.add(name)
        for model in self._registry.models():
            if model.name not in seen:
                self._registry.remove(model.name)
                for version in model.versions:
                    self._metrics.forget(model.name, version)
                changed.add(model.name)
        for name in changed:
            self._spawn(self._health.publish(name))
        if loaded and not self._health.is_loaded:
            self._spawn(self._health.loaded())
        if loaded:
            self._link.loaded.set()

    def engine_gone(self) -> None:
        for model in self._registry.models():
            for mv in model.versions.values():
                if mv.state is not State.UNAVAILABLE:
                    mv.state, mv.reason = State.UNAVAILABLE, "the engine process stopped"
            self._spawn(self._health.publish(model.name))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)


async def serve(sock: socket.socket, index: int, board: int, tally: int) -> int:
    link = EngineLink()
    link.board = shm.Board(board)
    link.channel = await ipc.Channel.open(sock, link.on_messages, link.on_closed, FLUSH_HOLD)
    settings = await link.settings
    logs.configure(settings.log_format, settings.log_level)
    tracing.configure(settings.trace_endpoint, f"frontend-{index}")
    link.shared_memory.limit(settings)
    name = shm.segment_name(os.getppid())
    link.buffer = shm.create(name, settings.frontend_shm_bytes)
    link.slots = shm.Slots(settings.frontend_shm_bytes)
    try:
        link.channel.send(("hello", name, settings.frontend_shm_bytes))
        await link.attached
    finally:
        shm.unlink(name)  # mapped by both: from now on it has no name
    metrics = Metrics()
    registry, draining = ModelRegistry(), Drain()
    health = Health(registry, metrics, draining, models_required=app.models_required(settings))
    link.metrics = metrics
    metrics.others = link.families  # ModelStatistics counts every process's calls
    link.mirror = Mirror(link, registry, health, metrics)
    if link.snapshot is not None:
        link.mirror.apply(*link.snapshot)
    core = app.Core(metrics, registry, draining, health, EngineManager(settings, link),
                    link.shared_memory, shm.Tally(fd=tally, row=index))  # fmt: skip
    running = await app.start(settings, core, frontend=True)
    log.info("front end %d (pid %d) serving", index, os.getpid())
    signalled = app.on_signals(settings.grace_period)
    gone = asyncio.ensure_future(link.gone.wait())
    signal_wait = asyncio.ensure_future(signalled.wait())
    await asyncio.wait({gone, signal_wait}, return_when=asyncio.FIRST_COMPLETED)
    if link.gone.is_set() and not signalled.is_set():
        log.error("front end %d: the engine process is gone; exiting", index)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(running.stop(), ENGINE_GONE_GRACE)
        return EXIT_ENGINE_GONE
    signal_wait.cancel()
    await running.stop()
    link.channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd, index, board, tally = (int(arg) for arg in args[:4])
    threads.name_process(f"rs-frontend-{index}")
    sock = socket.socket(fileno=fd)
    try:
        return asyncio.run(serve(sock, index, board, tally))
    finally:
        tracing.shutdown()  # the spans still buffered are exported


if __name__ == "__main__":
    sys.exit(main())
