"""The load generator's loops and reports, driven by a local coroutine (no network)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import grpc
import grpc.aio
import pytest
from resnet_serve_client import report
from resnet_serve_client.bench import Level, LevelResult, Stop, run_level
from resnet_serve_client.payloads import classify_requests, make_inputs, v2_requests


class Target:
    """Answers after a yield; every third request fails with RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        self.in_flight = self.most_in_flight = self.calls = 0

    async def __call__(self, number: int) -> None:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if number % 3 == 2:
                raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                           grpc.aio.Metadata(), grpc.aio.Metadata(), "full")
        finally:
            self.in_flight -= 1


async def test_closed_loop_runs_the_requests_asked_for_at_the_concurrency_asked_for() -> None:
    target = Target()
    result = await run_level(target, Level(4), Stop(requests=30), warmup=0, images_per_request=2)
    assert (result.requests, result.ok, dict(result.errors)) == (30, 20, {"RESOURCE_EXHAUSTED": 10})
    assert target.most_in_flight == 4
    assert len(result.latencies) == 20
    assert result.images_per_second == pytest.approx(2 * result.throughput)
    assert result.cpu_seconds >= 0


async def test_open_loop_keeps_its_schedule_and_its_cap() -> None:
    target = Target()
    result = await run_level(target, Level(2, rate=2000), Stop(requests=12), warmup=0,
                             images_per_request=1)
    assert result.requests == 12
    assert target.most_in_flight <= 2


async def test_warmup_is_not_recorded() -> None:
    target = Target()
    result = await run_level(target, Level(1), Stop(requests=5), warmup=0.05,
                             images_per_request=1)
    assert result.requests == 5
    assert target.calls > 5


def _results() -> list[LevelResult]:
    first = LevelResult(1, None, 1, seconds=2.0, ok=4, latencies=[0.01, 0.02, 0.03, 0.04],
                        cpu_seconds=0.5)
    second = LevelResult(8, None, 1, seconds=2.0, ok=3, latencies=[0.05, 0.06, 0.07])
    second.errors["UNAVAILABLE"] = 2
    return [first, second]


def test_reports() -> None:
    config = {"api": "classify", "model": "resnet18"}
    data = json.loads(report.as_json(config, _results()))
    assert data["config"] == config
    assert data["levels"][0]["req_per_s"] == 2.0
    assert data["levels"][0]["client_cpu_pct"] == 25.0
    assert data["levels"][1]["errors"] == {"UNAVAILABLE": 2}
    rows = list(csv.DictReader(io.StringIO(report.as_csv(_results()))))
    assert [r["concurrency"] for r in rows] == ["1", "8"]
    assert rows[1]["errors"] == "UNAVAILABLE=2"
    assert float(rows[0]["p50_ms"]) == pytest.approx(25.0)
    table = report.as_table(config, _results())
    assert "errors at concurrency 8: UNAVAILABLE 2" in table
    assert "api=classify model=resnet18" in table


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from resnet_serve_client.plot import plot

    path = tmp_path / "chart.png"
    plot(_results(), path, "test")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_payloads_for_both_apis() -> None:
    jpeg = make_inputs("jpeg", 64, [])
    requests = classify_requests(jpeg, model="m", batch=3, top_k=2)
    assert len(requests[0].images) == 3 and requests[0].images[0].encoded.startswith(b"\xff\xd8")
    [request, *_] = v2_requests(jpeg, model="m", input_name="images", output_name="logits",
                                batch=2, top_k=3)
    assert (request.inputs[0].datatype, list(request.inputs[0].shape)) == ("BYTES", [2])
    assert request.outputs[0].parameters["classification"].int64_param == 3
    floats = make_inputs("float", 32, [])
    [request, *_] = v2_requests(floats, model="m", input_name="images", output_name="logits",
                                batch=2, top_k=1)
    assert (request.inputs[0].datatype, list(request.inputs[0].shape)) == ("FP32", [2, 3, 32, 32])
    assert len(request.raw_input_contents[0]) == 2 * 3 * 32 * 32 * 4
    with pytest.raises(ValueError, match="--files"):
        make_inputs("files", 0, [])
