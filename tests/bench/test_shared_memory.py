"""perf_analyzer with ``--shared-memory system`` against real servers, and ``python -m bench
shared_memory`` (`bench.shared_memory`) tiny, end to end. Nothing here is timed or compared:
the figures belong to the bench."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc

from bench import frontend, null_model, perf_analyzer
from bench import shared_memory as bench_shm
from bench.__main__ import main
from tests.fixtures.servers import InProcessServer
from tests.reliability.repos import derive

SYSTEM = ("--shared-memory", "system")


@pytest.fixture
def needs_perf_analyzer() -> None:
    if (reason := perf_analyzer.unavailable()) is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cifar_only(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cifar-only")
    derive(repo, model_repo / "cifar")
    return repo


def _address(server: InProcessServer, protocol: str) -> str:
    assert server.http_url is not None
    return server.address if protocol == "grpc" else server.http_url.removeprefix("http://")


def _regions(server: InProcessServer) -> dict[str, object]:
    with server.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.SystemSharedMemoryStatusRequest()
        return dict(stub.SystemSharedMemoryStatus(request, timeout=30).regions)


IMAGE = np.random.default_rng(0).standard_normal(3 * 32 * 32, np.float32)
CIFAR_INPUT = {"images": IMAGE.tobytes()}  # one cifar image, float32 [3, 32, 32]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_sends_its_tensors_through_system_shared_memory(
    needs_perf_analyzer: None,
    inprocess_factory: Callable[..., InProcessServer],
    cifar_only: Path,
    protocol: str,
    tmp_path: Path,
) -> None:
    server = inprocess_factory(cifar_only)
    result = perf_analyzer.measure(
        _address(server, protocol), "cifar", 2, 0.6, tmp_path, CIFAR_INPUT, protocol, SYSTEM
    )
    assert not result.errors and result.ok > 0, result.errors
    assert _regions(server) == {}  # it unregistered what it registered
    # the same server with the extension off: perf_analyzer cannot register, and says why
    off = inprocess_factory(cifar_only, "--shared-memory-regions", "0")
    refused = perf_analyzer.measure(
        _address(off, protocol), "cifar", 1, 0.6, tmp_path, CIFAR_INPUT, protocol, SYSTEM
    )
    assert refused.ok == 0
    ((message, count),) = refused.errors.items()
    assert count == 1 and "system shared memory is turned off on this server" in message
    with off.channel() as channel:  # and the server does not list the extension
        metadata = v2_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
            pb.ServerMetadataRequest(), timeout=30
        )
    assert "system_shared_memory" not in metadata.extensions
    assert {"classification", "statistics"} <= set(metadata.extensions)


def test_the_bench_runs_end_to_end_and_writes_its_block_only(
    needs_perf_analyzer: None, tmp_path: Path
) -> None:
    doc = tmp_path / "benchmarks.md"
    other = f"{frontend.BEGIN}\nthe cost, kept\n{frontend.END}"
    doc.write_text(f"# Benchmarks\n\n{other}\n\n{bench_shm.BEGIN}\nold\n{bench_shm.END}\n\nafter\n")
    code = main([
        "shared_memory", "--models", null_model.NAME, "--repo", str(tmp_path / "none"),
        "--no-build", "--concurrency", "1,4", "--seconds", "0.8", "--rounds", "2",
        "--warmup", "0.2", "--work", str(tmp_path / "work"),
        "--results", str(tmp_path / "results"), "--doc", str(doc),
    ])  # fmt: skip
    assert code == 0
    (path,) = (tmp_path / "results").glob("shared-memory-*.json")
    results = json.loads(path.read_text())
    cells = {(r["model"], r["transport"], r["concurrency"]): r for r in results["rows"]}
    assert set(cells) == {(null_model.NAME, t, c) for t in ("wire", "system") for c in (1, 4)}
    for row in cells.values():
        assert row["ok"] > 0 and not row["errors"], row
        assert row["server_requests"] >= row["ok"] and row["server_failed"] == 0, row
        assert row["cpu_us_per_request"] > 0 and row["batch_mean"] >= 1, row
    assert results["regions_left"] == 0
    text = doc.read_text()
    assert text.startswith(f"# Benchmarks\n\n{other}\n\n") and text.endswith("\n\nafter\n")
    assert "\nold\n" not in text and path.name in text
    assert "| null | 4 | system |" in text and "- null, system against wire: c=1:" in text


def test_the_report_states_system_against_wire() -> None:
    def row(transport: str, c: int, rate: float, p50: float, cpu: float) -> dict[str, object]:
        return {"model": "null", "transport": transport, "concurrency": c, "req_per_s": rate,
                "p50_ms": p50, "p99_ms": 2 * p50, "batch_mean": 1.0, "cpu_us_per_request": cpu,
                "server_cores": 1.0, "errors": {}}  # fmt: skip

    rows = [
        row("wire", 1, 1000.0, 1.0, 800.0), row("system", 1, 1100.0, 0.9, 600.0),
        row("wire", 64, 2000.0, 30.0, 500.0), row("system", 64, 1800.0, 33.0, 550.0),
    ]  # fmt: skip
    results = {
        "rows": rows,
        "plan": bench_shm.SharedMemoryPlan().as_dict(),
        "meta": {"machine": {"cpu": "cpu", "cores": 2, "commit": "abc"}, "started": "then",
                 "seconds": 1.0, "load_average_before": [0.5], "load_average_after": [0.6],
                 "command": "python -m bench shared_memory"},
    }  # fmt: skip
    text = bench_shm.markdown(results, Path("shared-memory-x.json"))
    assert text.startswith("`python -m bench shared_memory` on cpu (2 cores), then, 1 s, load ")
    assert "| null | 1 | system | 1100 | 1.10 | 0.90 | 1.80 | 1.0 | 600 | 0.75 | 1.0 |" in text
    assert "| null | 64 | wire | 2000 | 1.00 | 30.00 | 60.00 | 1.0 | 500 | 1.00 | 1.0 |" in text
    assert (
        "- null, system against wire: c=1: req/s × 1.10, p50 -0.10 ms, CPU/req × 0.75; "
        "c=64: req/s × 0.90, p50 +3.00 ms, CPU/req × 1.10." in text
    )


def test_a_slice_at_high_concurrency_lasts_long_enough_for_its_windows() -> None:
    plan = bench_shm.SharedMemoryPlan(seconds=6.0, rounds=2)
    assert bench_shm.slice_seconds(plan, 1, 5.0) == 3.0  # concurrency 1: the plan's share
    assert bench_shm.slice_seconds(plan, 64, 6.0) == 32.0  # ResNet-50 on 2 cores: 3 · 64 / 6
    assert bench_shm.slice_seconds(plan, 64, 1000.0) == 3.0  # a fast model: the share
    assert bench_shm.slice_seconds(plan, 64, None) == 3.0  # nothing measured at 1
