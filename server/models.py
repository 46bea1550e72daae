"""The model registry: every model of the repository, its versions, their states.

Internal API (used by every servicer)::

    registry = ModelRegistry(settings, metrics)
    await registry.load_all(on_ready)          # verify, open sessions, warm up
    registry.model("resnet18")                 # the Model, all versions, any state
    model = registry.get("resnet18")           # latest READY version, or
    model = registry.get("resnet18", "1")      # that version; raises ModelNotFound /
                                               # ModelNotReady (errors.py)
    logits = await model.infer(batch, deadline=time.monotonic() + 2, request_id="r-1")

``batch`` is the graph's input, batch axis first: float32 NCHW or uint8 NHWC
as ``model.config.input`` says (`server.preprocess` makes them from images).
``infer`` validates dtype, shape and finiteness (InvalidInput), queues the
images on the version's `Batcher` and returns the logits, one row per image.
``registry.models()`` lists every `Model` with all its versions, including
the UNAVAILABLE ones and why.

A version is served only if `server.repository.check_version` says so
(``verification.json`` exists, says ``"passed": true`` and its ``sha256``
matches ``model.onnx``); otherwise it is UNAVAILABLE with the reason logged in
one line, and the others still serve.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.batcher import Batcher
from server.config import Settings
from server.errors import InvalidInput, ModelNotFound, ModelNotReady
from server.metrics import Metrics
from server.repository import MODEL_FILE, ModelConfig, check_version, read_labels, version_dirs
from server.sessions import Runner, graph_feed_dtype, open_session

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


class LoadError(Exception):
    """A version that cannot be served; the message is the one log line."""


LOAD_FAILED = "could not be loaded; the server log says why"


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: str
    config: ModelConfig
    labels: list[str]
    path: Path
    state: State = State.LOADING
    reason: str = ""
    provider: str = ""
    batcher: Batcher | None = None
    weights: str = ""  # where the weights came from, as the build recorded it
    random_weights: bool = False  # seeded random weights: an untrained model

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.config.input.dtype)

    async def infer(
        self, batch: np.ndarray, *, deadline: float | None = None, request_id: str = ""
    ) -> np.ndarray:
        """Logits for `batch` (see the module docstring); deadline is `time.monotonic()`."""
        if self.state is not State.READY or self.batcher is None:
            raise ModelNotReady(f"model {self.name} version {self.version} is {self.state.value}")
        self.check_input(batch)
        return await self.batcher.submit(batch, deadline=deadline, request_id=request_id)

    def check_input(self, batch: np.ndarray) -> None:
        spec = self.config.input
        expected = spec.shape()
        if batch.dtype != self.input_dtype:
            raise InvalidInput(
                f"model {self.name} takes {spec.dtype} input, got {batch.dtype.name}"
            )
        if batch.ndim != 4 or list(batch.shape[1:]) != expected[1:] or len(batch) == 0:
            raise InvalidInput(
                f"model {self.name} takes input of shape {expected} ({spec.layout}, "
                f"batch >= 1), got {list(batch.shape)}"
            )


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
        return max(ready, key=lambda v: int(v.version), default=None)


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
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

    def scan(self) -> None:
        """Read every model's config and version directories (no sessions yet)."""
        repo = self._settings.repo
        if not repo.is_dir():
            raise FileNotFoundError(f"model repository {repo} is not a directory")
        for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
            try:
                config = ModelConfig.load(model_dir)
                labels = read_labels(model_dir, config)
            except (OSError, ValueError) as exc:
                log.error("model %s skipped: %s", model_dir.name, _one_line(exc))
                continue
            model = Model(model_dir.name, config)
            for vdir in version_dirs(model_dir):
                model.versions[vdir.name] = ModelVersion(
                    model.name, vdir.name, config, labels, vdir
                )
            self._models[model.name] = model

    async def load_all(self, on_ready: Callable[[Model], Awaitable[None]]) -> None:
        """Load every version; `on_ready(model)` once a model has its first READY version."""
        for model in self.models():
            for version in model.versions.values():
                await self._load(version)
            if model.latest_ready() is not None:
                await on_ready(model)

    async def close(self) -> None:
        for model in self._models.values():
            for version in model.versions.values():
                if version.batcher is not None:
                    await version.batcher.close()

    async def _load(self, mv: ModelVersion) -> None:
        started = time.monotonic()
        batcher: Batcher | None = None
        try:
            check = await asyncio.to_thread(check_version, mv.path)
            if not check.servable:
                raise LoadError(check.reason)
            mv.weights = check.weights
            mv.random_weights = check.record is not None and check.record.random_weights
            runners = await asyncio.to_thread(self._open_runners, mv)
            batcher = Batcher(mv.name, mv.version, runners, mv.config.batching, self._metrics)
            batcher.start()
            sizes = warmup_sizes(mv)
            for size in sizes:
                await batcher.run_direct(np.zeros(mv.config.input.shape(size), mv.input_dtype))
        # Whatever the reason (ONNX Runtime's own exceptions are not RuntimeErrors), one
        # version that cannot load is refused and logged; the others still load.
        except Exception as exc:
            detail = _one_line(exc)
            log.error("model %s version %s refused: %s", mv.name, mv.version, detail)
            # callers see the reason (ListModels, RepositoryIndex): only ours, never a path or
            # a runtime's internals, which stay in the log
            mv.state = State.UNAVAILABLE
            mv.reason = detail if isinstance(exc, LoadError) else LOAD_FAILED
            if batcher is not None:  # warm-up failed: stop its scheduler and threads
                await batcher.close()
            return
        mv.batcher, mv.provider, mv.state = batcher, runners[0].provider, State.READY
        seconds = time.monotonic() - started
        self._metrics.load_seconds.labels(mv.name, mv.version).set(seconds)
        log.info(
            "model %s version %s READY in %.1f s: %d instance(s) on %s, warmed at batch sizes %s, "
            "weights: %s",
            mv.name, mv.version, seconds, len(runners), mv.provider, list(sizes),
            mv.weights or "not recorded",
        )  # fmt: skip
        if mv.random_weights:
            log.warning(
                "model %s version %s has RANDOM weights (%s): an untrained model whose classes "
                "mean nothing; build it with --weights torchvision or a checkpoint",
                mv.name, mv.version, mv.weights,
            )  # fmt: skip

    def _open_runners(self, mv: ModelVersion) -> list[Runner]:
        settings = self._settings
        count = settings.instances_for(mv.config.instances.count)
        threads = settings.threads_per_session(count, mv.config.instances.intra_op_threads)
        runners = []
        for _ in range(count):
            opened = open_session(mv.path / MODEL_FILE, settings, threads)
            runners.append(
                Runner(
                    opened,
                    mv.config.input.name,
                    mv.config.output.name,
                    io_binding=settings.io_binding,
                    device_id=settings.cuda_device_id,
                    feed_dtype=graph_feed_dtype(opened.session),
                )
            )
        log.info(
            "model %s version %s runs on %s (%s), %d intra-op thread(s) per session",
            mv.name, mv.version, opened.provider, opened.reason, threads,
        )  # fmt: skip
        return runners


def warmup_sizes(mv: ModelVersion) -> tuple[int, ...]:
    """Batch sizes run before READY: 1, 2, 4, … below the maximum, each preferred size, the
    maximum — what a batcher aiming at preferred sizes sends, and a spread of the sizes that
    dynamic batching forms in between (warming all of 1…max would multiply start-up time).
    """
    batching = mv.config.batching
    powers = {1 << i for i in range(batching.max_batch_size.bit_length())}
    return tuple(sorted({*powers, *batching.preferred_batch_sizes, batching.max_batch_size}))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
