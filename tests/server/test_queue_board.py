"""The engine's board as the registry's snapshots drive it (`server.engine.snapshot`): each
served batcher gets a cell, its row carries the index, and its queue writes the cell as it
changes; a version no longer in the registry frees its cell, zeroed, and its batcher stops
writing there, so the cell can serve another version."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from server import shm
from server.core.batcher import Batcher
from server.core.registry import Model, ModelRegistry, ModelVersion, State
from server.engine import snapshot
from server.metrics import Metrics
from server.repository import Batching, ModelConfig
from tests.server.core.test_batcher import FakeRunner

CONFIG = ModelConfig(name="m", arch="resnet20", num_classes=3)


def _serve(registry: ModelRegistry, name: str, runner: FakeRunner) -> Batcher:
    batcher = Batcher(name, "1", [runner], Batching(max_batch_size=4), Metrics())
    model = Model(name, CONFIG)
    model.put(ModelVersion(name, "1", CONFIG, [], Path(name), state=State.READY,
                           batcher=batcher))  # fmt: skip
    registry.add(model)
    return batcher


def _cells(rows: list[tuple[Any, ...]]) -> dict[str, int | None]:
    """Each model's one version's cell, the last field of its row."""
    return {name: versions[0][-1] for name, _, versions in rows}


async def test_each_batcher_writes_its_cell_until_its_version_is_gone() -> None:
    board, registry = shm.Board(), ModelRegistry()
    runner = FakeRunner()
    first = _serve(registry, "a", runner)
    first.start()
    cell = _cells(snapshot(registry, board))["a"]
    assert cell is not None
    runner.gate.clear()  # the first batch stays running, the rest queued
    first.enqueue(np.zeros((3, 1), np.float32))
    first.enqueue(np.zeros((6, 1), np.float32))
    for _ in range(5):
        await asyncio.sleep(0)
    assert first.queued > 0 and board.cells[cell] == first.queued
    assert _cells(snapshot(registry, board))["a"] == cell  # the same cell at each snapshot

    registry.remove("a")
    second = _serve(registry, "b", FakeRunner())
    assert _cells(snapshot(registry, board)) == {"b": cell}  # freed, zeroed, given again
    assert first.on_queued is None and board.cells[cell] == second.queued == 0
    first.enqueue(np.zeros((1, 1), np.float32))  # the old queue changes: not on the board
    assert board.cells[cell] == 0
    runner.gate.set()
    await first.close()
