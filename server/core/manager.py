"""The repository manager: which model versions serve, and when that changes (Triton's
model control modes).

`RepositoryManager.scan()` reads every model's config and version directories at start
(no sessions yet). `RepositoryManager.sync(name, reason)` brings one model in line with
the repository and its version policy (``config.json`` ``version_policy``,
`server.repository.VersionPolicy`):

1. the versions the policy wants and that are not serving are loaded and warmed, highest
   first, each READY (and taking requests without a version) as soon as it is warm;
2. then the versions that should stop are retired together, in one step: UNLOADING (no
   new requests), the requests holding them finish, their batchers close
   (`server.core.loader.Loader.unload`). A version whose directory is gone always
   retires; one the policy no longer wants retires only once every version the policy
   wants is READY, so a version that fails to load leaves the serving ones untouched;
3. health follows (`server.core.health.Health.publish`): SERVING for the model's name while
   it has a READY version, and for the server ("") while any model has one, once
   start-up loading is done.

One model is changed by one sync at a time (a lock per model), so a poll and an explicit
load of the same model run one after the other. Which versions the policy wants, and
which are not tried again, is `server.core.policy`'s to say.

Modes (`Settings.model_control_mode`): ``none`` and ``poll`` load the whole repository at
start, ``explicit`` only the models named by ``--load-model`` (``*``: all; none named:
nothing), the others listed UNAVAILABLE, "unloaded", as after an unload; a name not in the
repository, or a named model that cannot be loaded, refuses the start, as Triton does.
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
from pathlib import Path
from typing import Protocol

from server.config import Settings
from server.core.health import Health
from server.core.loader import Loader
from server.core.policy import UNLOADED, Fingerprint, OnDisk, Versions, on_disk, retiring
from server.core.registry import Model, ModelRegistry, ModelVersion, State
from server.errors import ControlRefused, InvalidInput, ModelNotFound, NotOffered
from server.logs import one_line
from server.repository import (
    CONFIG_FILE,
    ModelConfig,
    is_model_name,
    model_dirs,
    read_labels,
    version_dirs,
)

log = logging.getLogger(__name__)

AT_START = "at start-up"
POLLED = "found by the repository poll"
REQUESTED = "load requested"
REMOVED = "removed from the repository"
NOT_NAMED = "unloaded: not named by --load-model (explicit model control)"


class Manager(Protocol):
    """What a server's lifecycle and model control ask of the models' manager: this module's
    `RepositoryManager`, or in a front end its link to the engine
    (`server.frontend.EngineManager`)."""

    @property
    def mode(self) -> str: ...

    async def load_all(self) -> None: ...

    def start_polling(self) -> None: ...

    async def stop(self) -> None: ...

    async def load(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...


class RepositoryManager:
    """Create it inside the running event loop; `stop()` before closing the registry."""

    def __init__(
        self, settings: Settings, registry: ModelRegistry, loader: Loader, health: Health
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._loader = loader
        self._health = health
        self._locks: dict[str, asyncio.Lock] = {}
        self._unloaded: set[str] = set()  # models unloaded by request (explicit mode)
        self._versions = Versions()
        self._config_errors: dict[str, str] = {}
        self._kept: dict[str, str] = {}  # per model: the versions kept outside the policy, why
        self._poller: asyncio.Task[None] | None = None

    @property
    def mode(self) -> str:
        return self._settings.model_control_mode

    # start-up, polling, stop

    def scan(self) -> None:
        """Read every model's config and version directories into the registry (no sessions
        yet); OSError when the repository cannot be read."""
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
            self._registry.add(model)

    def start_models(self) -> list[str]:
        """The models found at start (`scan`) that load at start: all of them, or in
        explicit mode those ``--load-model`` names. Raises ModelNotFound for a name not in
        the repository."""
        found = [model.name for model in self._registry.models()]
        named = self._settings.load_model
        if self.mode != "explicit" or named == ["*"]:
            return found
        if missing := [name for name in named if name not in found]:
            raise ModelNotFound(
                f"--load-model names {', '.join(map(repr, missing))}, not a model of the "
                f"repository {self._settings.repo} (its models: {', '.join(found) or 'none'})"
            )
        return list(dict.fromkeys(named))

    async def load_all(self) -> None:
        """Load the models found at start (`scan`) by their version policy: every one, or
        in explicit mode those named (`start_models`), the others UNAVAILABLE. Raises
        ControlRefused when a named model cannot be loaded (explicit mode)."""
        starting = self.start_models()
        await self._loader.plan_gpu_memory()
        for model in self._registry.models():
            if model.name in starting:
                continue
            self._unloaded.add(model.name)
            for mv in model.versions.values():
                mv.state, mv.reason = State.UNAVAILABLE, NOT_NAMED
            await self._health.publish(model.name)
        named = self.mode == "explicit"  # a named model that cannot serve refuses the start
        failed = []
        for name in starting:
            failures = await self.sync(name, AT_START)
            if named and (failures or not self._serves(name)):
                failed.append(f"model {name}: {'; '.join(failures) or 'no version to serve'}")
        self._loader.starting = False  # a version that cannot run on the GPU is refused
        if failed:
            raise ControlRefused(f"--load-model: {'; '.join(failed)}")
        await self._health.loaded()

    def _serves(self, name: str) -> bool:
        model = self._registry.find(name)
        return model is not None and model.latest_ready() is not None

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
        model_dir = self._settings.repo / name
        if not (model_dir / CONFIG_FILE).is_file():
            await self._remove(name)
            return []
        read = await self._read_config(name, model_dir)
        if isinstance(read, str):
            return [read]
        config, labels = read
        model = await self._model(name, config)
        found, prints = await on_disk(model_dir)
        unloaded = name in self._unloaded
        wanted, outside, kind = await self._versions.wanted(model, found, unloaded=unloaded)
        failures = []
        for v in sorted(wanted, reverse=True):  # the highest first: requests without a version
            mv = ModelVersion(name, str(v), config, labels, found[v])
            if failure := await self._load_wanted(model, mv, prints[v], reason, retry):
                failures.append(failure)
        for v in found.keys() - wanted:  # listed with why they do not serve
            self._list_unwanted(model, ModelVersion(name, str(v), config, labels, found[v]),
                                outside)  # fmt: skip
        await self._retire_surplus(model, found, wanted, outside, kind)
        await self._health.publish(name)
        return failures

    async def _remove(self, name: str) -> None:
        """Model `name` has no config any more: every version retires, the model goes."""
        model = self._registry.find(name)
        if model is None:
            return
        await self._retire(model, [(mv, REMOVED, "removed") for mv in model.versions.values()])
        self._registry.remove(name)
        log.info("model %s: %s", name, REMOVED)
        await self._health.publish(name)

    async def _read_config(
        self, name: str, model_dir: Path
    ) -> tuple[ModelConfig, list[str]] | str:
        """The model's config and labels, or what the caller is told when they cannot be
        used (the log says why, once per different reason)."""
        try:
            config = await asyncio.to_thread(ModelConfig.load, model_dir)
            labels = await asyncio.to_thread(read_labels, model_dir, config)
        except (OSError, ValueError) as exc:
            detail = one_line(exc)
            if self._config_errors.get(name) != detail:
                serving = self._registry.find(name) is not None
                kept = "; the versions serving keep serving" if serving else ""
                log.error("model %s: %s not applied: %s%s", name, CONFIG_FILE, detail, kept)
            self._config_errors[name] = detail
            # the caller's line names no path (the log has the detail)
            return f"{CONFIG_FILE} or the labels it names cannot be used; the server log says why"
        self._config_errors.pop(name, None)
        return config, labels

    async def _model(self, name: str, config: ModelConfig) -> Model:
        """Model `name` in the registry (added, NOT_SERVING, if new), with `config`."""
        model = self._registry.find(name)
        if model is None:
            model = Model(name, config)
            self._registry.add(model)
            await self._health.publish(name)
        elif config != model.config:
            log.info(
                "model %s: %s changed (version policy %s); versions loaded from now on use it",
                name, CONFIG_FILE, config.version_policy.describe(),
            )  # fmt: skip
            model.config = config
        return model

    async def _load_wanted(
        self, model: Model, mv: ModelVersion, files: Fingerprint, reason: str, retry: bool
    ) -> str:
        """Load `mv`, a version the policy wants, unless it serves already or was refused
        with the same `files` (and no `retry`); what could not be done, or ""."""
        key = (model.name, mv.version)
        current = model.versions.get(mv.version)
        if current is not None and current.state is State.READY:
            return ""
        if not retry and self._versions.refused_before(key, files):
            return ""  # refused before, files unchanged: its reason stays listed
        model.put(mv)
        if await self._loader.load(mv, reason):
            self._versions.forget(key)
            await self._health.publish(model.name)
            return ""
        self._versions.refused(key, files)
        return f"version {mv.version} not loaded: {mv.reason}"

    def _list_unwanted(self, model: Model, mv: ModelVersion, outside: str) -> None:
        """A version the policy leaves out: listed (`mv` if not known yet), and unless it
        still serves, UNAVAILABLE with why."""
        current = model.versions.get(mv.version)
        if current is None:
            current = mv
            model.put(current)
        if current.state is not State.READY:
            current.state = State.UNAVAILABLE
            current.reason = self._versions.why_not(mv.path, outside)

    async def _retire_surplus(
        self, model: Model, found: OnDisk, wanted: set[int], outside: str, kind: str
    ) -> None:
        """Retire the versions gone from disk, and those the policy no longer wants once
        every wanted version is READY (`server.core.policy.retiring`; else the log says
        which keep serving, and why)."""
        gone, surplus, kept = retiring(model, found, wanted)
        if kept and self._kept.get(model.name) != kept:
            log.warning("model %s: %s", model.name, kept)
        self._kept[model.name] = kept
        await self._retire(
            model,
            [(mv, REMOVED, "removed") for mv in gone] + [(mv, outside, kind) for mv in surplus],
        )
        for mv in gone:
            if model.versions.get(mv.version) is mv:
                del model.versions[mv.version]

    async def _retire(self, model: Model, retiring: list[tuple[ModelVersion, str, str]]) -> None:
        """Retire versions of `model` at once: new requests see none of them from now on,
        then each drains and closes (`Loader.unload`); with each its reason and its kind of
        unload (removed, policy, request)."""
        for mv, reason, _ in retiring:  # one step, no await in between: atomic for requests
            if mv.state is State.READY:
                mv.state, mv.reason = State.UNLOADING, reason
        await asyncio.gather(
            *(self._loader.unload(mv, reason, kind) for mv, reason, kind in retiring)
        )
        for mv, _, _ in retiring:
            self._versions.forget((model.name, mv.version))


def _check_name(name: str) -> None:
    """A model is a directory of the repository: a name, never a path out of it."""
    if not is_model_name(name) or "\0" in name:
        raise InvalidInput(
            f"model name {name!r} is not a model directory's name (no '/', '\\', leading '.')"
        )
