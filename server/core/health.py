"""Readiness, answered in one place.

`Health` is asked by everything that says whether the server or a model is ready:
grpc.health.v1 (published here to its servicer, `Health.servicer`), v2 ``ServerLive``,
``ServerReady`` and ``ModelReady`` (`server.protocols.v2.servicer`), HTTP
``/v2/health/live``, ``/v2/health/ready`` and ``/v2/models/<name>/ready``
(`server.protocols.http`), and the drain (`server.app`):

- live (`live`): the process answers;
- the server is ready (`server_ready`) once start-up loading is done, while a model has a
  READY version, until the drain begins. With ``--model-control-mode explicit``
  (``models_required`` False) the models are the operator's to load and unload, as in
  Triton: the server is ready once the models named by ``--load-model`` are loaded (none
  named: at once; one that cannot be loaded refuses the start), until the drain begins,
  whatever is loaded or unloaded since;
- a model (version) is ready (`model_ready`) while it is READY, until the drain begins.

grpc.health.v1 says the same: SERVING for a model's name while it has a READY version,
and for the server ("") while `server_ready`; every
name NOT_SERVING from the start of the drain (`drain`). The repository manager publishes
each change it makes (`publish`).

A READY version that stops serving on its own is reported here (`not_serving`): by its
batcher's `Watchdog` — the batch scheduler died, ``max_failed_batches`` session runs
failed in a row, or one session run took longer than ``session_run_timeout`` seconds —
or by a request that found a session off the GPU it was opened on. It turns UNAVAILABLE
with the reason, one ERROR line says why, and health follows at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from server.core.registry import ModelRegistry, ModelVersion, State
from server.drain import Drain
from server.errors import ModelNotReady
from server.metrics import Metrics

log = logging.getLogger(__name__)

OVERALL = ""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Create it inside the running event loop."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        draining: Drain,
        *,
        models_required: bool = True,
    ) -> None:
        self.servicer = health_aio.HealthServicer()  # grpc.health.v1, as published here
        self._registry = registry
        self._metrics = metrics
        self._draining = draining
        self._loaded = False  # start-up loading done: the server's readiness follows the models
        self._models_required = models_required  # False: explicit model control
        self._publishing: set[asyncio.Task[None]] = set()
        # told after each change of readiness (the engine mirrors it to its front ends)
        self.listeners: list[Callable[[], None]] = []

    # the questions

    def live(self) -> bool:
        """The process answers: live for as long as it does."""
        return True

    def serving(self) -> list[str]:
        """Names of the models with a READY version."""
        return [m.name for m in self._registry.models() if m.latest_ready() is not None]

    def server_ready(self) -> bool:
        """Start-up loading is done, a model is READY (unless `models_required` is off), and
        the drain has not begun."""
        return self._loaded and self._has_models() and not self._draining.is_set()

    def why_not_ready(self) -> str:
        """Why `server_ready` is False, in a few words."""
        if self._draining.is_set():
            return "draining"
        if self._models_required:
            return "models are loading or none loaded"
        return "models are loading"

    def _has_models(self) -> bool:
        return not self._models_required or bool(self.serving())

    def model_ready(self, name: str, version: str = "") -> None:
        """Returns if model `name` (`version`, or its latest READY one) is ready; raises
        ModelNotFound (no such model or version) or ModelNotReady saying why not."""
        served = self._registry.get(name, version)
        if served.state is not State.READY or self._draining.is_set():
            raise ModelNotReady(f"model {served.name!r} version {served.version} is not ready")

    # what changes it

    async def start(self) -> None:
        """As the server starts serving: NOT_SERVING for the server and for every model found,
        unless they are ready already (a front end whose mirror came first)."""
        for model in self._registry.models():
            ready = model.latest_ready() is not None
            await self.servicer.set(model.name, SERVING if ready else NOT_SERVING)
        await self.servicer.set(OVERALL, NOT_SERVING)
        await self._publish_overall()

    async def loaded(self) -> None:
        """Start-up loading is done: from now on the server's health follows the models."""
        self._loaded = True
        self._changed()
        await self._publish_overall()

    async def publish(self, name: str) -> None:
        """Model `name`'s health as its versions now are, and the server's."""
        model = self._registry.find(name)
        ready = model is not None and model.latest_ready() is not None
        self._changed()
        await self.servicer.set(name, SERVING if ready else NOT_SERVING)
        await self._publish_overall()

    def not_serving(self, mv: ModelVersion, reason: str, detail: str = "") -> None:
        """A READY version that cannot serve any more: UNAVAILABLE with `reason` (what
        listings show; `detail` goes to the log only), one ERROR line, health published."""
        if mv.state is not State.READY:
            return
        mv.state, mv.reason = State.UNAVAILABLE, f"{reason}; the server log says more"
        log.error("model %s version %s UNAVAILABLE, no longer serving: %s", mv.name, mv.version,
                  f"{reason}: {detail}" if detail else reason)  # fmt: skip
        self._changed()
        task = asyncio.get_running_loop().create_task(self.publish(mv.name))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)
        for instance, provider in enumerate(mv.providers):
            self._metrics.execution_provider.remove(mv.name, mv.version, str(instance), provider)

    async def drain(self) -> None:
        """The drain begins: not ready from now on, every name NOT_SERVING for good."""
        self._draining.begin()
        await self.servicer.enter_graceful_shutdown()

    @property
    def is_loaded(self) -> bool:
        """Start-up loading is done."""
        return self._loaded

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    async def _publish_overall(self) -> None:
        if self._loaded:
            await self.servicer.set(OVERALL, SERVING if self._has_models() else NOT_SERVING)


