"""Small repositories derived from the session's ``model_repo``: hard links, own batching.

A server over fewer, smaller models starts in seconds, which keeps a module
that needs its own server cheap.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from server.repository import CONFIG_FILE, ModelConfig


def derive(repo: Path, source: Path, name: str | None = None, **batching: Any) -> Path:
    """``source`` (a model directory) as ``name`` in ``repo``, with batching fields replaced."""
    name = name or source.name
    target = repo / name
    shutil.copytree(source, target, copy_function=os.link)
    config = ModelConfig.load(source)
    update = {"name": name, "batching": config.batching.model_copy(update=batching)}
    (target / CONFIG_FILE).unlink()  # a hard link to the source's file: replace, never write
    config.model_copy(update=update).dump(target)
    return target
