"""The registry: every model of the repository, its versions, their states; lookup.

Internal API (used by every servicer)::

    registry.model("resnet18")                 # the Model, all versions, any state
    model = registry.get("resnet18")           # latest READY version, or
    model = registry.get("resnet18", "1")      # that version; raises ModelNotFound /
                                               # ModelNotReady (errors.py)
    logits = await model.infer(batch, deadline=time.monotonic() + 2, request_id="r-1")

``batch`` is the graph's input, batch axis first: float32 NCHW or uint8 NHWC
as ``model.config.input`` says (`server.preprocess` makes them from images).
``infer`` takes what `server.validation` accepted (it checks nothing again), queues the
images on the version's batcher (`server.core.batcher`) and returns the logits, one row
per image. ``registry.models()`` lists every `Model` with all its versions, including
the UNAVAILABLE ones and why.

What fills the registry and changes the states is elsewhere: `server.core.manager` reads
the repository and decides which versions serve, `server.core.loader` loads (LOADING →
READY or UNAVAILABLE) and unloads (UNLOADING → UNAVAILABLE) one version, and a READY
version that stops serving on its own is reported to `server.core.health`
(`ModelVersion.unhealthy`). A request holds the version it was given from lookup to
answer (`ModelVersion.hold`), so an unload never fails a request that was already let in.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from server.errors import ModelNotFound, ModelNotReady
from server.logs import one_line
from server.repository import ModelConfig
from server.sessions import ProviderLost


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"  # no new requests; those holding it finish, then it closes
    UNAVAILABLE = "UNAVAILABLE"


class Scheduler(Protocol):
    """What a READY version queues its batches on (`server.core.batcher.Batcher`)."""

    async def submit(
        self, inputs: np.ndarray, *, deadline: float | None = None, request_id: str = ""
    ) -> np.ndarray: ...

    def check_room(self, count: int) -> None:
        """QueueFull unless `count` more images fit in the queue now."""

    async def close(self) -> None: ...


# Told that a version cannot serve any more: the version, why (what listings show), and
# a detail for the log only (`server.core.health.Health.not_serving`).
Unhealthy = Callable[["ModelVersion", str, str], None]


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: str
    config: ModelConfig
    labels: list[str]
    path: Path
    state: State = State.LOADING
    reason: str = ""
    providers: tuple[str, ...] = ()  # each instance's execution provider, once READY
    batcher: Scheduler | None = None
    weights: str = ""  # where the weights came from, as the build recorded it
    random_weights: bool = False  # seeded random weights: an untrained model
    on_unhealthy: Unhealthy | None = field(default=None, repr=False)
    _holders: int = field(default=0, init=False, repr=False)
    _released: asyncio.Event | None = field(default=None, init=False, repr=False)

    @property
    def provider(self) -> str:
        """The provider of the version's instances ("" before READY); they all share one."""
        return self.providers[0] if self.providers else ""

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.config.input.dtype)

    @contextlib.contextmanager
    def hold(self) -> Iterator[ModelVersion]:
        """Keep the version open while a request that looked it up is being answered."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def acquire(self) -> None:
        """`hold` in two calls, for a request answered by a callback (`server.engine`)."""
        self._holders += 1

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0 and self._released is not None:
            self._released.set()

    async def released(self, timeout: float) -> bool:
        """Wait until no request holds the version (at most `timeout` s); False if some do."""
        if self._holders == 0:
            return True
        self._released = asyncio.Event()
        try:
            await asyncio.wait_for(self._released.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def unhealthy(self, reason: str, detail: str = "") -> None:
        """The version cannot serve any more (its batcher's watchdog, a session that left the
        GPU): the one report, to `on_unhealthy`."""
        if self.on_unhealthy is not None:
            self.on_unhealthy(self, reason, detail)

    async def infer(
        self, batch: np.ndarray, *, deadline: float | None = None, request_id: str = ""
    ) -> np.ndarray:
        """Logits for `batch` (see the module docstring); deadline is `time.monotonic()`."""
        scheduler = self.scheduler()
        try:
            return await scheduler.submit(batch, deadline=deadline, request_id=request_id)
        except ProviderLost as exc:
            raise self.lost(exc) from exc

    def scheduler(self) -> Scheduler:
        """The batcher to queue on; ModelNotReady unless READY (or UNLOADING: a request let
        in before the unload began still gets its answer)."""
        if self.state not in (State.READY, State.UNLOADING) or self.batcher is None:
            raise ModelNotReady(f"model {self.name} version {self.version} is {self.state.value}")
        return self.batcher

    def lost(self, exc: ProviderLost) -> ModelNotReady:
        """A session left its GPU: the version stops serving; what the caller gets."""
        self.unhealthy("a session left the GPU it was opened on", one_line(exc))
        return ModelNotReady(
            f"model {self.name} version {self.version} is {self.state.value}: {self.reason}"
        )


def version_number(mv: ModelVersion) -> int:
    """The order of versions: by number (2 before 10), not as text."""
    return int(mv.version)


def by_version(versions: Iterable[ModelVersion]) -> list[ModelVersion]:
    """`versions` lowest first (`version_number`)."""
    return sorted(versions, key=version_number)


@dataclass(eq=False)
class Model:
    name: str
    config: ModelConfig
    versions: dict[str, ModelVersion] = field(default_factory=dict)

    def version(self, version: str) -> ModelVersion:
        """That version, whatever its state."""
        found = self.versions.get(version)
        if found is None:
            known = ", ".join(self.versions) or "none"
            raise ModelNotFound(
                f"model {self.name!r} has no version {version!r}; versions: {known}"
            )
        return found

    def latest_ready(self) -> ModelVersion | None:
        ready = [v for v in self.versions.values() if v.state is State.READY]
        return max(ready, key=version_number, default=None)

    def put(self, mv: ModelVersion) -> None:
        """Add or replace `mv` in the versions, kept in version order (listings)."""
        versions = {**self.versions, mv.version: mv}
        self.versions = {v.version: v for v in by_version(versions.values())}


class ModelRegistry:
    """The models by name; filled by `server.core.manager`."""

    def __init__(self) -> None:
        self._models: dict[str, Model] = {}

    def models(self) -> list[Model]:
        return sorted(self._models.values(), key=lambda m: m.name)

    def model(self, name: str) -> Model:
        """A model of the repository, whatever the states of its versions."""
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; models: {known}")
        return model

    def find(self, name: str) -> Model | None:
        return self._models.get(name)

    def get(self, name: str, version: str = "") -> ModelVersion:
        """A READY version: `version`, or the latest READY one when empty."""
        model = self.model(name)
        if not version:
            latest = model.latest_ready()
            if latest is None:
                raise ModelNotReady(f"model {name!r} has no READY version")
            return latest
        found = model.version(version)
        if found.state is not State.READY:
            why = f": {found.reason}" if found.reason else ""
            raise ModelNotReady(f"model {name!r} version {version} is {found.state.value}{why}")
        return found

    def add(self, model: Model) -> None:
        self._models[model.name] = model

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    async def close(self) -> None:
        """Close every version's batcher (the server is stopping)."""
        for model in list(self._models.values()):
            for version in list(model.versions.values()):
                if version.batcher is not None:
                    await version.batcher.close()
