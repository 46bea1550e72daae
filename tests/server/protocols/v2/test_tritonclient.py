"""The real tritonclient[grpc] against a server subprocess: the v2 protocol end to end.

One server per module (``model_server``) over the builder's repository
(resnet18, resnet18_u8, cifar). ``Classify`` is called through the
resnet_serve.v1 stubs on the same port to check both APIs agree.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2, classifier_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from server.repository import ImageLimits, ModelConfig, prepare_encoded
from tests.fixtures.servers import InProcessServer
from tests.shared_data import PHOTOS

JPEGS = [PHOTOS / "chelsea.jpg", PHOTOS / "coffee.jpg"]


@pytest.fixture(scope="module")
def client(model_server: InProcessServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(model_server.address) as triton:
        yield triton


@pytest.fixture(scope="module")
def v2_stub(model_server: InProcessServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(model_server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def classifier(model_server: InProcessServer) -> Iterator[classifier_pb2_grpc.ClassifierStub]:
    with grpc.insecure_channel(model_server.address) as channel:
        yield classifier_pb2_grpc.ClassifierStub(channel)


def labels_of(model_repo: Path, model: str) -> list[str]:
    return (model_repo / model / "labels.txt").read_text().splitlines()


def tensor_input(array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("images", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def jpeg_input(paths: list[Path]) -> grpcclient.InferInput:
    return tensor_input(np.array([p.read_bytes() for p in paths], dtype=np.object_), "BYTES")


def normalized(batch: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def assert_agrees_with_classify(
    logits: np.ndarray, response: classifier_pb2.ClassifyResponse
) -> None:
    probabilities = softmax(logits)
    assert len(response.results) == len(logits)
    for row, result in zip(probabilities, response.results, strict=True):
        indices = [c.index for c in result.classes]
        assert indices == list(np.argsort(-row, kind="stable")[: len(indices)])
        np.testing.assert_allclose([c.score for c in result.classes], row[indices], rtol=1e-4)


# health and metadata


def test_live_and_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("resnet18")
    assert client.is_model_ready("resnet18", "1")
    assert not client.is_model_ready("resnet18", "99")
    assert not client.is_model_ready("no_such_model")


def test_server_metadata_lists_the_extensions_it_implements(
    client: grpcclient.InferenceServerClient,
) -> None:
    metadata = client.get_server_metadata()
    assert metadata.name == "resnet-serve"
    assert set(metadata.extensions) == {
        "classification", "model_configuration", "statistics", "logging",
        "system_shared_memory",
    }  # fmt: skip


def test_model_metadata(client: grpcclient.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("resnet18")
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        "resnet18",
        ["1"],
        "onnxruntime_onnx",
    )
    [images] = metadata.inputs
    assert (images.name, images.datatype, list(images.shape)) == (
        "images",
        "FP32",
        [-1, 3, 224, 224],
    )
    [logits] = metadata.outputs
    assert (logits.name, logits.datatype, list(logits.shape)) == ("logits", "FP32", [-1, 1000])
    u8 = client.get_model_metadata("resnet18_u8", "1", as_json=True)
    assert u8["inputs"] == [
        {"name": "images", "datatype": "UINT8", "shape": ["-1", "224", "224", "3"]}
    ]


def test_model_config(client: grpcclient.InferenceServerClient, model_repo: Path) -> None:
    config = client.get_model_config("resnet18").config
    batching = ModelConfig.load(model_repo / "resnet18").batching
    assert (config.name, config.platform, config.backend) == (
        "resnet18",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == batching.max_batch_size
    [images] = config.input
    assert images.name == "images" and list(images.dims) == [3, 224, 224]
    assert images.data_type == grpcclient.model_config_pb2.TYPE_FP32
    assert images.format == grpcclient.model_config_pb2.ModelInput.FORMAT_NCHW
    [logits] = config.output
    assert (logits.name, list(logits.dims), logits.label_filename) == (
        "logits",
        [1000],
        "labels.txt",
    )
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == batching.max_queue_delay_us
    assert config.dynamic_batching.default_queue_policy.max_queue_size == batching.max_queue_size
    [group] = config.instance_group
    assert (
        group.count >= 1 and group.kind == grpcclient.model_config_pb2.ModelInstanceGroup.KIND_CPU
    )
    u8 = client.get_model_config("resnet18_u8").config.input[0]
    assert u8.format == grpcclient.model_config_pb2.ModelInput.FORMAT_NHWC
    assert list(u8.dims) == [224, 224, 3]
    assert u8.data_type == grpcclient.model_config_pb2.TYPE_UINT8


# inference


def test_fp32_raw_logits_equal_classify(
    client: grpcclient.InferenceServerClient, classifier: classifier_pb2_grpc.ClassifierStub
) -> None:
    batch = normalized(2)
    result = client.infer("resnet18", [tensor_input(batch, "FP32")], request_id="fp32-1")
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (2, 1000)
    assert result.get_response().id == "fp32-1"
    assert result.get_response().model_version == "1"
    request = classifier_pb2.ClassifyRequest(model="resnet18", top_k=5)
    for chw in batch:
        tensor = classifier_pb2.Tensor(
            dtype=classifier_pb2.Tensor.FLOAT32, shape=chw.shape, data=chw.tobytes()
        )
        request.images.add(tensor=tensor)
    assert_agrees_with_classify(logits, classifier.Classify(request, timeout=60))


def test_uint8_nhwc(
    client: grpcclient.InferenceServerClient,
    classifier: classifier_pb2_grpc.ClassifierStub,
    model_repo: Path,
) -> None:
    """The graph's own pixels, made by the server's preprocessing, equal Classify on the JPEG."""
    config = ModelConfig.load(model_repo / "resnet18_u8")
    limits = ImageLimits(max_image_bytes=1 << 24, max_image_pixels=1 << 26)
    pixels = np.stack([prepare_encoded(p.read_bytes(), config, limits) for p in JPEGS])
    assert pixels.dtype == np.uint8 and pixels.shape == (len(JPEGS), 224, 224, 3)
    logits = client.infer("resnet18_u8", [tensor_input(pixels, "UINT8")]).as_numpy("logits")
    request = classifier_pb2.ClassifyRequest(
        model="resnet18_u8", images=[classifier_pb2.Image(encoded=p.read_bytes()) for p in JPEGS]
    )
    assert_agrees_with_classify(logits, classifier.Classify(request, timeout=60))


def test_bytes_jpegs_are_preprocessed_like_classify(
    client: grpcclient.InferenceServerClient, classifier: classifier_pb2_grpc.ClassifierStub
) -> None:
    logits = client.infer("resnet18", [jpeg_input(JPEGS)]).as_numpy("logits")
    assert logits.shape == (len(JPEGS), 1000)
    request = classifier_pb2.ClassifyRequest(
        model="resnet18", images=[classifier_pb2.Image(encoded=p.read_bytes()) for p in JPEGS]
    )
    assert_agrees_with_classify(logits, classifier.Classify(request, timeout=60))


def test_classification_extension(
    client: grpcclient.InferenceServerClient, model_repo: Path
) -> None:
    inputs = [jpeg_input(JPEGS)]
    logits = client.infer("resnet18", inputs).as_numpy("logits")
    outputs = [grpcclient.InferRequestedOutput("logits", class_count=3)]
    result = client.infer("resnet18", inputs, outputs=outputs)
    classes = result.as_numpy("logits")
    assert classes.shape == (len(JPEGS), 3) and classes.dtype == np.object_
    assert result.get_output("logits").datatype == "BYTES"
    labels = labels_of(model_repo, "resnet18")
    for row, entries in zip(logits, classes, strict=True):
        parsed = [entry.decode().split(":", 2) for entry in entries]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-row, kind="stable")[:3])
        for (value, index, label), i in zip(parsed, indices, strict=True):
            assert value == f"{row[i]:f}" and label == labels[int(index)]


def test_typed_contents(
    v2_stub: service_pb2_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    batch = normalized(1, size=32, seed=3)
    request = service_pb2.ModelInferRequest(model_name="cifar")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=list(batch.shape))
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    response = v2_stub.ModelInfer(request, timeout=60)
    typed = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(
        list(response.outputs[0].shape)
    )
    raw = client.infer("cifar", [tensor_input(batch, "FP32")]).as_numpy("logits")
    np.testing.assert_allclose(typed, raw, rtol=1e-5, atol=1e-6)


def test_async_infer(client: grpcclient.InferenceServerClient) -> None:
    done: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = (
        queue.Queue()
    )
    batch = normalized(1, seed=4)
    for request_id in ("a1", "a2"):
        client.async_infer(
            "resnet18",
            [tensor_input(batch, "FP32")],
            lambda result, error: done.put((result, error)),
            request_id=request_id,
            client_timeout=120,
        )
    answers = [done.get(timeout=120) for _ in range(2)]
    assert all(error is None for _, error in answers)
    assert sorted(r.get_response().id for r, _ in answers if r is not None) == ["a1", "a2"]
    expected = client.infer("resnet18", [tensor_input(batch, "FP32")]).as_numpy("logits")
    for result, _ in answers:
        assert result is not None
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-5)


async def test_asyncio_client(model_server: InProcessServer) -> None:
    async with grpcclient_aio.InferenceServerClient(model_server.address) as client:
        assert await client.is_model_ready("cifar")
        batch = normalized(2, size=32, seed=6)
        tensor = grpcclient_aio.InferInput("images", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = await client.infer("cifar", [tensor], request_id="aio")
        assert result.as_numpy("logits").shape == (2, 10)
        assert result.get_response().id == "aio"


def test_streaming_answers_every_request_and_goes_on_after_an_error(
    model_server: InProcessServer,
) -> None:
    answers: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = (
        queue.Queue()
    )
    with grpcclient.InferenceServerClient(model_server.address) as streaming:
        streaming.start_stream(
            lambda result, error: answers.put((result, error)), stream_timeout=120
        )
        good = [tensor_input(normalized(1, seed=5), "FP32")]
        bad = [tensor_input(normalized(1, size=32), "FP32")]
        streaming.async_stream_infer("resnet18", good, request_id="s1")
        streaming.async_stream_infer("resnet18", bad, request_id="s2")
        outputs = [grpcclient.InferRequestedOutput("logits", class_count=1)]
        streaming.async_stream_infer(
            "resnet18", [jpeg_input(JPEGS[:1])], request_id="s3", outputs=outputs
        )
        received = [answers.get(timeout=120) for _ in range(3)]
        streaming.stop_stream()
    results = [r for r, e in received if e is None]
    errors = [e for r, e in received if e is not None]
    assert sorted(r.get_response().id for r in results) == ["s1", "s3"]
    [error] = errors
    assert "takes input of shape [-1, 3, 224, 224]" in error.message()
    [top] = next(r for r in results if r.get_response().id == "s3").as_numpy("logits")
    assert top[0].count(b":") == 2


# errors


def _status(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    error = _status(lambda: client.infer("no_such_model", [tensor_input(normalized(1), "FP32")]))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'no_such_model'" in error.message()
    error = _status(lambda: client.get_model_metadata("resnet18", "99"))
    assert error.status() == "StatusCode.NOT_FOUND"


# Bad inputs of ModelInfer, and the server's health after each: tests/reliability/catalogue.py.


def test_repository_index(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [
        ("cifar", "1", "READY"),
        ("resnet18", "1", "READY"),
        ("resnet18_u8", "1", "READY"),
    ]


def test_unimplemented_rpcs_say_so(client: grpcclient.InferenceServerClient) -> None:
    assert client.get_system_shared_memory_status().regions == {}  # tests/server/protocols/
    error = _status(client.get_cuda_shared_memory_status)  # test_shared_memory.py
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert "system shared memory" in error.message()
    error = _status(client.get_trace_settings)
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert "is not supported by this server" in error.message()
    # model control is off (--model-control-mode none): unimplemented, saying how to turn it on
    # (tests/server/core/test_model_control.py runs it on)
    for call in (lambda: client.load_model("resnet18"), lambda: client.unload_model("resnet18")):
        error = _status(call)
        assert error.status() == "StatusCode.UNIMPLEMENTED"
        assert "--model-control-mode none" in error.message()


# statistics and shared accounting


def test_statistics_count_both_apis(
    client: grpcclient.InferenceServerClient,
    classifier: classifier_pb2_grpc.ClassifierStub,
    model_server: InProcessServer,
) -> None:
    def requests_ok() -> float:
        for line in model_server.metrics().splitlines():
            if (
                line.startswith("resnet_serve_requests_total{")
                and 'model="cifar"' in line
                and 'code="OK"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = client.get_inference_statistics("cifar").model_stats
    ok_before = requests_ok()
    client.infer("cifar", [tensor_input(normalized(2, size=32), "FP32")])
    classifier.Classify(
        classifier_pb2.ClassifyRequest(
            model="cifar", images=[classifier_pb2.Image(encoded=JPEGS[0].read_bytes())]
        ),
        timeout=60,
    )
    _status(lambda: client.infer("cifar", [tensor_input(normalized(1), "FP32")]))
    assert requests_ok() == ok_before + 2

    [stats] = client.get_inference_statistics("cifar", "1").model_stats
    success_before = before[0].inference_stats.success.count if before else 0
    assert (stats.name, stats.version) == ("cifar", "1")
    assert stats.inference_stats.success.count == success_before + 2
    assert stats.inference_stats.fail.count >= 1
    assert stats.inference_count >= 3 and stats.execution_count >= 2
    for duration in ("success", "queue", "compute_input", "compute_infer"):
        assert getattr(stats.inference_stats, duration).ns > 0, duration
    assert stats.last_inference > 0
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} == {"resnet18", "resnet18_u8", "cifar"}


def test_reflection_describes_the_v2_service(model_server: InProcessServer) -> None:
    with grpc.insecure_channel(model_server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in database.get_services()
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        assert service.methods_by_name["ModelInfer"].input_type.full_name == (
            "inference.ModelInferRequest"
        )
        raw = pool.FindMessageTypeByName("inference.ModelInferRequest").fields_by_name
        assert raw["raw_input_contents"].number == 7
