"""Writing into the model repository (`server.repository` describes it): atomic publishing,
staging, listing. Torch-free.

A version is assembled in ``<repo>/<name>/.tmp-*`` (same file system) and renamed into
place, so a reader never sees half a model. While a build stages, it holds an exclusive
``flock`` on ``<staging>.lock`` beside it; a staging directory whose lock nobody holds
belongs to a build that was killed, and the next build removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.repository import (
    CONFIG_FILE,
    ModelConfig,
    VersionCheck,
    check_version,
    labels_text,
    model_dirs,
    version_dirs,
    versions,
)

TMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"
# Fields the builder decides; batching and instances stay as an operator set them.
_BUILD_FIELDS = ("arch", "num_classes", "labels", "input", "output", "preprocessing")


class RepositoryError(RuntimeError):
    pass


def next_version(model_dir: Path) -> int:
    """1 for a new model, one past the highest otherwise."""
    return max(versions(model_dir), default=0) + 1


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_config_compatible(model_dir: Path, config: ModelConfig) -> None:
    """Refuse to add a version whose input, head or preprocessing contradicts config.json."""
    if not (model_dir / CONFIG_FILE).is_file():
        return
    existing = ModelConfig.load(model_dir)
    new, old = (
        config.model_dump(include=set(_BUILD_FIELDS)),
        existing.model_dump(include=set(_BUILD_FIELDS)),
    )
    conflicts = [
        f"{k}: existing {old[k]!r}, new {new[k]!r}" for k in _BUILD_FIELDS if old[k] != new[k]
    ]
    if conflicts:
        raise RepositoryError(
            f"{model_dir / CONFIG_FILE} describes a different model; use another --name or "
            "remove the model first:\n  " + "\n  ".join(conflicts)
        )


@contextlib.contextmanager
def staging_dir(model_dir: Path) -> Iterator[Path]:
    """A fresh temporary directory inside ``model_dir``, locked for as long as it is in use.

    Unless the caller renamed it into place, it is removed on exit, together with the
    directories created for it (``model_dir``, even the repository) that stayed empty.
    """
    created = [d for d in (model_dir, *model_dir.parents) if not d.exists()]
    model_dir.mkdir(parents=True, exist_ok=True)
    fd, lock_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=LOCK_SUFFIX, dir=model_dir)
    lock = Path(lock_name)
    tmp = lock.with_name(lock.name.removesuffix(LOCK_SUFFIX))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # fresh file: nobody else holds it
        tmp.mkdir()
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)
        for directory in created:  # deepest first
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()


def remove_abandoned_staging(model_dir: Path) -> list[Path]:
    """Remove the staging directories of builds that were killed; the ones removed.

    A live build holds its lock, so its directory stays. A staging directory without a
    lock file (a build from before the locks) counts as abandoned too.
    """
    if not model_dir.is_dir():
        return []
    removed = []
    for staged in sorted(model_dir.glob(f"{TMP_PREFIX}*")):
        if not staged.is_dir():
            continue
        lock = staged.with_name(staged.name + LOCK_SUFFIX)
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a build is using it
            shutil.rmtree(staged, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(staged)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def publish_version(
    staged: Path, model_dir: Path, version: int, config: ModelConfig, labels: list[str]
) -> Path:
    """Write labels.txt and config.json if new, then rename the staged version into place.

    In that order, so a reader that finds config.json finds the labels it names, and one
    that finds the version finds both.
    """
    check_config_compatible(model_dir, config)
    labels_path = model_dir / config.labels
    if not labels_path.is_file():
        _write_atomically(labels_path, labels_text(labels))
    if not (model_dir / CONFIG_FILE).is_file():
        _write_atomically(
            model_dir / CONFIG_FILE, json.dumps(config.model_dump(mode="json"), indent=2) + "\n"
        )
    target = model_dir / str(version)
    try:
        os.rename(staged, target)
    except OSError as exc:
        raise RepositoryError(f"cannot publish version {version} at {target}: {exc}") from None
    return target


@dataclass(frozen=True)
class ModelEntry:
    name: str
    versions: list[VersionCheck]
    config: ModelConfig | None  # None when config.json does not parse
    config_error: str = ""
    # the versions a server would serve: chosen by the version policy and passing the check
    serving: tuple[int, ...] = ()

    def why_not_served(self, check: VersionCheck) -> str:
        """Empty when `check`'s version would serve, else why not (its status, or the policy)."""
        if check.version in self.serving:
            return ""
        if not check.servable or self.config is None:
            return check.status
        return self.config.version_policy.excluded()


def list_models(repo: Path) -> list[ModelEntry]:
    """Every model directory with a config.json, and the status of each of its versions."""
    entries = []
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist")
    for model_dir in [p for p in model_dirs(repo) if (p / CONFIG_FILE).is_file()]:
        statuses = [check_version(version_dir) for version_dir in version_dirs(model_dir)]
        try:
            config = ModelConfig.load(model_dir)
        except ValueError as exc:  # pydantic's ValidationError, or JSON that does not parse
            first_line = str(exc).splitlines()[0]
            entries.append(ModelEntry(model_dir.name, statuses, None, first_line))
            continue
        servable = {status.version for status in statuses if status.servable}
        chosen = config.version_policy.select([s.version for s in statuses], servable.__contains__)
        serving = tuple(v for v in chosen if v in servable)
        entries.append(ModelEntry(model_dir.name, statuses, config, serving=serving))
    return entries
