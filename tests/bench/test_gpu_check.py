"""``make gpu-check``: without a GPU it exits 2 and says why; its CPU dry run passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import frontends
from tests.shared_data import PHOTOS


def _gpu_check(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "gpu_check", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_the_record_keeps_how_each_model_came_up(tmp_path: Path) -> None:
    """What the GPU run's record says of the warm-up, page-locked memory given up included
    (the runner's own line, `server.sessions.Runner`)."""
    from bench.gpu_check import serving_lines

    lines = [
        "INFO server.core.loader [-] model m version 1 runs on CUDAExecutionProvider (asked)",
        "WARNING server.sessions [-] model m version 1 instance 0: no page-locked memory for "
        "its batches, it cannot be allocated: none; ONNX Runtime copies them to the GPU from "
        "ordinary memory",
        "INFO server.app [-] listening on 127.0.0.1:1",
        "INFO server.core.loader [-] model m version 1 READY in 2.0 s: 1 instance(s)",
    ]
    log = tmp_path / "server.log"
    log.write_text("\n".join(lines) + "\n")
    assert serving_lines(log) == [lines[0], lines[1], lines[3]]


def test_without_a_gpu_it_exits_2_and_says_why(tmp_path: Path) -> None:
    result = _gpu_check("--work", str(tmp_path), "--out", str(tmp_path), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "gpu-check: no GPU to check:" in result.stderr
    assert not list(tmp_path.iterdir()), "nothing built or written"


@pytest.mark.timeout(900)  # about 95 s of CPU: builds, 1 training epoch, short windows
def test_dry_run_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _gpu_check(
        "--device", "cpu", "--epochs", "1", "--concurrency", "1,4", "--seconds", "0.5",
        "--photos", str(PHOTOS), "--work", str(tmp_path / "work"), "--out", str(out),
        timeout=880,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "gpu-check.json").read_text())
    assert results["passed"] and results["providers"]["passed"]
    assert set(results["providers"]["get_model"]) == {
        "resnet20_fp32", "resnet20_fp16", "resnet20_graphs", "digits", "digits_fp16"
    }  # fmt: skip
    assert set(results["logits"]) == {
        "fp32_random", "fp32_photos", "fp16_photos", "graphs_photos", "fp16_digits"
    }  # fmt: skip
    assert results["logits"]["graphs_photos"]["images"] > 9  # every bucket of the graphs model
    assert [row["concurrency"] for row in results["speed"]["server"]] == [1, 4]
    # raw ONNX Runtime's figures are the device's: the check says where its session ran
    assert results["speed"]["raw_provider"] == "CPUExecutionProvider"
    assert [row["batch"] for row in results["speed"]["raw"]] == [1, 32]
    # the front-end sweep, tiny: the null model, one process against one front end and the
    # floors beside them
    sweep = results["sweep"]
    assert sweep["plan"]["device"] == "cpu" and sweep["processes"]["1"]["frontends"] == 1
    assert {(r["frontends"], r["concurrency"]) for r in sweep["rows"]} == {
        (0, 4), (1, 4), (frontends.FLOOR, 4), (frontends.SPLIT_FLOOR, 4)
    }  # fmt: skip
    for row in sweep["rows"]:
        assert row["ok"] > 0 and not row["errors"] and row["server_requests"] >= row["ok"], row
    assert set(sweep["ceilings"][1]["projected"]) == {"16", "32"}
    # the engine alone, tiny: one and eight requests in flight, every one answered
    engine = results["engine"]
    assert engine["plan"]["device"] == "cpu"
    assert [row["concurrency"] for row in engine["rows"]] == [1, 8]
    for row in engine["rows"]:
        assert row["requests"] > 0 and row["failed"] == 0, row
    text = (out / "gpu-check.md").read_text()
    assert "PASSED" in text and "## Front-end sweep" in text and "## The engine alone" in text
