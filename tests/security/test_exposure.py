"""What the server shows the outside: internal errors say nothing, /metrics binds its own address.

``broken`` is a verified-looking model whose graph answers one row whatever
the batch, so a request of two images fails inside the batcher with an
internal error (rows vs batch). Over every path (Classify, ClassifyStream,
v2 ModelInfer) the caller gets INTERNAL with the generic message, nothing of
the exception, a path or a traceback, while the log keeps the traceback; the
other model still serves. The metrics port is bound to 127.0.0.2 only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from bench import serving
from server.errors import INTERNAL_MESSAGE
from server.repository import CONFIG_FILE, MODEL_FILE, VERIFICATION_FILE, ModelConfig
from tests.reliability import images
from tests.reliability.wire import call, classify, infer_floats

METRICS_HOST = "127.0.0.2"


def one_row_graph(path: Path) -> None:
    """images [N, 3, 32, 32] -> logits [1, 10]: the first image only, whatever N."""
    nodes = [
        helper.make_node("Slice", ["images", "zero", "one", "zero"], ["first"]),
        helper.make_node("GlobalAveragePool", ["first"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
    ]
    initializers = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("weights", TensorProto.FLOAT, [3, 10], np.linspace(-1, 1, 30)),
    ]
    graph = helper.make_graph(
        nodes, "one_row",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def add_broken_model(repo: Path, cifar: Path) -> None:
    version = repo / "broken" / "1"
    version.mkdir(parents=True)
    config = ModelConfig.load(cifar)
    config.model_copy(update={"name": "broken"}).dump(repo / "broken")
    shutil.copy(cifar / config.labels, repo / "broken" / config.labels)
    one_row_graph(version / MODEL_FILE)
    digest = hashlib.sha256((version / MODEL_FILE).read_bytes()).hexdigest()
    (version / VERIFICATION_FILE).write_text(json.dumps({"passed": True, "sha256": digest}))
    assert (repo / "broken" / CONFIG_FILE).is_file()


@pytest.fixture(scope="module")
def server(
    cifar_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[serving.Server]:
    repo = tmp_path_factory.mktemp("exposure-repo")
    shutil.copytree(cifar_repo / "cifar", repo / "cifar")
    add_broken_model(repo, cifar_repo / "cifar")
    running = serving.start(repo, tmp_path_factory.mktemp("exposure-logs") / "server.log",
                            ["--metrics-host", METRICS_HOST])  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


def test_internal_errors_say_nothing_of_the_inside(server: serving.Server) -> None:
    photo = images.jpeg(images.photo())
    requests = [
        classify("broken", photo, photo),
        infer_floats("broken", np.zeros((2, 3, 32, 32), np.float32)),
    ]
    with server.channel() as channel:
        for request in requests:
            code, details, _ = call(channel, request)
            assert (code, details) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        stream = pb_grpc.ClassifierStub(channel).ClassifyStream(
            iter([classify("broken", photo, photo)]), timeout=60
        )
        (answer,) = list(stream)
        assert answer.error.code == grpc.StatusCode.INTERNAL.value[0]
        assert answer.error.message == INTERNAL_MESSAGE
        assert call(channel, classify("cifar", photo))[0] is grpc.StatusCode.OK
    log = server.log()
    assert "session returned 1 rows for a batch of 2" in log
    assert "Traceback (most recent call last)" in log


def test_metrics_port_binds_its_own_address(server: serving.Server) -> None:
    port = server.metrics_url.rsplit(":", 1)[1].split("/")[0]
    with urllib.request.urlopen(f"http://{METRICS_HOST}:{port}/metrics", timeout=10) as response:
        assert b"resnet_serve_build_info" in response.read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    grpc_port = server.address.rsplit(":", 1)[1]
    with grpc.insecure_channel(f"{METRICS_HOST}:{grpc_port}") as channel:
        code, _, _ = call(channel, classify("cifar", images.one_pixel()))
    assert code is grpc.StatusCode.UNAVAILABLE  # gRPC listens on 127.0.0.1 only
