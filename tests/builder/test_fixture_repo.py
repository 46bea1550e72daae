"""The shared ``model_repo`` fixture holds what its docstring promises, verified."""

from __future__ import annotations

import json
from pathlib import Path

from server.repository import MODEL_FILE, VERIFICATION_FILE, ModelConfig, read_labels, sha256_file


def test_model_repo_contents(model_repo: Path) -> None:
    expected = {
        "resnet18": ("resnet18", "float32", 224, 1000),
        "resnet18_u8": ("resnet18", "uint8", 224, 1000),
        "cifar": ("resnet20", "float32", 32, 10),
    }
    assert sorted(p.name for p in model_repo.iterdir()) == sorted(expected)
    for name, (arch, dtype, size, classes) in expected.items():
        config = ModelConfig.load(model_repo / name)
        assert (config.name, config.arch, config.input.dtype) == (name, arch, dtype)
        assert (config.input.size, config.num_classes) == (size, classes)
        assert len(read_labels(model_repo / name, config)) == classes
        record = json.loads((model_repo / name / "1" / VERIFICATION_FILE).read_text())
        assert record["passed"] is True
        assert record["sha256"] == sha256_file(model_repo / name / "1" / MODEL_FILE)


def test_every_file_a_build_writes_is_readable_by_other_users(model_repo: Path) -> None:
    """A server that runs as another user (the images' uid 10001) reads the repository."""
    unreadable = [
        str(p.relative_to(model_repo))
        for p in model_repo.rglob("*")
        if p.is_file() and p.stat().st_mode & 0o004 == 0
    ]
    assert not unreadable, f"not readable by others: {unreadable}"
