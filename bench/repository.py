"""The model repository the benchmark serves, derived from a built one.

The source repository (built by ``resnet-serve build``, or a test's) is never
changed. The served one holds, for each benchmarked model, a copy of its
``config.json`` with the plan's batching settings, and beside it
``<name>-nobatch``: the same graph with ``max_batch_size`` 1, i.e. dynamic
batching off. Model files are hard-linked (copied where the two repositories are on
different file systems), never symlinked: the server refuses a link out of its repository.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.cli import say
from server.repository import (
    MODEL_FILE,
    VERIFICATION_FILE,
    Batching,
    ModelConfig,
    check_version,
    latest_version,
    versions,
)

NO_BATCH_SUFFIX = "-nobatch"


@dataclass(frozen=True)
class Served:
    """One benchmarked model as served: its two names, config and graph."""

    name: str
    config: ModelConfig
    model_file: Path

    @property
    def nobatch(self) -> str:
        return self.name + NO_BATCH_SUFFIX


def build_missing(repo: Path, archs: list[str]) -> None:
    """``resnet-serve build ARCH --repo REPO --input uint8`` for each model not built yet."""
    command = Path(sys.executable).with_name("resnet-serve")
    for arch in archs:
        if versions(repo / arch):
            continue
        say(f"building {arch} (uint8 input) into {repo}")
        subprocess.run(
            [str(command), "build", arch, "--repo", str(repo), "--input", "uint8"], check=True
        )


def prepare(
    source: Path,
    target: Path,
    names: list[str],
    *,
    max_batch_size: int,
    max_queue_delay_us: int,
    refill_wait: float | None = None,
    nobatch: bool = True,
) -> list[Served]:
    """Write the served repository `target` for models `names` of `source` (see module doc);
    without the batching-off twins when not `nobatch`."""
    if target.exists():
        shutil.rmtree(target)
    served = []
    for name in names:
        model_dir = source / name
        config = ModelConfig.load(model_dir)
        version = latest_version(model_dir)
        check = check_version(version)
        if not check.servable:
            raise ValueError(f"{version} would not be served ({check.status}): {check.reason}")
        update = {
            "max_batch_size": max_batch_size,
            "max_queue_delay_us": max_queue_delay_us,
            "preferred_batch_sizes": (),
        }
        if refill_wait is not None:
            update["refill_wait"] = refill_wait
        on = config.batching.model_copy(update=update)
        off = on.model_copy(update={"max_batch_size": 1, "max_queue_delay_us": 0})
        twins = ((name, on), (name + NO_BATCH_SUFFIX, off)) if nobatch else ((name, on),)
        for served_name, batching in twins:
            _link_model(model_dir, version, target / served_name, config, served_name, batching)
        served.append(
            Served(name, config.model_copy(update={"batching": on}), version / MODEL_FILE)
        )
    return served


def _link_model(
    model_dir: Path,
    version: Path,
    out: Path,
    config: ModelConfig,
    name: str,
    batching: Batching,
) -> None:
    (out / version.name).mkdir(parents=True)
    config.model_copy(update={"name": name, "batching": batching}).dump(out)
    shutil.copy(model_dir / config.labels, out / config.labels)
    for file in (MODEL_FILE, VERIFICATION_FILE):
        link_or_copy(version / file, out / version.name / file)


# link(2) refuses across file systems (EXDEV), where the file system has no hard links
# (EPERM, EOPNOTSUPP) and past the link limit (EMLINK): a copy serves as well there
_NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK}


def link_or_copy(source: Path, target: Path) -> Path:
    """`target` as a hard link to `source` (its real file), or a copy where no link can be
    made; shutil.copytree's ``copy_function`` signature."""
    real = Path(source).resolve()
    try:
        os.link(real, target)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINK:
            raise
        shutil.copy2(real, target)
    return Path(target)
