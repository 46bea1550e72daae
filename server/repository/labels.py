"""``<name>/labels.txt``: one class name per line, line i naming class i."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from server.repository.config import ModelConfig


def read_labels(model_dir: Path, config: ModelConfig) -> list[str]:
    """The class names `config` points at; ValueError unless there is one per class."""
    path = Path(model_dir) / config.labels
    labels = path.read_text(encoding="utf-8").splitlines()
    if len(labels) != config.num_classes:
        raise ValueError(f"{path} has {len(labels)} labels, the model {config.num_classes} classes")
    return labels


def labels_text(labels: Sequence[str]) -> str:
    """The file's content; ValueError for a name that would not read back as one line."""
    for index, label in enumerate(labels):
        if label.splitlines() not in ([], [label]):
            raise ValueError(f"label {index} ({label!r}) must be one line")
    return "".join(f"{label}\n" for label in labels)
