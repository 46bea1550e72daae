"""Both APIs meet in one model queue: their requests share batches and are counted alike.

The model waits up to 10 s for a batch of two images, so two requests (sent at
once from two threads) can only be answered by one shared batch, and one
request alone waits there past a short deadline.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2, classifier_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from server.repository import Batching, ModelConfig
from tests.fixtures.messages import sample
from tests.fixtures.servers import InProcessServer
from tests.reliability.wire import classify, infer_images
from tests.shared_data import PHOTOS

JPEG = PHOTOS / "chelsea.jpg"


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and 'model="cifar"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not found for cifar")


def _waiting_server(
    inprocess_factory: Callable[..., InProcessServer], model_repo: Path, tmp_path: Path
) -> InProcessServer:
    """cifar, whose batches of two wait up to 10 s for their second image."""
    model_dir = tmp_path / "repo" / "cifar"
    shutil.copytree(model_repo / "cifar", model_dir)
    config = ModelConfig.load(model_dir)
    waiting = Batching(max_batch_size=2, max_queue_delay_us=10_000_000)
    config.model_copy(update={"batching": waiting}).dump(model_dir)
    return inprocess_factory(model_dir.parent)


def test_v2_and_classify_share_a_batch(
    inprocess_factory: Callable[..., InProcessServer], model_repo: Path, tmp_path: Path
) -> None:
    server = _waiting_server(inprocess_factory, model_repo, tmp_path)

    def v2() -> np.ndarray:
        with grpcclient.InferenceServerClient(server.address) as client:
            tensor = grpcclient.InferInput("images", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([JPEG.read_bytes()], dtype=np.object_))
            return client.infer("cifar", [tensor], client_timeout=120).as_numpy("logits")

    def classify() -> classifier_pb2.ClassifyResponse:
        with grpc.insecure_channel(server.address) as channel:
            request = classifier_pb2.ClassifyRequest(
                model="cifar", images=[classifier_pb2.Image(encoded=JPEG.read_bytes())]
            )
            return classifier_pb2_grpc.ClassifierStub(channel).Classify(request, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        logits, answer = (f.result() for f in [pool.submit(v2), pool.submit(classify)])

    metrics = server.metrics()
    assert _sample(metrics, "resnet_serve_batch_size_count") == 1
    assert _sample(metrics, "resnet_serve_batch_size_sum") == 2
    assert answer.results[0].classes[0].index == int(np.argmax(logits[0]))


def _model_infer(channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    stub.ModelInfer(infer_images("cifar", JPEG.read_bytes()), timeout=0.5)


def _model_stream_infer(channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    for _ in stub.ModelStreamInfer(iter([infer_images("cifar", JPEG.read_bytes())]), timeout=0.5):
        pass


def _classify(channel: grpc.Channel) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    stub.Classify(classify("cifar", JPEG.read_bytes()), timeout=0.5)


@pytest.mark.parametrize("send", [_model_infer, _model_stream_infer, _classify],
                         ids=["ModelInfer", "ModelStreamInfer", "Classify"])  # fmt: skip
def test_a_call_that_dies_at_its_deadline_is_counted_deadline_exceeded(
    send: Callable[[grpc.Channel], None],
    inprocess_factory: Callable[..., InProcessServer],
    model_repo: Path,
    tmp_path: Path,
) -> None:
    server = _waiting_server(inprocess_factory, model_repo, tmp_path)
    with server.channel() as channel, pytest.raises(grpc.RpcError) as error:
        send(channel)
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    def counted(code: str) -> float:
        return sample(server.metrics(), "resnet_serve_requests_total", model="cifar",
                      version="1", code=code)  # fmt: skip

    for _ in range(100):  # the server counts the call once its handler is cancelled
        if counted("DEADLINE_EXCEEDED") + counted("CANCELLED") > 0:
            break
        time.sleep(0.1)
    assert (counted("DEADLINE_EXCEEDED"), counted("CANCELLED")) == (1, 0)
