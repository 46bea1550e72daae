"""Where things are in a model repository: file names and version directories.

A model directory is any directory of the repository whose name does not start with
``.`` (hidden: staging areas, tooling); the model is named by it.

A version directory is named by a positive integer in ASCII digits without leading zeros
(``1``, ``2``, ``10``); anything else inside a model directory (``0``, ``01``, ``²``,
``.tmp-*`` staging directories) is not a version and is ignored by every reader.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.json"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
VERIFICATION_FILE = "verification.json"

# [0-9] is ASCII only (str.isdigit() also takes "²" and "٣", which int() refuses or reads)
_VERSION_NAME = re.compile(r"[1-9][0-9]*")


def is_version_name(name: str) -> bool:
    """Whether a directory called `name` is a version (see the module docstring)."""
    return _VERSION_NAME.fullmatch(name) is not None


def is_model_name(name: str) -> bool:
    """Whether a directory called `name` in the repository is a model (not hidden)."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name


def model_dirs(repo: Path) -> list[Path]:
    """The repository's model directories, by name; OSError when it cannot be read."""
    return sorted(p for p in Path(repo).iterdir() if is_model_name(p.name) and p.is_dir())


def version_dirs(model_dir: Path) -> list[Path]:
    """The model's version directories, lowest version first; none if `model_dir` is absent."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = [p for p in model_dir.iterdir() if is_version_name(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name))


def versions(model_dir: Path) -> list[int]:
    """The model's version numbers, ascending."""
    return [int(p.name) for p in version_dirs(model_dir)]


def latest_version(model_dir: Path) -> Path:
    """The directory of the highest version; FileNotFoundError when there is none."""
    found = version_dirs(model_dir)
    if not found:
        raise FileNotFoundError(f"{model_dir} has no version directory; build the model first")
    return found[-1]
