"""The model registry: every model of the repository, its versions, their states.

Internal API (used by every servicer)::

    registry = ModelRegistry(settings, metrics)
    registry.scan()                            # configs and version directories
    await registry.load_version(mv, "at start-up")   # verify, open sessions, warm up
    registry.model("resnet18")                 # the Model, all versions, any state
    model = registry.get("resnet18")           # latest READY version, or
    model = registry.get("resnet18", "1")      # that version; raises ModelNotFound /
                                               # ModelNotReady (errors.py)
    logits = await model.infer(batch, deadline=time.monotonic() + 2, request_id="r-1")

``batch`` is the graph's input, batch axis first: float32 NCHW or uint8 NHWC
as ``model.config.input`` says (`server.preprocess` makes them from images).
``infer`` validates dtype, shape and finiteness (InvalidInput), queues the
images on the version's `Batcher` (`server.core.batcher`) and returns the logits, one row per image.
``registry.models()`` lists every `Model` with all its versions, including
the UNAVAILABLE ones and why.

A version is served only if `server.repository.check_version` says so
(its files inside the repository, ``verification.json`` exists, says
``"passed": true`` and its ``sha256`` matches ``model.onnx``); otherwise it is
UNAVAILABLE with the reason logged in one line, and the others still serve.
``model.onnx`` is read once, by the check: its sessions are created from the
bytes that were hashed, never from the file again.

Where each version runs: every instance's provider is recorded (`ModelVersion.providers`,
the metric ``resnet_serve_execution_provider``). A version's instances all run on the
GPU or all on the CPU. With ``--device auto`` a version whose sessions or warm-up fail
on the GPU is reopened on the CPU, and the log says why; with ``--device cuda`` that is
`DeviceUnavailable`, which ends loading and so the server's start. A session that
leaves the GPU while serving (`ProviderLost`) makes its version UNAVAILABLE.

Which versions are loaded, and when, is decided by `server.lifecycle` (version policy,
repository polling, explicit load and unload); here are the steps it takes:
`load_version` (LOADING → READY or UNAVAILABLE) and `unload_version` (UNLOADING: no new
requests, the ones holding the version finish, then the batcher closes). A request
holds the version it was given from lookup to answer (`ModelVersion.hold`), so an
unload never fails a request that was already let in.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server import threads
from server.config import Settings
from server.core.batcher import Batcher
from server.errors import InvalidInput, ModelNotFound, ModelNotReady
from server.logs import one_line
from server.metrics import Metrics
from server.repository import (
    InputSpec,
    ModelConfig,
    check_version,
    model_dirs,
    read_labels,
    version_dirs,
)
from server.sessions import (
    CPU,
    DeviceUnavailable,
    Opened,
    ProviderLost,
    Runner,
    cuda_driver_present,
    cuda_total_memory,
    gpu_mem_limit,
    graph_feed_dtype,
    open_session,
)

log = logging.getLogger(__name__)


class State(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"  # no new requests; those holding it finish, then it closes
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
    providers: tuple[str, ...] = ()  # each instance's execution provider, once READY
    batcher: Batcher | None = None
    weights: str = ""  # where the weights came from, as the build recorded it
    random_weights: bool = False  # seeded random weights: an untrained model
    on_lost: Callable[[ModelVersion, ProviderLost], None] | None = field(
        default=None, repr=False
    )

    @property
    def provider(self) -> str:
        """The provider of the version's instances ("" before READY); they all share one."""
        return self.providers[0] if self.providers else ""
    _holders: int = field(default=0, init=False, repr=False)
    _released: asyncio.Event | None = field(default=None, init=False, repr=False)

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.config.input.dtype)

    @contextlib.contextmanager
    def hold(self) -> Iterator[ModelVersion]:
        """Keep the version open while a request that looked it up is being answered."""
        self._holders += 1
        try:
            yield self
        finally:
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

    async def infer(
        self, batch: np.ndarray, *, deadline: float | None = None, request_id: str = ""
    ) -> np.ndarray:
        """Logits for `batch` (see the module docstring); deadline is `time.monotonic()`."""
        # UNLOADING: a request let in before the unload began still gets its answer
        if self.state not in (State.READY, State.UNLOADING) or self.batcher is None:
            raise ModelNotReady(f"model {self.name} version {self.version} is {self.state.value}")
        self.check_input(batch)
        try:
            return await self.batcher.submit(batch, deadline=deadline, request_id=request_id)
        except ProviderLost as exc:
            if self.on_lost is not None:
                self.on_lost(self, exc)
            raise ModelNotReady(
                f"model {self.name} version {self.version} is {self.state.value}: {self.reason}"
            ) from exc

    def check_input(self, batch: np.ndarray) -> None:
        spec = self.config.input
        if batch.dtype != self.input_dtype:
            raise InvalidInput(
                f"model {self.name} takes {spec.dtype} input, got {batch.dtype.name}"
            )
        check_batch_shape(self.name, spec, batch.shape)


