"""Which of a model's versions should serve: its version policy over what is on disk.

`Versions.wanted` applies ``config.json``'s ``version_policy``
(`server.repository.VersionPolicy`) to the version directories found: for ``latest``
only versions that can serve count (`server.repository.check_version`, its answer kept
while the version's files stay the same: `fingerprint`). `Versions.why_not` says why a
version left out is not served: its check's reason, or the policy's. `retiring` says
which versions stop: those gone from disk at once, those the policy no longer wants only
once every version it wants is READY.

A version that failed to load is not tried again until its files change
(`Versions.refused_before`), unless an explicit load asks.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from server.core.registry import Model, ModelVersion, State
from server.repository import MODEL_FILE, VERIFICATION_FILE, check_version, version_dirs

UNLOADED = "unloaded by request"

Fingerprint = tuple[object, ...]
# the versions of a model on disk: number → directory
OnDisk = dict[int, Path]
# a version: its model's name, its own
Key = tuple[str, str]


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


async def on_disk(model_dir: Path) -> tuple[OnDisk, dict[int, Fingerprint]]:
    """The model's version directories and their fingerprints (read in worker threads)."""
    found = {int(p.name): p for p in await asyncio.to_thread(version_dirs, model_dir)}
    prints = {v: await asyncio.to_thread(fingerprint, p) for v, p in found.items()}
    return found, prints


class Versions:
    """What the repository manager remembers of versions on disk: the loads refused, with
    the files they had then, and the version checks made for ``latest`` policies."""

    def __init__(self) -> None:
        # versions that failed to load, with what their files were then: not tried again
        # until the files change
        self._refused: dict[Key, Fingerprint] = {}
        # the servability of versions checked for a `latest` policy, by path and files
        self._checks: dict[Path, tuple[Fingerprint, bool, str]] = {}

    async def wanted(
        self, model: Model, found: OnDisk, *, unloaded: bool
    ) -> tuple[set[int], str, str]:
        """The versions of `found` to serve: none for a model `unloaded` by request, else
        those `model`'s policy selects (checks in a worker thread); with why the others do
        not serve, and the kind of unload that retires them (request, policy)."""
        if unloaded:
            return set(), UNLOADED, "request"
        policy = model.config.version_policy
        wanted = await asyncio.to_thread(
            policy.select, sorted(found), lambda v: self._servable(model, v, found[v])
        )
        return set(wanted), policy.excluded(), "policy"

    def why_not(self, path: Path, outside: str) -> str:
        """Why the version at `path`, which the policy leaves out, is not served."""
        cached = self._checks.get(path)
        if cached is not None and not cached[1]:
            return cached[2]  # the version check's reason, not the policy's
        return outside

    def refused_before(self, key: Key, files: Fingerprint) -> bool:
        """Whether the version failed to load with these very files."""
        return self._refused.get(key) == files

    def refused(self, key: Key, files: Fingerprint) -> None:
        self._refused[key] = files

    def forget(self, key: Key) -> None:
        """The version loaded or retired: a later failure is news again."""
        self._refused.pop(key, None)

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


def retiring(
    model: Model, found: OnDisk, wanted: set[int]
) -> tuple[list[ModelVersion], list[ModelVersion], str]:
    """The versions of `model` gone from disk, and the READY ones the policy no longer
    wants; those only once every version it wants is READY, else they keep serving and the
    line returned third says why ("" when none is kept)."""
    gone = [mv for key, mv in model.versions.items() if int(key) not in found]
    surplus = [
        mv
        for key, mv in model.versions.items()
        if mv.state is State.READY and int(key) in found and int(key) not in wanted
    ]
    missing = [str(v) for v in sorted(wanted) if model.versions[str(v)].state is not State.READY]
    if not (surplus and missing):
        return gone, surplus, ""
    kept = (
        f"version(s) {', '.join(mv.version for mv in surplus)} keep serving outside the "
        f"version policy ({model.config.version_policy.describe()}) because version(s) "
        f"{', '.join(missing)} could not be loaded"
    )
    return gone, [], kept
