"""``python -m bench engine`` (`bench.engine_load`) end to end, briefly: the real engine of
``--frontends`` in this process, fed by its feeder process over the front end's socket
pair and shared memory. Nothing here is timed or compared."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench import engine_load, tracing
from bench.__main__ import main
from server import shm


def test_the_engine_alone_answers_every_level_and_writes_its_block_only(
    tmp_path: Path,
) -> None:
    doc = tmp_path / "benchmarks.md"
    other = f"{tracing.BEGIN}\nthe tracing block, kept\n{tracing.END}"
    doc.write_text(f"# B\n\n{other}\n\n{engine_load.BEGIN}\nold\n{engine_load.END}\n\nafter\n")
    code = main([
        "engine", "--concurrency", "1,8", "--feeders", "1,2", "--seconds", "0.5",
        "--warmup", "0.2", "--rounds", "2", "--max-batch-size", "8",
        "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
        "--doc", str(doc),
    ])  # fmt: skip
    assert code == 0
    (path,) = (tmp_path / "results").glob("engine-*.json")
    results = json.loads(path.read_text())
    rows = {(row["feeders"], row["concurrency"]): row for row in results["rows"]}
    assert list(rows) == [(1, 1), (1, 8), (2, 1), (2, 8)]
    for row in rows.values():
        assert row["requests"] > 0 and row["failed"] == 0, row
        assert row["engine_us_per_request"] > 0 and len(row["slices_us_per_request"]) == 2
    # one request in flight is a batch of one, from one feeder however many there are;
    # eight in flight fill batches of more, from one feeder or from two
    assert rows[1, 1]["mean_batch"] == rows[2, 1]["mean_batch"] == 1.0
    assert rows[1, 8]["mean_batch"] > 1.0 and rows[2, 8]["mean_batch"] > 1.0
    assert len(results["levels"]) == 8 and {lv["round"] for lv in results["levels"]} == {1, 2}
    # no segment of this process (the engine) left with a name
    assert not list(shm.SHM_DIR.glob(f"{shm.PREFIX}{os.getpid()}.*"))
    text = doc.read_text()
    assert other in text and text.endswith("\n\nafter\n") and "\nold\n" not in text
    assert "| 2 | 8 | " in text
    assert "| feeders | in flight | req/s | engine µs/request |" in text
