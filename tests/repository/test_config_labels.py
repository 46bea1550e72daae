"""config.json's labels path and labels.txt."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.repository import ModelConfig, labels_text, read_labels


@pytest.mark.parametrize("labels", ["../labels.txt", "/etc/passwd", "a/../../b", "..\\x", ""])
def test_labels_stay_inside_the_model_directory(labels: str) -> None:
    with pytest.raises(ValidationError, match="must be a file inside the model directory"):
        ModelConfig(name="m", arch="resnet18", num_classes=2, labels=labels)


def test_labels_read_back_one_per_class(tmp_path: Path) -> None:
    config = ModelConfig(name="m", arch="resnet18", num_classes=3, labels="names/classes.txt")
    (tmp_path / "names").mkdir()
    (tmp_path / "names" / "classes.txt").write_text(labels_text(["cat", "", "dog"]))
    assert read_labels(tmp_path, config) == ["cat", "", "dog"]
    with pytest.raises(ValueError, match="has 3 labels, the model 2 classes"):
        read_labels(tmp_path, config.model_copy(update={"num_classes": 2}))


@pytest.mark.parametrize("label", ["two\nlines", "trailing\n", "carriage\rreturn"])
def test_a_label_is_one_line(label: str) -> None:
    with pytest.raises(ValueError, match=r"label 1 .* must be one line"):
        labels_text(["fine", label])
