"""Which model versions serve, and when that changes: Triton's model control modes.

`ModelLifecycle.sync(name, reason)` brings one model in line with the repository and
its version policy (``config.json`` ``version_policy``, `server.repository.VersionPolicy`):

1. the versions the policy wants and that are not serving are loaded and warmed, highest
   first, each READY (and taking requests without a version) as soon as it is warm;
2. then the versions that should stop are retired together, in one step: UNLOADING (no
   new requests), the requests holding them finish, their batchers close
   (`ModelRegistry.unload_version`). A version whose directory is gone always retires;
   one the policy no longer wants retires only once every version the policy wants is
   READY, so a version that fails to load leaves the serving ones untouched;
3. health follows: SERVING for the model's name while it has a READY version, and for
   the server ("") while any model has one, once start-up loading is done. A version
   that stops serving on its own (its batcher unhealthy, a session off the GPU:
   `ModelRegistry.unavailable`) is published the same way at once.

One model is changed by one sync at a time (a lock per model), so a poll and an explicit
load of the same model run one after the other. A version that failed to load is not
tried again until its files change (its ``fingerprint``), or an explicit load asks.

Modes (`Settings.model_control_mode`): every mode loads the whole repository at start.
``none``: nothing changes after that. ``poll``: the repository is rescanned every
``repository_poll_secs`` (`start_polling`); new models and versions load, removed ones
unload, ``config.json`` changes of the version policy apply. ``explicit``: v2
``RepositoryModelLoad`` and ``RepositoryModelUnload`` (`load`, `unload`). In poll mode a
load request syncs that model at once; unloading is the repository's to decide.

Every load and unload is logged with its reason and duration and counted
(``resnet_serve_model_loads_total``, ``resnet_serve_model_unloads_total``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from server.config import Settings
from server.errors import ControlRefused, InvalidInput, ModelNotFound, NotOffered
from server.logs import one_line
from server.models import Model, ModelRegistry, ModelVersion, State
from server.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    VERIFICATION_FILE,
    ModelConfig,
    check_version,
    is_model_name,
    model_dirs,
    read_labels,
    version_dirs,
)

log = logging.getLogger(__name__)

OVERALL = ""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

AT_START = "at start-up"
POLLED = "found by the repository poll"
REQUESTED = "load requested"
REMOVED = "removed from the repository"
UNLOADED = "unloaded by request"

Fingerprint = tuple[object, ...]


def fingerprint(version_dir: Path) -> Fingerprint:
    """What changes when a version's files are replaced or rewritten (a new build renamed
    into place, a file copied over): inode, size and mtime of each."""
    found: list[object] = []
    for path in (version_dir, version_dir / MODEL_FILE, version_dir / VERIFICATION_FILE):
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
            continue
        found.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


class ModelLifecycle:
    """Create it inside the running event loop; `stop()` before closing the registry."""

    def __init__(
        self, settings: Settings, registry: ModelRegistry, health: health_aio.HealthServicer
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._health = health
        self._locks: dict[str, asyncio.Lock] = {}
        self._unloaded: set[str] = set()  # models unloaded by request (explicit mode)
        # versions that failed to load, with what their files were then: not tried again
        # until the files change
        self._refused: dict[tuple[str, str], Fingerprint] = {}
        # the servability of versions checked for a `latest` policy, by path and files
        self._checks: dict[Path, tuple[Fingerprint, bool, str]] = {}
        self._config_errors: dict[str, str] = {}
        self._kept: dict[str, str] = {}  # per model: the versions kept outside the policy, why
        self._loaded = False  # start-up loading done: overall health follows the models
        self._poller: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        registry.on_unavailable = self._version_unavailable

    @property
    def mode(self) -> str:
        return self._settings.model_control_mode

    def serving(self) -> list[str]:
        """Names of the models with a READY version."""
        return [m.name for m in self._registry.models() if m.latest_ready() is not None]

    def ready(self) -> bool:
        """Start-up loading is done and a model is READY: what overall health publishes."""
        return self._loaded and bool(self.serving())

    # start-up, polling, stop

    async def load_all(self) -> None:
        """Load every model found at start (`ModelRegistry.scan`) by its version policy."""
        await self._registry.plan_gpu_memory()
        for model in self._registry.models():
            await self.sync(model.name, AT_START)
        self._loaded = True
        await self._publish_overall()

    def start_polling(self) -> None:
        """In poll mode, rescan the repository every ``repository_poll_secs``."""
        if self.mode == "poll" and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
            log.info("polling %s for model changes every %g s",
                     self._settings.repo, self._settings.repository_poll_secs)  # fmt: skip

    async def stop(self) -> None:
        """Stop polling (a sync in progress is cut short; the registry's close ends it)."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    async def poll(self) -> None:
        """Sync every model of the repository and every model loaded."""
        repo = self._settings.repo
        try:
            found = [p.name for p in await asyncio.to_thread(model_dirs, repo)]
        except OSError as exc:
            log.error("cannot read the model repository %s: %s; nothing changed", repo, exc)
            return
        for name in sorted({*found, *(m.name for m in self._registry.models())}):
            try:
                await self.sync(name, POLLED)
            except Exception:
                log.exception("model %s: the repository poll failed; nothing changed", name)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.repository_poll_secs)
            await self.poll()

    # explicit control (v2 RepositoryModelLoad / RepositoryModelUnload)

    async def load(self, name: str) -> None:
        """Load (or reload from the repository) model `name` by its version policy; versions
        that failed before are tried again. Raises NotOffered (mode none), InvalidInput,
        ModelNotFound, ControlRefused."""
        self._check_offered("RepositoryModelLoad")
        _check_name(name)
        if not (self._settings.repo / name / CONFIG_FILE).is_file():
            raise ModelNotFound(f"no model {name!r} in the repository (no {name}/{CONFIG_FILE})")
        self._unloaded.discard(name)
        failures = await self.sync(name, REQUESTED, retry=True)
        if failures:
            model = self._registry.find(name)
            ready = [v.version for v in model.versions.values() if v.state is State.READY] \
                if model is not None else []  # fmt: skip
            raise ControlRefused(
                f"model {name}: {'; '.join(failures)}; serving: {', '.join(ready) or 'nothing'}"
            )

    async def unload(self, name: str) -> None:
        """Unload every version of model `name`; it stays listed, UNAVAILABLE, until loaded.
        Raises NotOffered (mode none), ControlRefused (mode poll), ModelNotFound."""
        self._check_offered("RepositoryModelUnload")
        if self.mode == "poll":
            raise ControlRefused(
                "the model control mode is poll: the repository decides what serves; remove "
                f"the model's directory instead, or set version_policy in its {CONFIG_FILE}"
            )
        self._registry.model(name)  # ModelNotFound
        self._unloaded.add(name)
        await self.sync(name, UNLOADED)

    def _check_offered(self, call: str) -> None:
        if self.mode == "none":
            raise NotOffered(
                f"{call} (the model-repository extension) is off: the server runs with "
                "--model-control-mode none; start it with explicit (or poll) to load and "
                "unload models"
            )

    # the one way a model changes

    async def sync(self, name: str, reason: str, *, retry: bool = False) -> list[str]:
        """Bring model `name` in line with the repository (see the module docstring); what
        could not be done, one line each (also logged)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            return await self._sync(name, reason, retry)

    async def _sync(self, name: str, reason: str, retry: bool) -> list[str]:
        registry = self._registry
        model_dir = self._settings.repo / name
        model = registry.find(name)
        if not (model_dir / CONFIG_FILE).is_file():
            if model is not None:
                await self._retire(
                    model, [(mv, REMOVED, "removed") for mv in model.versions.values()]
                )
                registry.remove(name)
                log.info("model %s: %s", name, REMOVED)
                await self._publish(name)
            return []
        try:
            config = await asyncio.to_thread(ModelConfig.load, model_dir)
            labels = await asyncio.to_thread(read_labels, model_dir, config)
        except (OSError, ValueError) as exc:
            detail = one_line(exc)
            if self._config_errors.get(name) != detail:
                kept = "; the versions serving keep serving" if model is not None else ""
                log.error("model %s: %s not applied: %s%s", name, CONFIG_FILE, detail, kept)
            self._config_errors[name] = detail
            # the caller's line names no path (the log has the detail)
            return [f"{CONFIG_FILE} or the labels it names cannot be used; the server log says why"]
        self._config_errors.pop(name, None)
        if model is None:
            model = Model(name, config)
            registry.add(model)
            await self._health.set(name, NOT_SERVING)
        elif config != model.config:
            log.info(
                "model %s: %s changed (version policy %s); versions loaded from now on use it",
                name, CONFIG_FILE, config.version_policy.describe(),
            )  # fmt: skip
            model.config = config

        on_disk = {int(p.name): p for p in await asyncio.to_thread(version_dirs, model_dir)}
        prints = {v: await asyncio.to_thread(fingerprint, p) for v, p in on_disk.items()}
        policy = config.version_policy
        if name in self._unloaded:
            wanted: set[int] = set()
            outside, kind = UNLOADED, "request"
        else:
            wanted = set(
                await asyncio.to_thread(
                    policy.select, sorted(on_disk), lambda v: self._servable(model, v, on_disk[v])
                )
            )
            outside, kind = policy.excluded(), "policy"

        failures = []
        for v in sorted(wanted, reverse=True):  # the highest first: requests without a version
            key = str(v)
            current = model.versions.get(key)
            if current is not None and current.state is State.READY:
                continue
            if not retry and self._refused.get((name, key)) == prints[v]:
                continue  # refused before, files unchanged: its reason stays listed
            mv = ModelVersion(name, key, config, labels, on_disk[v])
            _put(model, mv)
            if await registry.load_version(mv, reason):
                self._refused.pop((name, key), None)
                await self._publish(name)
            else:
                self._refused[(name, key)] = prints[v]
                failures.append(f"version {key} not loaded: {mv.reason}")

        for v in on_disk.keys() - wanted:  # listed with why they do not serve
            current = model.versions.get(str(v))
            if current is None:
                current = ModelVersion(name, str(v), config, labels, on_disk[v])
                _put(model, current)
            if current.state is not State.READY:
                current.state, current.reason = (
                    State.UNAVAILABLE,
                    self._why_not(on_disk[v], outside),
                )

        gone = [mv for key, mv in model.versions.items() if int(key) not in on_disk]
        surplus = [
            mv
            for key, mv in model.versions.items()
            if mv.state is State.READY and int(key) in on_disk and int(key) not in wanted
        ]
        missing = [
            str(v) for v in sorted(wanted) if model.versions[str(v)].state is not State.READY
        ]
        kept = ""
        if surplus and missing:
            kept = (
                f"version(s) {', '.join(mv.version for mv in surplus)} keep serving outside the "
                f"version policy ({policy.describe()}) because version(s) {', '.join(missing)} "
                "could not be loaded"
            )
            surplus = []
        if kept and self._kept.get(name) != kept:
            log.warning("model %s: %s", name, kept)
        self._kept[name] = kept
        await self._retire(
            model,
            [(mv, REMOVED, "removed") for mv in gone] + [(mv, outside, kind) for mv in surplus],
        )
        for mv in gone:
            if model.versions.get(mv.version) is mv:
                del model.versions[mv.version]
        await self._publish(name)
        return failures

    async def _retire(self, model: Model, retiring: list[tuple[ModelVersion, str, str]]) -> None:
        """Retire versions of `model` at once: new requests see none of them from now on,
        then each drains and closes (`ModelRegistry.unload_version`); with each its reason
        and its kind of unload (removed, policy, request)."""
        for mv, reason, _ in retiring:  # one step, no await in between: atomic for requests
            if mv.state is State.READY:
                mv.state, mv.reason = State.UNLOADING, reason
        await asyncio.gather(
            *(self._registry.unload_version(mv, reason, kind) for mv, reason, kind in retiring)
        )
        for mv, _, _ in retiring:
            self._refused.pop((model.name, mv.version), None)

    def _servable(self, model: Model, version: int, path: Path) -> bool:
        """For a ``latest`` policy (called in a worker thread): serving, or passing the
        version check (the result kept while the files stay the same)."""
        current = model.versions.get(str(version))
        if current is not None and current.state is State.READY:
            return True
        files = fingerprint(path)
        cached = self._checks.get(path)
        if cached is None or cached[0] != files:
            check = check_version(path, labels=model.config.labels)
            cached = (files, check.servable, check.reason)
            self._checks[path] = cached
        return cached[1]

    def _why_not(self, path: Path, outside: str) -> str:
        cached = self._checks.get(path)
        if cached is not None and not cached[1]:
            return cached[2]  # the version check's reason, not the policy's
        return outside

    def _version_unavailable(self, mv: ModelVersion) -> None:
        """A version stopped serving on its own (`ModelRegistry.unavailable`): health follows."""
        task = asyncio.get_running_loop().create_task(self._publish(mv.name))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, name: str) -> None:
        model = self._registry.find(name)
        ready = model is not None and model.latest_ready() is not None
        await self._health.set(name, SERVING if ready else NOT_SERVING)
        await self._publish_overall()

    async def _publish_overall(self) -> None:
        if self._loaded:
            await self._health.set(OVERALL, SERVING if self.serving() else NOT_SERVING)


def _check_name(name: str) -> None:
    """A model is a directory of the repository: a name, never a path out of it."""
    if not is_model_name(name) or "\0" in name:
        raise InvalidInput(
            f"model name {name!r} is not a model directory's name (no '/', '\\', leading '.')"
        )


def _put(model: Model, mv: ModelVersion) -> None:
    """Add or replace `mv` in `model`'s versions, kept in version order (listings)."""
    versions = {**model.versions, mv.version: mv}
    model.versions = dict(sorted(versions.items(), key=lambda item: int(item[0])))