class Watchdog:
    """One version's health watchdog (`server.core.batcher` and `server.core.instances`
    tell it about every session run and its scheduler): reports once, with the first
    reason, to `report` (`ModelVersion.unhealthy`)."""

    def __init__(
        self, report: Callable[[str], None] | None, *, max_failed_runs: int, run_timeout: float
    ) -> None:
        self._report_to = report
        self._max_failed = max_failed_runs
        self._run_timeout = run_timeout
        self._failed_in_a_row = 0
        self._overrun = (
            f"a session run has taken more than {run_timeout:g} s (session_run_timeout)"
        )
        self.reason = ""  # why it stopped being healthy; "" while it is
        self._keys = itertools.count()
        self._running: dict[int, float] = {}  # the runs going on → when each began
        self._timer: asyncio.TimerHandle | None = None  # at the oldest run's bound

    def run_started(self, loop: asyncio.AbstractEventLoop) -> int:
        """A session run starts now: reported if it is still going past ``run_timeout``. One
        timer watches the oldest run (not one timer per run)."""
        key = next(self._keys)
        self._running[key] = started = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(started + self._run_timeout, self._check, loop)
        return key

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if not self._running:
            return
        oldest = next(iter(self._running.values()))  # runs are kept in the order they began
        if loop.time() - oldest >= self._run_timeout:
            self.report(self._overrun)
        else:
            self._timer = loop.call_at(oldest + self._run_timeout, self._check, loop)

    def run_ended(self, run: int, seconds: float, failed: bool) -> None:
        """The run `run_started` gave `run` ended after `seconds` on the loop's clock; also
        reported past ``run_timeout`` (its answer can reach the loop before the timer does)."""
        self._running.pop(run, None)
        if seconds > self._run_timeout:
            self.report(self._overrun)
        if not failed:
            self._failed_in_a_row = 0
            return
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= self._max_failed:
            self.report(f"{self._failed_in_a_row} session runs in a row failed "
                        f"(max_failed_batches {self._max_failed})")  # fmt: skip

    def scheduler_stopped(self, error: BaseException) -> None:
        """Batch scheduling failed with `error`: nothing queued will run."""
        self.report(f"its batch scheduler stopped ({type(error).__name__})")

    def report(self, reason: str) -> None:
        """Unhealthy, once: the first reason is the one reported."""
        if self.reason:
            return
        self.reason = reason
        if self._report_to is not None:
            self._report_to(reason)
