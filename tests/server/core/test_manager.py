"""Servers with their own repositories: refused versions, a full queue, message limits, drain,
and the lifecycle handle of `server.app.start`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from bench import serving
from server import app
from server.repository import VERIFICATION_FILE, ModelConfig
from tests.fixtures.messages import CHELSEA, encoded, float_tensor, random_chw, sample
from tests.fixtures.servers import settings

SERVING = health_pb2.HealthCheckResponse.SERVING


def add_model(repo: Path, source: Path, name: str, **batching: Any) -> Path:
    """`source` (a model directory) as `name` in `repo`, with batching fields overridden."""
    target = repo / name
    shutil.copytree(source, target, copy_function=os.link)
    config = ModelConfig.load(source)
    update = {"name": name, "batching": config.batching.model_copy(update=batching)}
    (target / "config.json").unlink()  # a hard link to the source's file
    config.model_copy(update=update).dump(target)
    return target


def rewrite_verification(version_dir: Path, **fields: Any) -> None:
    path = version_dir / VERIFICATION_FILE
    report = json.loads(path.read_text())
    path.unlink()
    path.write_text(json.dumps({**report, **fields}))


async def _poll(server: serving.Server, name: str, at_least: float, **labels: str) -> None:
    for _ in range(1200):
        text = await asyncio.to_thread(server.metrics)
        if sample(text, name, **labels) >= at_least:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {at_least}")


def test_refused_versions_full_queue_no_reflection_and_sigint(
    model_repo: Path, tmp_path: Path, server_factory: Callable[..., serving.Server]
) -> None:
    repo = tmp_path / "repo"
    add_model(repo, model_repo / "resnet18", "small_queue", max_batch_size=2, max_queue_size=4)
    rewrite_verification(add_model(repo, model_repo / "cifar", "tampered") / "1", sha256="0" * 64)
    rewrite_verification(add_model(repo, model_repo / "cifar", "failed") / "1", passed=False)
    (add_model(repo, model_repo / "cifar", "unverified") / "1" / VERIFICATION_FILE).unlink()
    server = server_factory(repo, "--max-message-bytes", "4000000", "--no-reflection")

    log = server.log()
    for name, reason in [
        ("tampered", "model.onnx does not match the sha256 in verification.json"),
        ("failed", "verification.json does not say passed: true"),
        ("unverified", "verification.json is missing"),
    ]:
        assert f"model {name} version 1 refused: {reason}" in log
        assert server.health(name) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.health() == SERVING

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        tampered = models["tampered"].versions[0]
        assert tampered.state == pb.VersionInfo.UNAVAILABLE and "sha256" in tampered.reason
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(pb.ClassifyRequest(model="failed", images=[encoded(CHELSEA)]), timeout=10)
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "no READY version" in error.value.details()

        too_big = pb.ClassifyRequest(model="small_queue", images=[float_tensor(random_chw(0))] * 7)
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(too_big, timeout=30)
        assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    async def flood() -> list[Any]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            requests = [
                pb.ClassifyRequest(model="small_queue", images=[float_tensor(random_chw(i))] * 2)
                for i in range(12)
            ]
            calls = [stub.Classify(request, timeout=120) for request in requests]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(flood())
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert refused, "12 requests of 2 images into a queue of 4 must overflow it"
    assert all(o.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
    assert "of 4 images queued; retry later" in refused[0].details()
    assert any(isinstance(o, pb.ClassifyResponse) for o in outcomes)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        ok = stub.Classify(pb.ClassifyRequest(model="small_queue", images=[encoded(CHELSEA)]),
                           timeout=60)  # fmt: skip
        assert ok.version == "1"
        with pytest.raises(grpc.RpcError) as error:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert error.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert server.stop(signal.SIGINT) == 0


async def test_drain_answers_everything_in_flight_then_exits_0(
    model_repo: Path, tmp_path: Path, server_factory: Callable[..., serving.Server]
) -> None:
    repo = tmp_path / "repo"
    add_model(repo, model_repo / "resnet18", "resnet18", max_batch_size=4)
    server = server_factory(repo, "--log-format", "json")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        requests = [
            pb.ClassifyRequest(model="resnet18", images=[encoded(CHELSEA)] * 8, request_id=f"d{i}")
            for i in range(6)
        ]
        stream = stub.ClassifyStream(timeout=300)
        await stream.write(pb.ClassifyRequest(model="resnet18", images=[encoded(CHELSEA)]))
        assert (await stream.read()).response.version == "1"  # then left open, idle
        calls = [stub.Classify(request, timeout=300) for request in requests]
        http = aiohttp.ClientSession(str(server.http_url), timeout=aiohttp.ClientTimeout(300))
        rest_calls = [asyncio.ensure_future(_http_infer(http, f"h{i}")) for i in range(2)]
        labels = {"model": "resnet18", "version": "1"}
        await _poll(server, "resnet_serve_inflight_requests", 8, **labels)

        server.process.send_signal(signal.SIGTERM)
        for _ in range(600):
            try:
                status = await asyncio.to_thread(server.health)
            except grpc.RpcError:
                break
            if status != SERVING:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("health still SERVING after SIGTERM")

        late = pb.ClassifyRequest(model="resnet18", images=[encoded(CHELSEA)])
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Classify(late, timeout=30)
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.value.details()
        # the idle stream is ended for the client to reopen elsewhere, not held to the grace period
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stream.read()
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE
        # the HTTP port: not ready for balancers, new requests 503 with Retry-After
        async with http.get("/v2/health/ready") as ready:
            assert ready.status == 503
        late_rest = await _http_infer(http, "late")
        assert late_rest[0] == 503 and "shutting down" in late_rest[1]["error"]
        assert int(late_rest[2]["Retry-After"]) >= 1

        responses = await asyncio.gather(*calls)
        answered = await asyncio.gather(*rest_calls)
        await http.close()
    assert [(status, body["id"]) for status, body, _ in answered] == [(200, "h0"), (200, "h1")]
    assert all(body["outputs"][0]["shape"] == [8, 1000] for _, body, _ in answered)
    assert [r.request_id for r in responses] == [f"d{i}" for i in range(6)]
    assert all(len(r.results) == 8 for r in responses)
    assert await asyncio.to_thread(server.process.wait, 60) == 0
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    messages = [e["message"] for e in events]
    assert any(m.startswith("SIGTERM received: draining") for m in messages)
    assert "every accepted call answered; closing the port" in messages
    assert messages[-1] == "exiting"


async def _http_infer(
    session: aiohttp.ClientSession, request_id: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A v2 infer of 8 JPEGs over HTTP, outputs as JSON: (status, body, headers)."""
    tensor = httpclient.InferInput("images", [8], "BYTES")
    tensor.set_data_from_numpy(np.array([CHELSEA] * 8, dtype=np.object_))
    output = httpclient.InferRequestedOutput("logits", binary_data=False)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], [output], request_id=request_id
    )
    headers = {"Inference-Header-Content-Length": str(json_size)}
    async with session.post("/v2/models/resnet18/infer", data=body, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_start_serves_on_free_ports_and_stops_once(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_model(repo, model_repo / "cifar", "cifar")
    running = await app.start(settings(repo))
    try:
        assert running.port > 0 and running.metrics_port > 0
        assert running.address == f"127.0.0.1:{running.port}"
        assert await running.wait_loaded() and running.ready()
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            request = pb.ClassifyRequest(model="cifar", images=[encoded(CHELSEA)])
            assert (await stub.Classify(request, timeout=60)).version == "1"
        url = f"http://{running.metrics_address}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        assert b'resnet_serve_requests_total{code="OK",model="cifar",version="1"} 1.0' in text
        # the metrics port is no health check: anything but /metrics is 404
        for path in ("/", "/healthz", "/v2/health/ready", "/metrics/x"):
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(f"http://{running.metrics_address}{path}", timeout=10)
            assert missing.value.code == 404, path
        # the HTTP port's health is, for load balancers
        ready = f"http://127.0.0.1:{running.http_port}/v2/health/ready"
        answer = await asyncio.to_thread(urllib.request.urlopen, ready, timeout=10)
        assert answer.status == 200
        answer.close()
    finally:
        # drain and stop, each however often and from wherever, run once
        await asyncio.gather(running.drain(), running.stop(), running.drain())
        await running.stop()
    assert running.http_port is not None
    for port in (running.port, running.metrics_port, running.http_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