def check_batch_shape(model: str, spec: InputSpec, shape: Sequence[int]) -> None:
    """A batch of the graph's input: [N, *the model's dimensions] with N >= 1 (checked by the
    protocols on a declared shape before they read any data, and on every batch here)."""
    expected = spec.shape()
    if len(shape) != 4 or list(shape[1:]) != expected[1:] or shape[0] < 1:
        raise InvalidInput(
            f"model {model} takes input of shape {expected} ({spec.layout}, "
            f"batch >= 1), got {list(shape)}"
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
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        opener: Callable[..., Opened] = open_session,
        gpu_memory: Callable[[int], int | None] | None = None,
    ) -> None:
        """`opener` opens one session from a model's bytes (`server.sessions.open_session`'s
        signature) and `gpu_memory(device_id)` says how many bytes a GPU has: both are
        injected in tests."""
        self._settings = settings
        self._metrics = metrics
        self._models: dict[str, Model] = {}
        self._opener = opener
        self._gpu_memory = gpu_memory or _gpu_memory_if_driver
        self._mem_limit: int | None = None
        # told when a READY version stops serving (`unavailable`); the lifecycle publishes
        # health from it
        self.on_unavailable: Callable[[ModelVersion], None] | None = None

    @property
    def settings(self) -> Settings:
        return self._settings

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

    def scan(self) -> None:
        """Read every model's config and version directories (no sessions yet)."""
        repo = self._settings.repo
        if not repo.is_dir():
            raise FileNotFoundError(f"model repository {repo} is not a directory")
        for model_dir in model_dirs(repo):
            try:
                config = ModelConfig.load(model_dir)
                labels = read_labels(model_dir, config)
            except (OSError, ValueError) as exc:
                log.error("model %s skipped: %s", model_dir.name, one_line(exc))
                continue
            model = Model(model_dir.name, config)
            for vdir in version_dirs(model_dir):
                model.versions[vdir.name] = ModelVersion(
                    model.name, vdir.name, config, labels, vdir
                )
            self._models[model.name] = model

    def session_mem_limit(self) -> int | None:
        """Each GPU session's arena limit: its share of the GPU among every session the
        repository asks for (each version of each model, times its instances)."""
        if self._settings.device == "cpu" or self._settings.cuda_mem_limit is not None:
            return None
        sessions = sum(
            len(model.versions) * self._settings.instances_for(model.config.instances.count)
            for model in self.models()
        )
        return gpu_mem_limit(self._gpu_memory(self._settings.cuda_device_id), sessions)

    async def plan_gpu_memory(self) -> None:
        """Size each GPU session's arena for the models found at start; call before loading.

        Loading raises `DeviceUnavailable` (``--device cuda`` and a version cannot run on
        the GPU)."""
        self._mem_limit = await asyncio.to_thread(self.session_mem_limit)

    def add(self, model: Model) -> None:
        self._models[model.name] = model

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    async def close(self) -> None:
        for model in list(self._models.values()):
            for version in list(model.versions.values()):
                if version.batcher is not None:
                    await version.batcher.close()

    async def load_version(self, mv: ModelVersion, reason: str) -> bool:
        """Load, check and warm `mv` (state LOADING meanwhile), logging why; True if READY."""
        log.info("loading model %s version %s: %s", mv.name, mv.version, reason)
        mv.state, mv.reason = State.LOADING, ""
        await self._load(mv)
        ready = mv.state is State.READY
        self._metrics.loads.labels(mv.name, mv.version, "ok" if ready else "failed").inc()
        return ready

    async def unload_version(self, mv: ModelVersion, reason: str, kind: str) -> None:
        """Stop giving `mv` to new requests, let the ones holding it finish (at most the
        grace period), close its batcher, forget its metrics. `reason` is what listings show
        and the log says; `kind` (removed, policy, request) labels the unloads counter."""
        started = time.monotonic()
        was_serving = mv.batcher is not None
        mv.state, mv.reason = State.UNLOADING, reason
        if not await mv.released(self._settings.grace_period):
            log.warning(
                "model %s version %s: requests still running after %.0f s; unloading anyway",
                mv.name, mv.version, self._settings.grace_period,
            )  # fmt: skip
        batcher, mv.batcher = mv.batcher, None
        if batcher is not None:
            await batcher.close()
        mv.state = State.UNAVAILABLE
        if was_serving:
            self._metrics.unloads.labels(mv.name, mv.version, kind).inc()
            self._metrics.forget(mv.name, mv.version)
            log.info(
                "model %s version %s unloaded in %.1f s: %s",
                mv.name, mv.version, time.monotonic() - started, reason,
            )  # fmt: skip

    async def _load(self, mv: ModelVersion) -> None:
        started = time.monotonic()
        batcher: Batcher | None = None
        try:
            check = await asyncio.to_thread(
                check_version, mv.path, labels=mv.config.labels, keep_model=True
            )
            if not check.servable or check.model is None:
                raise LoadError(check.reason)
            mv.weights = check.weights
            mv.random_weights = check.record is not None and check.record.random_weights
            model = check.model
            runners = await asyncio.to_thread(self._open_runners, mv, model, self._settings)
            try:
                batcher, sizes = await self._start(mv, runners)
            except Exception as exc:
                if runners[0].provider == CPU:
                    raise
                why = f"warm-up on {runners[0].provider} failed: {one_line(exc)}"
                if self._settings.device == "cuda":
                    raise DeviceUnavailable(f"--device cuda, but {why}") from exc
                log.warning("model %s version %s: %s; reopening it on the CPU",
                            mv.name, mv.version, why)  # fmt: skip
                cpu = self._settings.model_copy(update={"device": "cpu"})
                runners = await asyncio.to_thread(self._open_runners, mv, model, cpu)
                batcher, sizes = await self._start(mv, runners)
        except DeviceUnavailable:
            raise
        # Whatever the reason (ONNX Runtime's own exceptions are not RuntimeErrors), one
        # version that cannot load is refused and logged; the others still load.
        except Exception as exc:
            detail = one_line(exc)
            log.error("model %s version %s refused: %s", mv.name, mv.version, detail)
            # callers see the reason (ListModels, RepositoryIndex): only ours, never a path or
            # a runtime's internals, which stay in the log
            mv.state = State.UNAVAILABLE
            mv.reason = detail if isinstance(exc, LoadError) else LOAD_FAILED
            if batcher is not None:  # warm-up failed: stop its scheduler and threads
                await batcher.close()
            return
        mv.batcher, mv.state = batcher, State.READY
        mv.providers = tuple(r.provider for r in runners)
        mv.on_lost = self._provider_lost
        for runner in runners:
            self._metrics.execution_provider.labels(
                mv.name, mv.version, str(runner.instance), runner.provider
            ).set(1)
        seconds = time.monotonic() - started
        self._metrics.load_seconds.labels(mv.name, mv.version).set(seconds)
        log.info(
            "model %s version %s READY in %.1f s: %d instance(s) on %s, warmed at batch sizes %s, "
            "weights: %s",
            mv.name, mv.version, seconds, len(runners), mv.provider, _ranges(sizes),
            mv.weights or "not recorded",
        )  # fmt: skip
        if mv.random_weights:
            log.warning(
                "model %s version %s has RANDOM weights (%s): an untrained model whose classes "
                "mean nothing; build it with --weights torchvision or a checkpoint",
                mv.name, mv.version, mv.weights,
            )  # fmt: skip

    async def _start(self, mv: ModelVersion, runners: list[Runner]) -> tuple[Batcher, list[int]]:
        """A started batcher over `runners`, each instance warmed at every size it will see."""
        settings = self._settings
        batcher = Batcher(
            mv.name, mv.version, runners, mv.config.batching, self._metrics,
            on_unhealthy=lambda reason: self.unavailable(mv, reason),
            max_failed_batches=settings.max_failed_batches,
            run_timeout=settings.session_run_timeout,
        )  # fmt: skip
        batcher.start()
        sizes = warmup_sizes(mv.config, runners[0])
        try:
            for size in sizes:
                zeros = np.zeros(mv.config.input.shape(size), mv.input_dtype)
                await batcher.instances.run_on_each(zeros)
        except BaseException:
            await batcher.close()  # stop its scheduler and threads
            raise
        return batcher, sizes

    def _open_runners(self, mv: ModelVersion, model: bytes, settings: Settings) -> list[Runner]:
        """Every instance's session, from `model` (the verified bytes of model.onnx); all on
        the GPU or, with ``--device auto``, all on the CPU."""
        count = settings.instances_for(mv.config.instances.count)
        intra_op = settings.threads_per_session(count, mv.config.instances.intra_op_threads)
        opened = []
        for _ in range(count):
            with threads.opening("onnxruntime"):  # its intra-op pool: see server.threads
                one = self._opener(
                    model, settings, intra_op, config=mv.config, mem_limit=self._mem_limit
                )
            opened.append(one)
            if opened[-1].provider == CPU and opened[0].provider != CPU:
                # a later instance did not come up on the GPU: one device for all of them
                log.warning("model %s version %s: instance %d not on the GPU (%s); "
                            "opening every instance on the CPU",
                            mv.name, mv.version, len(opened) - 1, opened[-1].reason)  # fmt: skip
                cpu = settings.model_copy(update={"device": "cpu"})
                return self._open_runners(mv, model, cpu)
        buckets = mv.config.batch_buckets()
        runners = [
            Runner(
                one,
                mv.config.input.name,
                mv.config.output.name,
                io_binding=settings.io_binding,
                device_id=settings.cuda_device_id,
                feed_dtype=graph_feed_dtype(one.session),
                buckets=buckets,
                pinned=settings.pinned_memory,
                graphs=mv.config.optimization.cuda.graphs,
                instance=index,
            )
            for index, one in enumerate(opened)
        ]
        first = opened[0]
        log.info(
            "model %s version %s runs on %s (%s), %d instance(s), %d intra-op thread(s) each",
            mv.name, mv.version, first.provider, first.reason, count, intra_op,
        )  # fmt: skip
        return runners

    def _provider_lost(self, mv: ModelVersion, exc: ProviderLost) -> None:
        """A session left the GPU while serving: the version stops serving, and says why."""
        self.unavailable(mv, "a session left the GPU it was opened on", one_line(exc))

    def unavailable(self, mv: ModelVersion, reason: str, detail: str = "") -> None:
        """A READY version that cannot serve any more (its batcher reports it unhealthy, a
        session left the GPU): UNAVAILABLE with `reason` (what listings show; `detail` goes
        to the log only), one ERROR line, and `on_unavailable` tells health."""
        if mv.state is not State.READY:
            return
        mv.state, mv.reason = State.UNAVAILABLE, f"{reason}; the server log says more"
        log.error("model %s version %s UNAVAILABLE, no longer serving: %s", mv.name, mv.version,
                  f"{reason}: {detail}" if detail else reason)  # fmt: skip
        if self.on_unavailable is not None:
            self.on_unavailable(mv)
        for instance, provider in enumerate(mv.providers):
            self._metrics.execution_provider.remove(mv.name, mv.version, str(instance), provider)


