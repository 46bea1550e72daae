"""``python -m bench frontend``, tiny: the server and the floor answer every level, the CPU
counting adds up, the report is written. Nothing here is timed or compared."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from bench import frontend, null_model
from bench.__main__ import main
from server import threads
from server.repository import check_version


def test_frontend_measures_server_and_floor_and_writes_the_report(
    model_repo: Path, tmp_path: Path
) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nprose\n\n{frontend.BEGIN}\nold\n{frontend.END}\n\nafter\n")
    code = main([
        "frontend", "--parts", "cost", "--repo", str(model_repo), "--no-build",
        "--models", f"cifar,{null_model.NAME}",
        "--concurrency", "1,2", "--batch-sizes", "1,2", "--max-batch-size", "4",
        "--warmup", "0.1", "--seconds", "0.4", "--rounds", "2", "--raw-seconds", "0.05",
        "--reference-seconds", "0.05", "--work", str(tmp_path / "work"),
        "--results", str(tmp_path / "results"), "--doc", str(doc),
    ])  # fmt: skip
    assert code == 0
    (path,) = (tmp_path / "results").glob("frontend-*.json")
    results = json.loads(path.read_text())
    clients = set(results["plan"]["clients"])
    assert clients <= {"perf_analyzer", "sdk"} and "sdk" in clients
    measured = {(r["model"], r["server"], r["client"], r["concurrency"]) for r in results["levels"]}
    assert measured == {
        (m, s, c, n)
        for m in ("cifar", null_model.NAME)
        for s in ("server", "floor")
        for c in clients
        for n in (1, 2)
    }
    for row in results["levels"]:
        assert row["ok"] > 0 and not row["errors"], row
        assert row["server_requests"] >= row["ok"], row  # the servers count what they answered
        if row["server"] == "server":
            assert set(row["threads_us_per_request"]) == set(threads.GROUPS)
            assert row["batch_mean"] >= 1
        else:  # the floor has no session: all its CPU is outside one
            assert row["cpu_us_outside_run"] == row["cpu_us_per_request"]
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose\n") and text.endswith("\n\nafter\n")
    assert "\nold\n" not in text and "#### Targets" in text and path.name in text


def test_the_sweep_runs_on_the_device_asked_for_and_the_record_says_which() -> None:
    """``--device cuda`` reaches the sweep's servers and its record; the cost part stays on
    the CPU (raw ONNX Runtime there)."""
    parser = argparse.ArgumentParser()
    frontend.register(parser.add_subparsers())
    args = parser.parse_args(["frontend", "--device", "cuda"])
    assert args.device == "cuda"
    plan = frontend.FrontendPlan(device="cuda")
    assert plan.sweep().device == "cuda" and plan.as_dict()["device"] == "cuda"
    assert frontend.FrontendPlan().sweep().device == "cpu"


def test_null_model_passes_the_repository_check(tmp_path: Path) -> None:
    version = null_model.build(tmp_path)
    check = check_version(version)
    assert check.servable, check.reason


def test_thread_cpu_counts_a_named_thread_in_its_group() -> None:
    before = threads.cpu_seconds()["decode"]

    def burn() -> None:
        threads.name_current("decode")
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        done.wait()

    done = threading.Event()
    worker = threading.Thread(target=burn)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while threads.cpu_seconds()["decode"] - before < 0.03 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads.cpu_seconds()["decode"] - before >= 0.03
    finally:
        done.set()
        worker.join()
