"""The front-end sweep (`bench.frontends`): its arithmetic, the CPU of a real server's
process tree by role, its counts from the merged /metrics, and a tiny run end to end.
Nothing here is timed or compared."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from resnet_serve_client.bench import LevelResult
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc

from bench import frontend, frontends, null_model, perf_analyzer, serving
from bench.__main__ import main
from bench.frontends import Counts, Proc
from bench.repository import Served
from bench.serving import start
from server.repository import MODEL_FILE, ModelConfig, latest_version

TICKS = frontends._TICKS


# the arithmetic


def test_ceiling_is_the_engine_or_the_front_ends_whichever_binds_first() -> None:
    assert frontends.ceiling(100, 1000, 16) == pytest.approx(10_000)  # the engine binds
    assert frontends.ceiling(500, 1000, 16) == pytest.approx(2_000)
    assert frontends.ceiling(50, 4000, 16) == pytest.approx(15 * 1e6 / 4000)  # front ends bind
    assert frontends.ceiling(50, 4000, 32) == pytest.approx(31 * 1e6 / 4000)
    assert frontends.ceiling(100, 1000, 2) == pytest.approx(1_000)  # one core each
    for bad in ((100, 1000, 1), (0, 1000, 16), (100, 0, 16)):
        with pytest.raises(ValueError):
            frontends.ceiling(*bad)


def test_ceilings_project_each_split_and_keep_the_single_process_measured() -> None:
    rows = [
        _row("null", 0, 64, 1200.0, {"whole": 800.0}),
        _row("null", 2, 64, 1500.0, {"engine": 250.0, "frontends": 1000.0, "whole": 1250.0}),
        _row("null", 2, 16, 1400.0, {"engine": 300.0, "frontends": 1100.0, "whole": 1400.0}),
    ]
    single, split_ = frontends.ceilings(rows)
    assert single["frontends"] == 0 and single["ceiling"] == 1250 and "projected" not in single
    assert single["req_per_s"] == 1200.0 and single["concurrency"] == 64  # read at 64
    assert split_["projected"] == {"16": 4000, "32": 4000}  # the engine binds: 1e6 / 250
    assert single["x_floor"] is None and split_["x_floor"] is None  # no floor measured
    assert frontends.ceilings(rows[2:])[0]["concurrency"] == 16  # the top one without 64


def test_the_floor_is_measured_beside_and_each_whole_is_read_against_it() -> None:
    plan = frontends.SweepPlan(frontends=(0, 1))
    assert plan.configurations() == (0, 1, frontends.FLOOR, frontends.SPLIT_FLOOR)
    assert frontends.SweepPlan(frontends=(0, 1), floor=False).configurations() == (0, 1)
    # the floors speak gRPC alone: a sweep over HTTP has none
    assert frontends.SweepPlan(frontends=(0, 1), protocol="http").configurations() == (0, 1)
    rows = [
        _row("null", 0, 64, 1200.0, {"whole": 800.0}),
        _row("null", 1, 64, 1500.0, {"engine": 250.0, "frontends": 1000.0, "whole": 1250.0}),
        _row("null", frontends.FLOOR, 64, 2000.0, {"whole": 500.0}),
        _row("null", 1, 16, 1400.0, {"engine": 300.0, "frontends": 1100.0, "whole": 1400.0}),
    ]
    single, split_, bottom = frontends.ceilings(rows)
    assert (single["x_floor"], split_["x_floor"], bottom["x_floor"]) == (1.6, 2.5, 1.0)
    assert bottom["ceiling"] == 2000 and "projected" not in bottom  # its own, one process
    assert frontends.x_floor(rows, rows[3]) is None  # no floor measured at 16


def test_the_split_floor_is_read_by_role_and_what_is_ours_over_it() -> None:
    assert frontends.role("floor-engine") == "engine"
    assert frontends.role("floor-frontend") == "frontends"
    assert frontends.role("python") == "other"
    rows = [
        _row("null", 1, 64, 1500.0, {"engine": 110.0, "frontends": 500.0, "whole": 610.0}),
        _row("null", 2, 64, 1600.0, {"engine": 100.0, "frontends": 560.0, "whole": 660.0}),
        _row("null", frontends.FLOOR, 64, 4000.0, {"whole": 250.0}),
        _row("null", frontends.SPLIT_FLOOR, 64, 3000.0, {"engine": 25.0, "frontends": 300.0}),
    ]
    rows[-1]["cpu_us_per_request"]["whole"] = 325.0  # type: ignore[index]
    *_, split_floor = frontends.ceilings(rows)
    assert split_floor["x_floor"] == 1.3
    assert split_floor["projected"] == {"16": 40_000, "32": 40_000}  # the echo engine binds
    plan = frontends.SweepPlan(models=("null",), frontends=(1, 2), concurrencies=(64,))
    text = _report(plan, rows)
    assert "| null | split floor | 25 | 300 | 325 | 1.30 | 3000 | 40,000 | 40,000 |" in text
    assert (
        "null CPU µs per request over the split floor's, c=64: 1 front end: engine +85, "
        "front ends +200; 2 front ends: engine +75, front ends +260." in text
    )


def test_concurrency_is_split_between_at_most_the_client_processes() -> None:
    assert frontends.split(1, 4) == [1]
    assert frontends.split(2, 4) == [1, 1]
    assert frontends.split(16, 4) == [4, 4, 4, 4]
    assert frontends.split(64, 4) == [16, 16, 16, 16]
    assert frontends.split(6, 4) == [2, 2, 1, 1]
    assert sum(frontends.split(67, 4)) == 67


def test_clients_at_once_add_their_rates_and_keep_every_latency() -> None:
    a, b = LevelResult(4, None, 1), LevelResult(4, None, 1)
    a.ok, a.seconds, a.latencies = 100, 1.0, [0.001] * 100
    b.ok, b.seconds, b.latencies = 50, 0.5, [0.002] * 50
    b.errors["UNAVAILABLE"] += 2
    merged = frontends.merge([a, b], 8)
    assert merged.ok == 150 and len(merged.latencies) == 150
    assert merged.throughput == pytest.approx(200.0)  # 100/s + 100/s
    assert merged.errors == Counter({"UNAVAILABLE": 2}) and merged.concurrency == 8
    nothing = frontends.merge([LevelResult(1, None, 1)], 1)
    assert nothing.ok == 0 and nothing.throughput == 0.0


METRICS = """\
# HELP resnet_serve_requests_total Classification requests by outcome.
# TYPE resnet_serve_requests_total counter
resnet_serve_requests_total{model="null",version="1",code="OK"} 120.0
resnet_serve_requests_total{model="null",version="2",code="OK"} 30.0
resnet_serve_requests_total{model="null",version="1",code="UNAVAILABLE"} 4.0
resnet_serve_requests_total{model="resnet20",version="1",code="OK"} 999.0
# HELP resnet_serve_batch_size Images per session run.
# TYPE resnet_serve_batch_size histogram
resnet_serve_batch_size_bucket{model="null",version="1",le="1.0"} 10.0
resnet_serve_batch_size_bucket{model="null",version="1",le="+Inf"} 40.0
resnet_serve_batch_size_count{model="null",version="1"} 40.0
resnet_serve_batch_size_sum{model="null",version="1"} 150.0
resnet_serve_batch_size_count{model="resnet20",version="1"} 7.0
resnet_serve_batch_size_sum{model="resnet20",version="1"} 999.0
"""


def test_counts_read_one_models_requests_and_batches_from_metrics() -> None:
    null = frontends.counts(METRICS, "null")
    assert null == Counts(ok=150.0, failed=4.0, batch_sum=150.0, batch_count=40.0)
    assert frontends.counts(METRICS, "resnet20") == Counts(999.0, 0.0, 999.0, 7.0)
    assert frontends.counts(METRICS, "absent") == Counts()
    assert null - Counts(50.0, 1.0, 50.0, 20.0) == Counts(100.0, 3.0, 100.0, 20.0)


def test_a_stat_line_is_read_past_a_comm_with_spaces_and_parentheses() -> None:
    fields = ["S", "41"] + ["0"] * 9 + [str(3 * TICKS), str(TICKS)] + ["0"] * 30
    proc = frontends.parse_stat(7, f"7 (rs x) (y)) {' '.join(fields)}")
    assert proc == Proc(7, 41, "rs x) (y)", 4.0)


def test_the_tree_holds_the_root_and_its_descendants_only() -> None:
    procs = [Proc(1, 0, "init", 0), Proc(10, 1, "rs-engine", 0), Proc(11, 10, "rs-frontend-0", 0),
             Proc(12, 10, "rs-frontend-1", 0), Proc(13, 12, "helper", 0),
             Proc(20, 1, "rs-engine", 0)]  # fmt: skip
    assert set(frontends.process_tree(10, procs)) == {10, 11, 12, 13}
    assert frontends.process_tree(99, procs) == {}
    tree = frontends.process_tree(10, procs)
    assert frontends.roles_of(tree) == {"engine": 1, "frontends": 2, "other": 1}


def test_cpu_by_role_counts_deltas_new_processes_whole_and_notes_the_gone() -> None:
    before = {10: Proc(10, 1, "rs-engine", 5.0), 11: Proc(11, 10, "rs-frontend-0", 2.0),
              12: Proc(12, 10, "rs-frontend-1", 1.0)}  # fmt: skip
    after = {10: Proc(10, 1, "rs-engine", 5.5), 11: Proc(11, 10, "rs-frontend-0", 3.0),
             14: Proc(14, 10, "rs-frontend-1", 0.25), 15: Proc(15, 10, "sh", 0.125)}  # fmt: skip
    spent = frontends.cpu_by_role(before, after)
    assert spent == {"engine": 0.5, "frontends": 1.25, "other": 0.125, "whole": 1.875}
    assert frontends.replaced(before, after) == 1  # front end 12 died, 14 replaced it


def test_a_cells_row_gives_cpu_per_request_by_role_and_the_mean_batch() -> None:
    result = LevelResult(64, None, 1)
    result.ok, result.seconds, result.latencies = 1000, 2.0, [0.01] * 1000
    cell = frontends.Cell("null", 2, 64, 4, LevelResult(64, None, 1))
    cell.add(result, Counts(1000.0, 0.0, 3000.0, 500.0),
             {"engine": 0.25, "frontends": 0.75, "other": 0.0, "whole": 1.0}, 0)  # fmt: skip
    row = cell.row()
    assert row["cpu_us_per_request"] == {"engine": 250.0, "frontends": 750.0, "whole": 1000.0}
    assert row["batch_mean"] == 6.0 and row["server_requests"] == 1000
    assert row["req_per_s"] == 500.0 and row["server_cores"] == 0.5
    single = frontends.Cell("null", 0, 64, 4, LevelResult(64, None, 1))
    single.add(result, Counts(1000.0, 0.0, 1000.0, 1000.0),
               {"engine": 0.0, "frontends": 0.0, "other": 1.0, "whole": 1.0}, 0)  # fmt: skip
    assert single.row()["cpu_us_per_request"] == {"whole": 1000.0}


def test_the_report_states_the_ratios_against_the_single_process() -> None:
    rows = [
        _row("null", 0, 1, 500.0, {"whole": 900.0}, p50=1.0),
        _row("null", 1, 1, 400.0, {"engine": 300.0, "frontends": 900.0, "whole": 1200.0}, p50=1.5),
        _row("null", 2, 1, 400.0, {"engine": 300.0, "frontends": 900.0, "whole": 1200.0}, p50=1.5),
        _row("null", 0, 64, 1000.0, {"whole": 800.0}),
        _row("null", 1, 64, 1500.0, {"engine": 250.0, "frontends": 1000.0, "whole": 1250.0}),
        _row("null", 2, 64, 2400.0, {"engine": 250.0, "frontends": 1000.0, "whole": 1250.0}),
        _row("null", frontends.FLOOR, 64, 3000.0, {"whole": 500.0}),
    ]
    plan = frontends.SweepPlan(models=("null",), frontends=(0, 1, 2), concurrencies=(1, 64))
    text = _report(plan, rows)
    assert "| 64 | 2 front ends | 4 | 2400 | 2.40 | 1.60 |" in text
    assert "| 1 | 1 front end | 1 | 400 | 0.80 | 1.00 | 1.50 | +0.50 |" in text
    assert "| null | single process | – | – | 800 | 1.60 | 1000 | 1,250 (one process) |" in text
    assert "| null | 2 front ends | 250 | 1,000 | 1,250 | 2.50 | 2400 | 4,000 | 4,000 |" in text
    assert "| null | grpc.aio floor | – | – | 500 | 1.00 | 3000 | 2,000 (one process) |" in text
    assert "| 64 | grpc.aio floor | 4 | 3000 | 3.00 |" in text
    assert "c=64: best split (2 front ends) / single 2.40, 2 front ends / 1 1.60" in text
    assert "p50 1 front end − single +0.50 ms" in text
    assert (
        "null whole CPU per request / the floor's, c=64: single process 1.60, "
        "1 front end 2.50, 2 front ends 2.50." in text
    )
    assert "× baseline" not in text  # no baseline measured, no column for it


def test_the_report_reads_each_configuration_against_the_baseline_commit() -> None:
    base = frontends.BASELINE
    rows = [
        _row("null", 0, 1, 500.0, {"whole": 900.0}, p50=1.0),
        _row("null", 1, 1, 400.0, {"engine": 300.0, "frontends": 900.0, "whole": 1200.0}, p50=1.5),
        _row("null", base, 1, 250.0, {"whole": 1500.0}, p50=2.0),
        _row("null", 0, 64, 1000.0, {"whole": 800.0}),
        _row("null", 2, 64, 2400.0, {"engine": 250.0, "frontends": 1000.0, "whole": 1250.0}),
        _row("null", base, 64, 800.0, {"whole": 1250.0}),
    ]
    plan = frontends.SweepPlan(models=("null",), frontends=(0, 1, 2), concurrencies=(1, 64),
                               baseline="0123abc")  # fmt: skip
    assert plan.configurations() == (0, 1, 2, base, frontends.FLOOR, frontends.SPLIT_FLOOR)
    text = _report(plan, rows)
    assert "the baseline single process of commit 0123abc" in text
    assert "| p50 ms |" in text and "| × 1 front end | × baseline |" in text
    assert "| 1 | 1 front end | 1 | 400 | 0.80 | 1.00 | 1.60 | 1.50 | +0.50 |" in text
    assert "| 64 | baseline single process | 4 | 800 | 0.80 | – | 1.00 |" in text
    assert "| null | baseline single process | – | – | 1,250 | 800 | 800 (one process) |" in text
    assert "c=1: best split (1 front end) / single 0.80, best split / baseline 1.60" in text
    assert "p50 1 front end − single +0.50 ms, p50 1 front end − baseline -0.50 ms" in text
    assert "c=64: best split (2 front ends) / single 2.40, best split / baseline 3.00" in text


def _report(plan: frontends.SweepPlan, rows: list[dict[str, Any]]) -> str:
    """The sweep's report of `rows`, as `bench.frontends.markdown` writes it."""
    sweep = {"plan": plan.as_dict(), "rows": rows, "ceilings": frontends.ceilings(rows)}
    return "\n".join(frontends.markdown(sweep))