def warmup_sizes(config: ModelConfig, runner: Runner | None = None) -> list[int]:
    """Batch sizes run on each instance before READY.

    - GPU with bucket sizes (config.json ``optimization.cuda.batch_buckets``): the buckets,
      the only shapes the session will see.
    - GPU without: every size 1..max_batch_size. Each new input shape costs a cuDNN
      algorithm choice (and with EXHAUSTIVE search, a search) on first use; warming them
      all keeps that off the request path, at one run per size (32 by default).
    - CPU: 1, 2, 4, … below the maximum, each preferred size, the maximum — what a batcher
      aiming at preferred sizes sends, and a spread of the sizes dynamic batching forms in
      between (the CPU provider has no per-shape search; all of 1…max would multiply
      start-up time for little).
    """
    batching = config.batching
    if runner is not None and runner.provider != CPU:
        return list(runner.buckets or range(1, batching.max_batch_size + 1))
    powers = {1 << i for i in range(batching.max_batch_size.bit_length())}
    return sorted({*powers, *batching.preferred_batch_sizes, batching.max_batch_size})


def _gpu_memory_if_driver(device_id: int) -> int | None:
    return cuda_total_memory(device_id) if cuda_driver_present() else None


def _ranges(sizes: list[int]) -> str:
    """``[1, 2, 3, 4, 8]`` as ``1-4, 8``: the log line stays short when every size is warmed."""
    parts: list[str] = []
    start = prev = sizes[0]
    for size in [*sizes[1:], None]:
        if size is not None and size == prev + 1:
            prev = size
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if size is not None:
            start = prev = size
    return ", ".join(parts)
