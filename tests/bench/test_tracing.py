"""``python -m bench tracing`` (`bench.tracing`) end to end, briefly: real servers over the
null model, off and traced into the bench's loopback OTLP sink, and the server of a commit
as the baseline. Nothing here is timed or compared."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench import frontend, serving, tracing
from bench.__main__ import main


def test_the_run_measures_off_and_each_ratio_and_writes_its_block_only(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    other = f"{frontend.BEGIN}\nthe cost, kept\n{frontend.END}"
    doc.write_text(f"# Benchmarks\n\n{other}\n\n{tracing.BEGIN}\nold\n{tracing.END}\n\nafter\n")
    code = main([
        "tracing", "--ratios", "1,0.5", "--concurrency", "4", "--seconds", "0.6",
        "--rounds", "2", "--warmup", "0.2", "--baseline", "HEAD",
        "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
        "--doc", str(doc),
    ])  # fmt: skip
    assert code == 0
    (path,) = (tmp_path / "results").glob("tracing-*.json")
    results = json.loads(path.read_text())
    rows = {row["server"]: row for row in results["rows"]}
    assert list(rows) == ["off", "ratio 1", "ratio 0.5", "commit HEAD"]
    for name, row in rows.items():
        assert row["ok"] > 0 and not row["errors"], row
        assert row["server_requests"] >= row["ok"], row
        assert len(row["slices_cpu_us_per_request"]) == 2 and row["cpu_us_per_request"] > 0
        assert row["queue_full_lines"] == 0, name
    assert rows["off"]["added_us_per_request"] == 0
    assert rows["off"]["exports"] == rows["commit HEAD"]["exports"] == 0  # no endpoint
    assert rows["ratio 1"]["exports"] > 0 and rows["ratio 1"]["export_bytes"] > 0
    assert rows["ratio 0.5"]["exports"] > 0
    # every request of ratio 1 exported: far more bytes per request than at 0.5
    assert rows["ratio 1"]["export_bytes"] / rows["ratio 1"]["server_requests"] > (
        rows["ratio 0.5"]["export_bytes"] / rows["ratio 0.5"]["server_requests"]
    )
    assert rows["commit HEAD"]["revision"] == "HEAD" and rows["ratio 1"]["ratio"] == 1.0
    text = doc.read_text()
    assert text.startswith(f"# Benchmarks\n\n{other}\n\n") and text.endswith("\n\nafter\n")
    assert "\nold\n" not in text and path.name in text
    assert "| ratio 0.5 |" in text and "| commit HEAD |" in text and "| off |" in text


def test_the_baseline_serves_the_server_package_of_the_commit(tmp_path: Path) -> None:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    command = serving.baseline_command("HEAD", tmp_path)
    unpacked = tmp_path / head[:12] / "server"  # by commit: a moved HEAD is unpacked anew
    assert (unpacked / "__main__.py").is_file() and (unpacked / "tracing.py").is_file()
    assert command[-1].startswith(
        f"import sys, runpy; sys.path.insert(0, {str(unpacked.parent)!r})"
    )