def _row(model: str, n: int, c: int, rate: float, us: dict[str, float],
         p50: float = 10.0) -> dict[str, object]:  # fmt: skip
    return {"model": model, "frontends": n, "concurrency": c, "clients": min(4, c),
            "req_per_s": rate, "p50_ms": p50, "p99_ms": 2 * p50, "batch_mean": 1.0,
            "server_cores": 1.0, "cpu_us_per_request": us, "errors": {},
            "processes_replaced": 0}  # fmt: skip


# a real server


def _null_repo(tmp_path: Path) -> tuple[Path, Served]:
    repo = tmp_path / "repo"
    null_model.build(repo)
    config = ModelConfig.load(repo / null_model.NAME)
    model_file = latest_version(repo / null_model.NAME) / MODEL_FILE
    return repo, Served(null_model.NAME, config, model_file)


def test_cpu_by_role_of_a_server_with_two_front_ends(tmp_path: Path) -> None:
    repo, served = _null_repo(tmp_path)
    flags = ["--device", "cpu", "--no-reflection", "--frontends", "2"]
    server = start(repo, tmp_path / "server.log", flags)
    try:
        tree = frontends.process_tree(server.process.pid)
        assert frontends.roles_of(tree) == {"engine": 1, "frontends": 2, "other": 0}
        assert tree[server.process.pid].comm == frontends.ENGINE
        assert {p.comm for p in tree.values()} == {"rs-engine", "rs-frontend-0", "rs-frontend-1"}
        request = frontend.request_for(served)
        before_counts = frontends.counts(server.metrics(), served.name)
        before = frontends.process_tree(server.process.pid)
        sent = 300
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
        for _ in range(3):  # three connections, so that both front ends may take some
            with grpc.insecure_channel(server.address, options=options) as channel:
                stub = v2_grpc.GRPCInferenceServiceStub(channel)
                for _call in range(sent // 3):
                    stub.ModelInfer(request, timeout=30)
        after = frontends.process_tree(server.process.pid)
        counted = frontends.counts(server.metrics(), served.name) - before_counts
        spent = frontends.cpu_by_role(before, after)
    finally:
        assert server.stop() == 0
    # every process's requests, merged into the engine's /metrics; one image per run's item
    assert counted.ok == sent and counted.failed == 0
    assert counted.batch_sum == sent and 1 <= counted.batch_count <= sent
    assert spent["engine"] > 0 and spent["frontends"] > 0 and spent["other"] == 0
    assert spent["whole"] == pytest.approx(spent["engine"] + spent["frontends"])
    assert frontends.replaced(before, after) == 0


def test_the_sweep_runs_end_to_end_and_writes_its_block_only(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    cost = f"{frontend.BEGIN}\nthe cost, kept\n{frontend.END}"
    doc.write_text(f"# Benchmarks\n\n{cost}\n\n{frontend.SWEEP_BEGIN}\nold\n"
                   f"{frontend.SWEEP_END}\n\nafter\n")  # fmt: skip
    code = main([
        "frontend", "--parts", "sweep", "--repo", str(tmp_path / "none"), "--no-build",
        "--models", null_model.NAME, "--frontends", "0,1", "--concurrency", "1,4",
        "--sweep-seconds", "0.8", "--rounds", "2", "--work", str(tmp_path / "work"),
        "--results", str(tmp_path / "results"), "--doc", str(doc), "--baseline", "HEAD",
    ])  # fmt: skip
    assert code == 0
    (path,) = (tmp_path / "results").glob("frontend-*.json")
    results = json.loads(path.read_text())
    sweep = results["sweep"]
    assert results["meta"]["machine"]["grpcio"] == grpc.__version__  # what the figures ran on
    assert sweep["plan"]["baseline"] == serving.commit_of("HEAD")  # named by its commit
    floor, split_floor, base = frontends.FLOOR, frontends.SPLIT_FLOOR, frontends.BASELINE
    assert sweep["processes"] == {
        "0": {"engine": 0, "frontends": 0, "other": 1},
        "1": {"engine": 1, "frontends": 1, "other": 0},
        str(base): {"engine": 0, "frontends": 0, "other": 1},  # the commit's one process
        str(floor): {"engine": 0, "frontends": 0, "other": 1},  # the floor, one process
        str(split_floor): {"engine": 1, "frontends": 1, "other": 0},  # and its echo engine
    }
    cells = {(r["model"], r["frontends"], r["concurrency"]): r for r in sweep["rows"]}
    configurations = (0, 1, base, floor, split_floor)
    assert set(cells) == {(null_model.NAME, n, c) for n in configurations for c in (1, 4)}
    for (_, n, c), row in cells.items():
        assert row["ok"] > 0 and not row["errors"], row
        # the server by its /metrics, the floor by its ModelStatistics: every call counted
        assert row["server_requests"] >= row["ok"] and row["server_failed"] == 0, row
        assert row["clients"] == (1 if c == 1 else 4)
        assert row["batch_mean"] is None if n in (floor, split_floor) else row["batch_mean"] >= 1
        roles = {"whole"} if n in (0, base, floor) else {"engine", "frontends", "whole"}
        assert set(row["cpu_us_per_request"]) == roles, row
        assert row["processes_replaced"] == 0
    (single, split_, baseline, bottom, through) = sweep["ceilings"]
    assert single["concurrency"] == 4 and single["ceiling"] > 0 and baseline["ceiling"] > 0
    assert set(split_["projected"]) == {"16", "32"}
    assert bottom["frontends"] == floor and bottom["x_floor"] == 1.0
    assert single["x_floor"] > 0 and split_["x_floor"] > 0 and through["x_floor"] > 0
    assert through["frontends"] == split_floor and set(through["projected"]) == {"16", "32"}
    text = doc.read_text()
    assert text.startswith(f"# Benchmarks\n\n{cost}\n\n") and text.endswith("\n\nafter\n")
    assert "\nold\n" not in text and path.name in text and "ceiling, 32 cores" in text
    assert "| grpc.aio floor |" in text and "/ the floor's, c=4:" in text
    assert "| split floor |" in text and "over the split floor's, c=4: 1 front end: engine" in text
    assert f"the baseline single process of commit {serving.commit_of('HEAD')}" in text
    assert "| 4 | baseline single process | 4 |" in text and "/ baseline " in text
    assert f"; grpcio {grpc.__version__}; raw JSON" in text


def test_a_baseline_git_cannot_find_is_refused_before_any_server_starts(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no commit 'no-such-revision' in .*: fatal"):
        main([
            "frontend", "--parts", "sweep", "--repo", str(tmp_path / "none"), "--no-build",
            "--models", null_model.NAME, "--frontends", "0", "--concurrency", "1",
            "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
            "--doc", str(tmp_path / "benchmarks.md"), "--baseline", "no-such-revision",
        ])  # fmt: skip
    assert not list((tmp_path / "work").rglob("server-*.log"))  # no server was started
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_the_sweep_over_http_drives_the_rest_port_and_writes_its_own_block(
    tmp_path: Path,
) -> None:
    """``--protocol http``: perf_analyzer speaks v2 REST (binary tensor data) to each
    server's HTTP port, which every front end shares; the server counts each call, and the
    report goes into the HTTP block, the gRPC sweep's left as it was."""
    if (reason := perf_analyzer.unavailable()) is not None:
        pytest.skip(reason)
    doc = tmp_path / "benchmarks.md"
    grpc_block = f"{frontend.SWEEP_BEGIN}\nthe gRPC sweep, kept\n{frontend.SWEEP_END}"
    doc.write_text(f"# Benchmarks\n\n{grpc_block}\n\n{frontend.SWEEP_HTTP_BEGIN}\nold\n"
                   f"{frontend.SWEEP_HTTP_END}\n")  # fmt: skip
    code = main([
        "frontend", "--parts", "sweep", "--protocol", "http", "--repo", str(tmp_path / "none"),
        "--no-build", "--models", null_model.NAME, "--frontends", "0,2", "--concurrency", "4",
        "--sweep-seconds", "0.8", "--rounds", "2", "--work", str(tmp_path / "work"),
        "--results", str(tmp_path / "results"), "--doc", str(doc),
    ])  # fmt: skip
    assert code == 0
    (path,) = (tmp_path / "results").glob("frontend-*.json")
    sweep = json.loads(path.read_text())["sweep"]
    assert sweep["plan"]["protocol"] == "http" and sweep["plan"]["client"] == "perf_analyzer"
    assert set(sweep["processes"]) == {"0", "2"}  # no floor
    for row in sweep["rows"]:
        assert row["ok"] > 0 and not row["errors"], row
        # perf_analyzer's calls reached the HTTP port: the server counted them, OK
        assert row["server_requests"] >= row["ok"] and row["server_failed"] == 0, row
    (split_,) = (r for r in sweep["rows"] if r["frontends"] == 2)
    assert set(split_["cpu_us_per_request"]) == {"engine", "frontends", "whole"}
    text = doc.read_text()
    assert f"\n{grpc_block}\n" in text and "\nold\n" not in text
    assert "over v2 HTTP/REST with binary tensor data" in text and "floor |" not in text
