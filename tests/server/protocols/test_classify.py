"""resnet_serve.v1.Classifier end to end, on one real server shared by the module (and one
of its own for the test of calls that end in the queue)."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from tests.fixtures.messages import (
    CHELSEA,
    encoded,
    float_tensor,
    random_chw,
    sample,
    uint8_tensor,
)
from tests.fixtures.servers import InProcessServer
from tests.reliability.load import until_gauges
from tests.reliability.repos import derive

CODE = grpc.StatusCode

FAMILIES = [
    "resnet_serve_request_duration_seconds",
    "resnet_serve_queue_duration_seconds",
    "resnet_serve_preprocess_duration_seconds",
    "resnet_serve_inference_duration_seconds",
    "resnet_serve_batch_size",
    "resnet_serve_requests_total",
    "resnet_serve_images_total",
    "resnet_serve_queue_depth",
    "resnet_serve_inflight_requests",
    "resnet_serve_model_load_seconds",
    "resnet_serve_build_info",
]


@pytest.fixture(scope="module")
def channel(model_server: InProcessServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(model_server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(channel)


def computed_images(server: InProcessServer, model: str = "resnet18") -> float:
    return sample(server.metrics(), "resnet_serve_batch_size_sum", model=model, version="1")


def test_classify_a_photo(stub: pb_grpc.ClassifierStub) -> None:
    response = stub.Classify(
        pb.ClassifyRequest(model="resnet18", images=[encoded(CHELSEA)] * 2, request_id="r-1"),
        timeout=60,
    )
    assert (response.model, response.version, response.request_id) == ("resnet18", "1", "r-1")
    assert len(response.results) == 2
    for result in response.results:
        assert len(result.classes) == 5
        scores = [c.score for c in result.classes]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        assert all(c.label for c in result.classes)
    assert response.results[0] == response.results[1]


def test_top_k_and_a_small_model(stub: pb_grpc.ClassifierStub) -> None:
    response = stub.Classify(
        pb.ClassifyRequest(model="cifar", images=[encoded(CHELSEA)], top_k=10), timeout=60
    )
    classes = response.results[0].classes
    assert len(classes) == 10
    assert sorted(c.index for c in classes) == list(range(10))
    assert sum(c.score for c in classes) == pytest.approx(1.0, abs=1e-5)
    assert response.request_id  # made up by the server when not given


def test_jpeg_and_uint8_tensor_give_the_same_top5(stub: pb_grpc.ClassifierStub) -> None:
    with Image.open(io.BytesIO(CHELSEA)) as image:
        pixels = np.asarray(image.convert("RGB"))
    tops = {}
    for model in ("resnet18", "resnet18_u8"):
        for kind, image in (("jpeg", encoded(CHELSEA)), ("tensor", uint8_tensor(pixels))):
            response = stub.Classify(pb.ClassifyRequest(model=model, images=[image]), timeout=60)
            tops[model, kind] = [c.index for c in response.results[0].classes]
    assert tops["resnet18", "jpeg"] == tops["resnet18", "tensor"]
    assert tops["resnet18_u8", "jpeg"] == tops["resnet18_u8", "tensor"]
    assert tops["resnet18", "jpeg"] == tops["resnet18_u8", "jpeg"]  # same weights


def test_list_and_get_models(stub: pb_grpc.ClassifierStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert set(models) == {"resnet18", "resnet18_u8", "cifar"}
    u8 = models["resnet18_u8"]
    assert (u8.input.dtype, u8.input.layout, list(u8.input.shape)) == (
        "uint8", "NHWC", [-1, 224, 224, 3],
    )  # fmt: skip
    assert [(v.version, v.state) for v in u8.versions] == [("1", pb.VersionInfo.READY)]
    info = stub.GetModel(pb.GetModelRequest(name="cifar"), timeout=10)
    assert (info.arch, info.num_classes, info.max_batch_size) == ("resnet20", 10, 32)
    assert [v.weights for v in info.versions] == ["random (seed 0)"]  # an untrained model
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModel(pb.GetModelRequest(name="cifar", version="7"), timeout=10)
    assert error.value.code() is CODE.NOT_FOUND


def test_health_per_model_and_reflection(
    model_server: InProcessServer, channel: grpc.Channel
) -> None:
    assert model_server.health("") == health_pb2.HealthCheckResponse.SERVING
    assert model_server.health("resnet18_u8") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        model_server.health("nope")
    assert error.value.code() is CODE.NOT_FOUND
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"resnet_serve.v1.Classifier", "grpc.health.v1.Health"} <= set(services)


# Bad inputs, and the server's health after each: tests/reliability/catalogue.py.


def test_stream_answers_in_order_with_errors_in_band(stub: pb_grpc.ClassifierStub) -> None:
    requests = [
        pb.ClassifyRequest(model="cifar", images=[encoded(CHELSEA)], request_id="s-0"),
        pb.ClassifyRequest(model="cifar", images=[encoded(b"bad")], request_id="s-1"),
        pb.ClassifyRequest(model="nope", images=[encoded(CHELSEA)], request_id="s-2"),
        *(pb.ClassifyRequest(model="cifar", images=[encoded(CHELSEA)], request_id=f"s-{i}")
          for i in range(3, 8)),
    ]  # fmt: skip
    responses = list(stub.ClassifyStream(iter(requests), timeout=60))
    assert [r.sequence for r in responses] == list(range(8))
    assert responses[1].error.code == CODE.INVALID_ARGUMENT.value[0]
    assert "image 0" in responses[1].error.message
    assert responses[2].error.code == CODE.NOT_FOUND.value[0]
    assert [r.response.request_id for r in responses if r.HasField("response")] == [
        "s-0", *(f"s-{i}" for i in range(3, 8)),
    ]  # fmt: skip


async def test_concurrent_requests_are_batched(model_server: InProcessServer) -> None:
    before = model_server.metrics()
    async with grpc.aio.insecure_channel(model_server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        requests = [
            pb.ClassifyRequest(model="resnet18", images=[float_tensor(random_chw(i))])
            for i in range(16)
        ]
        calls = [stub.Classify(request, timeout=120) for request in requests]
        responses = await asyncio.gather(*calls)
    assert all(len(r.results) == 1 for r in responses)
    after = model_server.metrics()
    labels = {"model": "resnet18", "version": "1"}
    images = sample(after, "resnet_serve_batch_size_sum", **labels) - sample(
        before, "resnet_serve_batch_size_sum", **labels
    )
    batches = sample(after, "resnet_serve_batch_size_count", **labels) - sample(
        before, "resnet_serve_batch_size_count", **labels
    )
    assert images == 16
    assert batches < 16, "16 concurrent requests should share session runs"
    singles = sample(after, "resnet_serve_batch_size_bucket", le="1.0", **labels) - sample(
        before, "resnet_serve_batch_size_bucket", le="1.0", **labels
    )
    assert singles < batches, "the batch-size histogram shows batches larger than 1"


# a batch window no call outlasts: a call queued alone waits there until it ends
HELD_DELAY_US = 600_000_000
HELD_BATCH = 8
EXPIRES_AFTER = 3.0  # long enough for any busy host to queue the call first


async def test_expired_and_cancelled_requests_are_not_computed(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    """A call whose deadline passes in the queue and one whose caller cancels it there are
    counted by those codes, and dropped before compute: the full batch queued behind them
    runs alone. resnet18 waits `HELD_DELAY_US` for a batch here, so each call is
    certainly queued when it ends, however quick or busy the host."""
    repo = tmp_path / "models"
    repo.mkdir()
    derive(repo, model_repo / "resnet18", max_batch_size=HELD_BATCH,
           max_queue_delay_us=HELD_DELAY_US)  # fmt: skip
    server = inprocess_factory(repo)
    one = pb.ClassifyRequest(model="resnet18", images=[float_tensor(random_chw(99))])
    full = pb.ClassifyRequest(
        model="resnet18", images=[float_tensor(random_chw(i)) for i in range(HELD_BATCH)]
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        expiring = stub.Classify(one, timeout=EXPIRES_AFTER)
        await until_gauges(server, "resnet18", depth=1)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await expiring
        assert error.value.code() is CODE.DEADLINE_EXCEEDED
        await _until_counted(server, "DEADLINE_EXCEEDED")

        cancelled = stub.Classify(one, timeout=300)
        await until_gauges(server, "resnet18", inflight=1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await _until_counted(server, "CANCELLED")

        assert len((await stub.Classify(full, timeout=300)).results) == HELD_BATCH
    assert computed_images(server) == HELD_BATCH  # the two ahead of it were never run
    text = server.metrics()
    counts = {code: sample(text, "resnet_serve_requests_total", model="resnet18", version="1",
                           code=code) for code in ("DEADLINE_EXCEEDED", "CANCELLED", "OK")}
    assert counts == {"DEADLINE_EXCEEDED": 1, "CANCELLED": 1, "OK": 1}


async def _until_counted(server: InProcessServer, code: str) -> None:
    """Until resnet18 has counted one call ended with `code`."""
    for _ in range(600):
        text = await asyncio.to_thread(server.metrics)
        if sample(text, "resnet_serve_requests_total", model="resnet18", version="1",
                  code=code) >= 1:  # fmt: skip
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"resnet18 never counted a call ended {code}")


def test_metrics_has_every_family(
    model_server: InProcessServer, stub: pb_grpc.ClassifierStub
) -> None:
    bad = pb.ClassifyRequest(model="resnet18", images=[encoded(CHELSEA)], top_k=0)
    with pytest.raises(grpc.RpcError):
        stub.Classify(bad, timeout=60)
    text = model_server.metrics()
    for family in FAMILIES:
        kind = "counter" if family.endswith("_total") else "(histogram|gauge)"
        assert re.search(rf"^# TYPE {family} {kind}$", text, re.M), family
    assert sample(text, "resnet_serve_requests_total", model="resnet18", version="1",
                  code="OK") >= 1  # fmt: skip
    assert sample(text, "resnet_serve_requests_total", model="resnet18", version="1",
                  code="INVALID_ARGUMENT") >= 1  # fmt: skip
    for bound in ("0.001", "10.0"):
        assert re.search(rf'^resnet_serve_request_duration_seconds_bucket{{.*le="{bound}"', text,
                         re.M)  # fmt: skip


def test_request_id_is_carried_into_the_log(
    model_server: InProcessServer, stub: pb_grpc.ClassifierStub
) -> None:
    bad = pb.ClassifyRequest(model="cifar", images=[encoded(b"?")], request_id="trace-7f3a")
    with pytest.raises(grpc.RpcError):
        stub.Classify(bad, timeout=60)
    lines = [line for line in model_server.log().splitlines() if "[trace-7f3a]" in line]
    assert len(lines) == 1 and "INVALID_ARGUMENT: image 0:" in lines[0]
