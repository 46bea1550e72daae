"""A v2 request and a Classify request for the same model version run as one batch.

The model waits up to 10 s for a batch of two images, so the two requests
(sent at once from two threads) can only be answered by one shared batch.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2, classifier_pb2_grpc

from server.model_config import Batching, ModelConfig
from tests.fixtures.servers import InProcessServer
from tests.shared_data import PHOTOS

JPEG = PHOTOS / "chelsea.jpg"


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and 'model="cifar"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not found for cifar")


def test_v2_and_classify_share_a_batch(
    inprocess_factory: Callable[..., InProcessServer], model_repo: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "repo" / "cifar"
    shutil.copytree(model_repo / "cifar", model_dir)
    config = ModelConfig.load(model_dir)
    waiting = Batching(max_batch_size=2, max_queue_delay_us=10_000_000)
    config.model_copy(update={"batching": waiting}).dump(model_dir)
    server = inprocess_factory(model_dir.parent)

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
