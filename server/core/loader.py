"""Loading and unloading one model version: its sessions, where they run, warm-up.

    loader = Loader(settings, registry, health, metrics)
    await loader.plan_gpu_memory()                  # each GPU session's share, before loading
    await loader.load(mv, "at start-up")            # verify, open sessions, warm up
    await loader.unload(mv, "removed from the repository", "removed")

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
`DeviceUnavailable`, which ends loading and so the server's start; after the start (a
poll, a v2 load) that version alone is refused, UNAVAILABLE. A session that
leaves the GPU while serving (`ProviderLost`) makes its version UNAVAILABLE
(`server.core.health`).

Which versions are loaded, and when, is decided by `server.core.manager` (version policy,
repository polling, explicit load and unload); here are the steps it takes:
`load` (LOADING → READY or UNAVAILABLE) and `unload` (UNLOADING: no new requests, the
ones holding the version finish, then the batcher closes).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable

import numpy as np

from server import threads
from server.config import Settings
from server.core.batcher import Batcher
from server.core.health import Health
from server.core.registry import Model, ModelRegistry, ModelVersion, State
from server.logs import one_line
from server.metrics import Metrics
from server.providers import CPU, cuda_driver_present, cuda_total_memory
from server.repository import ModelConfig, check_version
from server.sessions import DeviceUnavailable, Opened, Runner, graph_feed_dtype, open_session

log = logging.getLogger(__name__)

# glibc's malloc: the freed memory of unloaded sessions goes back to the system
# (`release_freed_memory`), and the serving process keeps at most MALLOC_ARENA_MAX heaps
# (`limit_malloc_arenas`: 2 unless the environment says otherwise) instead of up to 8 per
# core: every load starts new threads, and each new thread's heap kept the freed pages of
# the last ones. Over 100 load/unload cycles of a small model, RSS grew 103 % with neither,
# 20-40 % with the trim alone, and stays within 10 % with both (docs/decisions/0011).
M_ARENA_MAX = -8  # malloc.h
MALLOC_ARENAS = 2
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018  (glibc only)
except (OSError, AttributeError):
    _LIBC = None


def limit_malloc_arenas() -> None:
    """The serving process's malloc arenas capped at `MALLOC_ARENAS` (unless the environment
    sets MALLOC_ARENA_MAX); called once by the process entry, before its threads start."""
    if _LIBC is not None and "MALLOC_ARENA_MAX" not in os.environ:
        _LIBC.mallopt(M_ARENA_MAX, MALLOC_ARENAS)


class LoadError(Exception):
    """A version that cannot be served; the message is the one log line."""


LOAD_FAILED = "could not be loaded; the server log says why"
NOT_ON_GPU = "does not run on the GPU (--device cuda); the server log says why"

# The share of a GPU's memory the sessions of one server divide between them when
# --cuda-mem-limit is unset; the rest is left to the CUDA context, cuDNN/cuBLAS
# handles and workspaces that live outside ONNX Runtime's arena.
GPU_MEMORY_SHARE = 0.8


class Loader:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        health: Health,
        metrics: Metrics,
        *,
        opener: Callable[..., Opened] = open_session,
        gpu_memory: Callable[[int], int | None] | None = None,
    ) -> None:
        """`opener` opens one session from a model's bytes (`server.sessions.open_session`'s
        signature) and `gpu_memory(device_id)` says how many bytes a GPU has: both are
        injected in tests."""
        self._settings = settings
        self._registry = registry
        self._health = health
        self._metrics = metrics
        self._opener = opener
        self._gpu_memory = gpu_memory or _gpu_memory_if_driver
        self._mem_limit: int | None = None
        # True while the models found at start load: `DeviceUnavailable` then ends loading
        # (and the start); after it, a version that cannot run on the GPU is refused alone
        self.starting = True

    def session_mem_limit(self) -> int | None:
        """Each GPU session's arena limit: its share of the GPU among every session the
        repository asks for (each version of each model its version policy can serve, times
        its instances)."""
        if self._settings.device == "cpu" or self._settings.cuda_mem_limit is not None:
            return None
        sessions = sum(
            _serving_at_most(model) * self._settings.instances_for(model.config.instances.count)
            for model in self._registry.models()
        )
        return gpu_mem_limit(self._gpu_memory(self._settings.cuda_device_id), sessions)

    async def plan_gpu_memory(self) -> None:
        """Size each GPU session's arena for the models found at start; call before loading.

        Loading raises `DeviceUnavailable` (``--device cuda`` and a version cannot run on
        the GPU)."""
        self._mem_limit = await asyncio.to_thread(self.session_mem_limit)

    async def load(self, mv: ModelVersion, reason: str) -> bool:
        """Load, check and warm `mv` (state LOADING meanwhile), logging why; True if READY."""
        log.info("loading model %s version %s: %s", mv.name, mv.version, reason)
        mv.state, mv.reason = State.LOADING, ""
        await self._load(mv)
        ready = mv.state is State.READY
        self._metrics.loads.labels(mv.name, mv.version, "ok" if ready else "failed").inc()
        return ready

    async def unload(self, mv: ModelVersion, reason: str, kind: str) -> None:
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
            del batcher  # the last reference to its sessions: their memory is freed here
            await asyncio.to_thread(release_freed_memory)
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
        try:
            model, precision = await self._verified(mv)
            batcher, runners, sizes = await self._open_and_warm(mv, model)
        except DeviceUnavailable as exc:
            if self.starting:
                raise
            mv.state, mv.reason = State.UNAVAILABLE, NOT_ON_GPU
            log.error("model %s version %s refused: %s", mv.name, mv.version, one_line(exc))
            return
        # Whatever the reason (ONNX Runtime's own exceptions are not RuntimeErrors), one
        # version that cannot load is refused and logged; the others still load.
        except Exception as exc:
            detail = one_line(exc)
            log.error("model %s version %s refused: %s", mv.name, mv.version, detail)
            # callers see the reason (ListModels, RepositoryIndex): only ours, never a path or
            # a runtime's internals, which stay in the log
            mv.state = State.UNAVAILABLE
            mv.reason = detail if isinstance(exc, LoadError) else LOAD_FAILED
            return
        mv.batcher, mv.state = batcher, State.READY
        mv.providers = tuple(r.provider for r in runners)
        for runner in runners:
            self._metrics.execution_provider.labels(
                mv.name, mv.version, str(runner.instance), runner.provider
            ).set(1)
        seconds = time.monotonic() - started
        self._metrics.load_seconds.labels(mv.name, mv.version).set(seconds)
        _log_ready(mv, seconds, len(runners), sizes)
        if precision == "int8" and mv.provider != CPU:
            log.warning(
                "model %s version %s is int8 (quantize and dequantize nodes around fp32 "
                "operators) and runs on %s, which has no int8 kernels for them: slower than "
                "fp32 there; build fp16 for GPUs",
                mv.name, mv.version, mv.provider,
            )  # fmt: skip

    async def _verified(self, mv: ModelVersion) -> tuple[bytes, str]:
        """The bytes of `mv`'s model.onnx that passed the version check (LoadError if not),
        and the precision its record gives."""
        check = await asyncio.to_thread(
            check_version, mv.path, labels=mv.config.labels, keep_model=True
        )
        if not check.servable or check.model is None:
            raise LoadError(check.reason)
        mv.weights = check.weights
        mv.random_weights = check.record is not None and check.record.random_weights
        return check.model, check.record.precision if check.record is not None else "fp32"

    async def _open_and_warm(
        self, mv: ModelVersion, model: bytes
    ) -> tuple[Batcher, list[Runner], list[int]]:
        """Every instance opened and warmed, with ``--device auto`` on the CPU if the GPU's
        warm-up fails; the started batcher, its runners, the sizes warmed."""
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
        return batcher, runners, sizes

    async def _start(self, mv: ModelVersion, runners: list[Runner]) -> tuple[Batcher, list[int]]:
        """A started batcher over `runners`, each instance warmed at every size it will see;
        its watchdog reports to health (`ModelVersion.unhealthy`)."""
        settings = self._settings
        mv.on_unhealthy = self._health.not_serving
        batcher = Batcher(
            mv.name, mv.version, runners, mv.config.batching, self._metrics,
            on_unhealthy=mv.unhealthy,
            max_failed_batches=settings.max_failed_batches,
            run_timeout=settings.session_run_timeout,
        )  # fmt: skip
        batcher.start()
        sizes = warmup_sizes(mv.config, runners[0])
        try:
            for size in sizes:
                zeros = np.zeros(mv.config.input.shape(size), mv.input_dtype)
                for _ in range(runners[0].warm_runs):  # CUDA graphs: until captured
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
                served=f"model {mv.name} version {mv.version}",
            )
            for index, one in enumerate(opened)
        ]
        first = opened[0]
        log.info(
            "model %s version %s runs on %s (%s), %d instance(s), %d intra-op thread(s) each",
            mv.name, mv.version, first.provider, first.reason, count, intra_op,
        )  # fmt: skip
        return runners


def _serving_at_most(model: Model) -> int:
    """How many of `model`'s versions on disk its version policy can serve at once: all,
    those named (``specific``), or at most N (``latest``, before any version check)."""
    policy = model.config.version_policy
    numbers = [int(version) for version in model.versions]
    if policy.latest is not None:
        return min(policy.latest.num_versions, len(numbers))
    return len(policy.select(numbers, lambda _: True))


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


def _log_ready(mv: ModelVersion, seconds: float, instances: int, sizes: list[int]) -> None:
    log.info(
        "model %s version %s READY in %.1f s: %d instance(s) on %s, warmed at batch sizes %s, "
        "weights: %s",
        mv.name, mv.version, seconds, instances, mv.provider, _ranges(sizes),
        mv.weights or "not recorded",
    )  # fmt: skip
    if mv.random_weights:
        log.warning(
            "model %s version %s has RANDOM weights (%s): an untrained model whose classes "
            "mean nothing; build it with --weights torchvision or a checkpoint",
            mv.name, mv.version, mv.weights,
        )  # fmt: skip


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``): a closed
    session's arena and graph go back to malloc, which keeps them. No-op without glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def gpu_mem_limit(total: int | None, sessions: int) -> int | None:
    """The CUDA arena limit of one session when ``sessions`` share a GPU of ``total`` bytes."""
    if total is None or sessions < 1:
        return None
    return int(total * GPU_MEMORY_SHARE) // sessions


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
