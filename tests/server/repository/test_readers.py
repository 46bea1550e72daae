"""The server, the builder's listing and the bench read a repository by the same rule."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.repository import prepare
from builder.repository import list_models
from server.config import Settings
from server.core.health import Health
from server.core.loader import Loader
from server.core.manager import RepositoryManager
from server.core.registry import ModelRegistry, State
from server.drain import Drain
from server.metrics import Metrics
from server.repository import LABELS_FILE, MODEL_FILE, ModelConfig, Status, labels_text
from tests.server.repository.test_check import GRAPH, add_version


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Model ``m``: version 1 verified (its graph is not ONNX), 2 modified after its check,
    and directories that are not versions: ``0``, ``01``, ``²``."""
    model_dir = tmp_path / "repo" / "m"
    for name in ("1", "2", "0", "01", "²"):
        add_version(model_dir, name)
    (model_dir / "2" / MODEL_FILE).write_bytes(GRAPH + b"\0")
    ModelConfig(name="m", arch="resnet20", num_classes=2).dump(model_dir)
    (model_dir / LABELS_FILE).write_text(labels_text(["even", "odd"]))
    return model_dir.parent


def test_the_server_loads_only_versions_and_refuses_the_modified_one(repo: Path) -> None:
    settings = Settings(repo=repo)
    metrics, registry = Metrics(), ModelRegistry()
    health = Health(registry, metrics, Drain())
    loader = Loader(settings, registry, health, metrics)
    manager = RepositoryManager(settings, registry, loader, health)
    manager.scan()
    model = registry.model("m")
    assert list(model.versions) == ["1", "2"]

    async def load() -> None:
        await manager.load_all()
        await registry.close()

    asyncio.run(load())
    one, two = model.versions["1"], model.versions["2"]
    assert one.state is State.UNAVAILABLE  # verified, but not a graph ONNX Runtime opens
    assert two.state is State.UNAVAILABLE
    assert two.reason == "model.onnx does not match the sha256 in verification.json"


def test_the_builder_lists_the_same_versions(repo: Path) -> None:
    (entry,) = list_models(repo)
    assert [(v.version, v.status) for v in entry.versions] == [
        (1, Status.VERIFIED),
        (2, Status.MODIFIED),
    ]


def test_the_bench_refuses_to_serve_a_latest_version_the_server_would_refuse(
    repo: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"2 would not be served \(modified\): model.onnx"):
        prepare(repo, tmp_path / "served", ["m"], max_batch_size=4, max_queue_delay_us=0)
