"""The benchmark, tiny: it runs end to end and writes its JSON, report and plots.

Nothing here is timed or compared: the figures belong to ``make bench``.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bench.__main__ as bench_main
from bench import histograms, perf_analyzer, profile, report
from bench.__main__ import main
from bench.load import VARIANTS
from bench.plan import Knobs
from bench.repository import NO_BATCH_SUFFIX, link_or_copy, prepare
from server.repository import MODEL_FILE, ModelConfig, check_version, latest_version
from tests.fixtures.servers import InProcessServer

MODEL = "cifar"  # resnet20 from the model_repo fixture: the fastest graph there
CONCURRENCY = (1, 2)


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"p{i}.jpg", quality=90)
    return folder


@pytest.fixture
def bench_run(model_repo: Path, photo_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    code = main([
        "run", "--repo", str(model_repo), "--no-build", "--models", MODEL,
        "--concurrency", ",".join(map(str, CONCURRENCY)), "--batch-sizes", "1,2",
        "--warmup", "0.1", "--seconds", "0.3", "--raw-seconds", "0.05",
        "--rounds", "2", "--reference-seconds", "0.05",
        "--photos", str(photo_dir), "--work", str(out / "work"), "--results", str(out / "results"),
        "--doc", str(out / "docs" / "benchmarks.md"), "--plots", str(out / "docs" / "benchmarks"),
    ])  # fmt: skip
    assert code == 0
    return out


def test_run_measures_every_variant_and_writes_the_report(bench_run: Path) -> None:
    (path,) = (bench_run / "results").glob("*.json")
    results = json.loads(path.read_text())
    assert [r["batch"] for r in results["raw"][MODEL]] == [1, 2]
    measured = {(r["variant"], r["concurrency"]) for r in results["server"]}
    left_out = results["meta"].get("left_out", {})
    expected = {
        (v.key, c) for v in VARIANTS for c in CONCURRENCY if v.runs_at(c) and v.key not in left_out
    }
    assert measured == expected
    # perf_analyzer runs wherever make test set it up; elsewhere the run says why not.
    assert set(left_out) <= {"v2-pa"}
    assert all("perf_analyzer" in reason for reason in left_out.values())
    best = max(results["raw"][MODEL], key=lambda r: r["img_per_s"])["batch"]
    references = {(r["concurrency"], r["batch"]) for r in results["reference"][MODEL]}
    assert references == {(c, b) for c in CONCURRENCY for b in {1, best}}
    for row in results["server"]:
        assert row["ok"] > 0 and not row["errors"], row
        assert row["slices"] == 2
        assert sum(row["batch_sizes"].values()) >= 1
        if row["variant"] == "nobatch":
            assert row["batch_mean"] == 1.0
    doc = (bench_run / "docs" / "benchmarks.md").read_text()
    assert report.BEGIN in doc and "### Targets" in doc and path.name in doc
    assert "### Raw ONNX Runtime next to each level" in doc
    for png in ("latency.png", "batch-sizes.png"):
        assert (bench_run / "docs" / "benchmarks" / png).stat().st_size > 0


def test_report_keeps_the_prose_around_the_generated_block(bench_run: Path) -> None:
    (path,) = (bench_run / "results").glob("*.json")
    doc = bench_run / "docs" / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nprose before\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    assert main(["report", str(path), "--doc", str(doc), "--plots", str(doc.parent / "p")]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n") and text.endswith("\n\nafter\n")
    assert "\nold\n" not in text and "### Raw ONNX Runtime" in text


def test_served_repository_adds_a_batching_off_twin(model_repo: Path, tmp_path: Path) -> None:
    (served,) = prepare(model_repo, tmp_path / "repo", [MODEL], max_batch_size=8,
                        max_queue_delay_us=500)  # fmt: skip
    on = ModelConfig.load(tmp_path / "repo" / MODEL)
    off = ModelConfig.load(tmp_path / "repo" / (MODEL + NO_BATCH_SUFFIX))
    assert (on.batching.max_batch_size, on.batching.max_queue_delay_us) == (8, 500)
    assert (off.batching.max_batch_size, off.name) == (1, served.nobatch)
    assert ModelConfig.load(model_repo / MODEL) != on  # the source is left as it was
    # hard links, not symbolic ones: the server refuses links out of its repository
    for name in (MODEL, served.nobatch):
        version = latest_version(tmp_path / "repo" / name)
        assert not (version / MODEL_FILE).is_symlink()
        assert (version / MODEL_FILE).samefile(served.model_file)
        assert check_version(version).servable


def test_model_files_are_copied_where_no_hard_link_can_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source.onnx"
    source.write_bytes(b"graph")

    def cross_device(src: Path, dst: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    copied = link_or_copy(source, tmp_path / "copy.onnx")
    assert copied.read_bytes() == b"graph" and not copied.samefile(source)


def test_histogram_difference_per_bucket() -> None:
    text = "\n".join(
        f'resnet_serve_batch_size_bucket{{model="m",version="1",le="{le}"}} {n}'
        for le, n in (("1.0", 3), ("2.0", 5), ("4.0", 9), ("+Inf", 9))
    )
    text = (
        "# TYPE resnet_serve_batch_size histogram\n" + text
        + '\nresnet_serve_batch_size_sum{model="m",version="1"} 24.0'
        + '\nresnet_serve_batch_size_count{model="m",version="1"} 9.0\n'
    )  # fmt: skip
    after = histograms.read(text, histograms.BATCH_SIZE, "m")
    before = histograms.Histogram({1.0: 1, 2.0: 1, 4.0: 1, float("inf"): 1}, 1.0, 1.0)
    delta = after - before
    assert delta.per_bucket() == [("1", 2), ("2", 2), ("3–4", 4), (">4", 0)]
    assert delta.mean == 23 / 8


def test_profile_summary_shares_of_a_core() -> None:
    running = "\n".join([
        "thread (101): infer-m-1_0;Thread.run (threading.py:982);Session.run (ort.py:395) 150",
        "thread (102): decode_0;_worker (thread.py:83);ImageFile.load (ImageFile.py:290) 30",
        "thread (103): decode_1;_worker (thread.py:83);ImageFile.load (ImageFile.py:291) 20",
        "thread (104): MainThread;run (asyncio.py:1);EpollSelector.select (selectors.py:9) 10",
    ])  # fmt: skip
    gil = "thread (104): MainThread;run (asyncio.py:1);Handle._run (events.py:80) 40"
    summary = profile.summarize(running, gil, seconds=2.0)
    assert summary["threads_pct"] == {"infer-m-1": 75.0, "decode": 25.0, "MainThread": 5.0}
    assert summary["gil_pct"] == 20.0
    assert summary["top_functions_pct"]["ImageFile.load (ImageFile.py)"] == 25.0


def test_sweep_compares_knob_sets_on_fresh_servers(
    model_repo: Path, photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    knob_sets = {"defaults": Knobs(), "one decode worker": Knobs(decode_workers=1)}
    monkeypatch.setattr(bench_main, "SWEEP", knob_sets)
    doc = tmp_path / "benchmarks.md"
    code = main([
        "sweep", "--repo", str(model_repo), "--no-build", "--models", MODEL,
        "--variants", "uint8", "--concurrency", "2", "--batch-sizes", "1",
        "--warmup", "0.1", "--seconds", "0.3", "--raw-seconds", "0.05",
        "--rounds", "2", "--reference-seconds", "0.05",
        "--photos", str(photo_dir), "--work", str(tmp_path / "work"),
        "--results", str(tmp_path / "results"), "--doc", str(doc),
    ])  # fmt: skip
    assert code == 0
    (path,) = (tmp_path / "results").glob("*.json")
    sweep = json.loads(path.read_text())["sweep"]
    assert [s["label"] for s in sweep] == list(knob_sets)
    assert sweep[1]["flags"] == ["--decode-workers", "1"]
    assert all(row["ok"] > 0 for s in sweep for row in s["rows"])
    assert report.SWEEP_BEGIN in doc.read_text() and "one decode worker" in doc.read_text()


def test_targets_compare_with_raw_ort_measured_next_to_the_level() -> None:
    def raw_row(batch: int, img_per_s: float, p50: float) -> dict[str, float]:
        return {"batch": batch, "img_per_s": img_per_s, "p50_ms": p50}

    def server_row(variant: str, concurrency: int, img_per_s: float, p50: float) -> dict:
        return {"model": "m", "variant": variant, "concurrency": concurrency,
                "img_per_s": img_per_s, "p50_ms": p50}  # fmt: skip

    results = {
        "raw": {"m": [raw_row(1, 10.0, 100.0), raw_row(8, 20.0, 400.0)]},
        # the machine ran slower while the levels were measured
        "reference": {
            "m": [
                {"concurrency": 1, **raw_row(1, 8.0, 125.0)},
                {"concurrency": 16, **raw_row(8, 15.0, 530.0), "slice_img_per_s": [14.0, 16.0]},
            ]
        },
        "server": [
            server_row("uint8", 1, 8.0, 126.0),
            {**server_row("uint8", 16, 14.0, 900.0), "slice_img_per_s": [13.0, 15.0]},
            server_row("nobatch", 16, 13.0, 990.0),
        ],
    }
    found = {t.name.split(" ≥")[0].split(" p50")[0]: t for t in report.targets(results)}
    throughput = found["uint8 throughput at concurrency"]
    assert throughput.met and "c16: 0.93× (14.0 vs 15.0 img/s" in throughput.figure
    assert "by round 0.93–0.94×" in throughput.figure
    latency = found["concurrency 1"]
    assert latency.met and "126.0 ms vs 125.0 ms (+1.0 ms)" in latency.figure
    batching = found["batching on vs off at concurrency 16"]
    assert not batching.met and "1.08× (14.0 vs 13.0 img/s)" in batching.figure
    assert "batch 8 vs batch 1 next to it: 1.50×" in batching.figure  # 15 vs 10
    # model "m" is not resnet50: only the batching target is the for it
    assert (throughput.binding, latency.binding, batching.binding) == (False, False, True)
    del results["reference"]  # older runs: the sweep at the start is the reference
    found = {t.name.split(" ≥")[0].split(" p50")[0]: t for t in report.targets(results)}
    assert not found["uint8 throughput at concurrency"].met
    assert not found["concurrency 1"].met


def test_histograms_of_slices_add_up() -> None:
    first = histograms.Histogram({1.0: 2, 16.0: 2, float("inf"): 2}, 2.0, 2.0)
    second = histograms.Histogram({1.0: 0, 16.0: 3, float("inf"): 3}, 48.0, 3.0)
    both = first + second
    assert both.per_bucket() == [("1", 2), ("2–16", 3), (">16", 0)]
    assert both.mean == 10.0


def test_spin_ab_reports_every_setting_with_and_without_a_gap(
    model_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["spin", "--repo", str(model_repo), "--model", MODEL, "--rounds", "2",
                 "--slice", "0.05", "--gap-ms", "5"])  # fmt: skip
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 6  # three settings × (back to back, 5 ms gap)
    for row in rows:
        runs, p50, _, cpu = (float(cell) for cell in row.strip("| ").split(" | ")[2:])
        assert runs >= 2 and p50 > 0 and cpu > 0, row


def test_perf_analyzer_failure_is_an_error_row_not_a_crash(tmp_path: Path) -> None:
    if (reason := perf_analyzer.unavailable()) is not None:
        pytest.skip(reason)
    from bench.serving import free_port

    result = perf_analyzer.measure(
        f"127.0.0.1:{free_port()}", MODEL, 1, 0.6, tmp_path, {"images": b"\0" * 12}
    )
    assert result.ok == 0 and result.seconds > 0
    ((message, count),) = result.errors.items()
    assert count == 1 and "perf_analyzer exit" in message and "connect" in message


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stock_perf_analyzer_with_its_default_data_has_no_errors(
    model_server: InProcessServer, protocol: str, tmp_path: Path
) -> None:
    """perf_analyzer as a Triton user runs it, without data flags: its random float32 data
    holds NaN and Inf, which the server computes like Triton does (docs/security.md)."""
    if (reason := perf_analyzer.unavailable()) is not None:
        pytest.skip(reason)
    assert model_server.http_url is not None
    address = {
        "grpc": model_server.address,
        "http": model_server.http_url.removeprefix("http://"),
    }[protocol]
    result = perf_analyzer.measure(address, "resnet18", 1, 0.6, tmp_path, None, protocol)
    assert not result.errors and result.ok > 0, result.errors
