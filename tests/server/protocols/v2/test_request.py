"""Reading a ModelInferRequest against a model and writing the response (no server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from resnet_serve_client.bytes_tensor import serialize as serialize_bytes
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor

from server import tensors, validation
from server.errors import InvalidInput
from server.protocols.v2 import request as v2_request
from server.repository import InputSpec, ModelConfig
from server.request import Output
from server.validation import Inputs, Unread

FLOAT = ModelConfig(name="tiny", arch="resnet20", num_classes=3, input=InputSpec(size=4))
UINT8 = ModelConfig(
    name="tiny_u8",
    arch="resnet20",
    num_classes=3,
    input=InputSpec(dtype="uint8", layout="NHWC", size=4),
)


def parse_images(message: pb.ModelInferRequest, config: ModelConfig) -> Inputs:
    """The message decoded (the codec) and its input accepted (validation)."""
    return validation.tensor_inputs(v2_request.inputs(message), config)


def parse_outputs(message: pb.ModelInferRequest, config: ModelConfig) -> list[Output]:
    return list(validation.check_outputs(v2_request.outputs(message), config))


def _request(
    datatype: str, shape: list[int], raw: bytes, name: str = "images"
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def test_fp32_tensor() -> None:
    x = np.ones((2, 3, 4, 4), np.float32)
    images = parse_images(_request("FP32", [2, 3, 4, 4], x.tobytes()), FLOAT)
    assert images.tensor is not None and images.tensor.shape == (2, 3, 4, 4) and len(images) == 2


def test_uint8_tensor() -> None:
    x = np.zeros((1, 4, 4, 3), np.uint8)
    images = parse_images(_request("UINT8", [1, 4, 4, 3], x.tobytes()), UINT8)
    assert images.tensor is not None and images.tensor.dtype == np.uint8


def test_bytes_of_encoded_images() -> None:
    raw = serialize_bytes([b"jpeg-1", b"jpeg-2"])
    images = parse_images(_request("BYTES", [2], raw), FLOAT)
    assert images.images == (b"jpeg-1", b"jpeg-2") and len(images) == 2
    column = parse_images(_request("BYTES", [2, 1], raw), FLOAT)
    assert column.images == images.images


def test_bytes_shape_must_be_a_list_of_images() -> None:
    raw = serialize_bytes([b"a", b"b"])
    with pytest.raises(InvalidInput, match=r"shape \[1, 2\]; encoded images go in shape \[N\]"):
        parse_images(_request("BYTES", [1, 2], raw), FLOAT)


def test_wrong_datatype_names_what_the_model_takes() -> None:
    with pytest.raises(
        InvalidInput,
        match=r"input 'images' is FP64; model 'tiny' takes 'images' as FP32 \[-1, 3, 4, 4\] "
        r"\(NCHW\) or BYTES \[-1\] of encoded images",
    ):
        parse_images(_request("FP64", [1], bytes(8)), FLOAT)


def test_unknown_input_name() -> None:
    with pytest.raises(InvalidInput, match=r"unknown input 'INPUT0'; model 'tiny' takes 'images'"):
        parse_images(_request("FP32", [1], bytes(4), name="INPUT0"), FLOAT)


def test_exactly_one_input() -> None:
    request = _request("FP32", [1], bytes(4))
    request.inputs.add(name="other", datatype="FP32", shape=[1])
    request.raw_input_contents.append(bytes(4))
    with pytest.raises(InvalidInput, match=r"exactly one input.*got 'images', 'other'"):
        parse_images(request, FLOAT)
    with pytest.raises(InvalidInput, match=r"exactly one input.*got none"):
        parse_images(pb.ModelInferRequest(model_name="tiny"), FLOAT)


def test_typed_contents() -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 4, 4])
    tensor.contents.fp32_contents.extend([0.5] * 48)
    images = parse_images(request, FLOAT)
    # checked now, read later on a worker: the values are not touched on the event loop
    assert isinstance(images.tensor, Unread) and images.tensor.images == 1 and len(images) == 1
    assert float(images.tensor.read().sum()) == 24.0


@pytest.mark.parametrize(
    ("datatype", "shape", "message"),
    [
        ("BYTES", [1, 1000000], r"shape \[1, 1000000\]; encoded images go in shape \[N\]"),
        ("BYTES", [0], r"shape \[0\]; encoded images go in shape \[N\] or \[N, 1\] with N >= 1"),
        ("FP32", [1, 3, 224, 224], r"takes input of shape \[-1, 3, 4, 4\] \(NCHW, batch >= 1\)"),
        ("FP32", [0, 3, 4, 4], r"got \[0, 3, 4, 4\]"),
        ("INT32", [1, 3, 4, 4], r"input 'images' is INT32; model 'tiny' takes"),
        ("FP8", [1], r"unknown datatype 'FP8'"),
        ("FP32", [-1, 3, 4, 4], r"dimensions must be >= 0"),
    ],
)
def test_the_declared_shape_is_checked_before_the_data(
    datatype: str, shape: list[int], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def untouchable(*_: object) -> None:
        raise AssertionError("the data was read before the declared shape was checked")

    monkeypatch.setattr(tensors, "decode_raw", untouchable)
    monkeypatch.setattr(tensors, "decode_elements", untouchable)
    with pytest.raises(InvalidInput, match=message):
        parse_images(_request(datatype, shape, b""), FLOAT)


def test_bytes_are_split_no_further_than_the_shape() -> None:
    raw = serialize_bytes([b""] * 100_000)
    with pytest.raises(InvalidInput, match=r"hold more than 2 BYTES elements"):
        parse_images(_request("BYTES", [2], raw), FLOAT)


def test_no_data_and_mixed_data() -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 4, 4])
    with pytest.raises(InvalidInput, match="carries no data"):
        parse_images(request, FLOAT)
    request.inputs[0].contents.fp32_contents.append(1.0)
    request.raw_input_contents.append(bytes(4))
    with pytest.raises(InvalidInput, match="use one or the other"):
        parse_images(request, FLOAT)


def test_outputs_default_and_classification() -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    assert parse_outputs(request, FLOAT) == [Output("logits")]
    request.outputs.add(name="logits").parameters["classification"].int64_param = 2
    assert parse_outputs(request, FLOAT) == [Output("logits", 2)]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda o: setattr(o, "name", "probs"), r"unknown output 'probs'.*one output 'logits'"),
        (
            lambda o: o.parameters["classification"].CopyFrom(pb.InferParameter(string_param="3")),
            r"'classification' must be an integer, got string_param",
        ),
        (
            lambda o: o.parameters["classification"].CopyFrom(pb.InferParameter(int64_param=0)),
            r"'classification' must be >= 1, got 0",
        ),
    ],
)
def test_bad_outputs(setup: Callable[[Any], None], message: str) -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    setup(request.outputs.add(name="logits"))
    with pytest.raises(InvalidInput, match=message):
        parse_outputs(request, FLOAT)


def test_output_requested_twice() -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    request.outputs.add(name="logits")
    request.outputs.add(name="logits")
    with pytest.raises(InvalidInput, match="requested more than once"):
        parse_outputs(request, FLOAT)


def test_fill_response_tensor_and_classification() -> None:
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]], np.float32)
    response = pb.ModelInferResponse()
    v2_request.fill_response(response, (Output("logits"),), logits, ["a", "b", "c"])
    assert response.outputs[0].datatype == "FP32" and list(response.outputs[0].shape) == [2, 3]
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 3), logits
    )
    response = pb.ModelInferResponse()
    v2_request.fill_response(response, (Output("logits", 2),), logits, ["a", "b", "c"])
    assert response.outputs[0].datatype == "BYTES" and list(response.outputs[0].shape) == [2, 2]
    assert deserialize_bytes_tensor(response.raw_output_contents[0]).tolist() == [
        b"2.000000:1:b",
        b"0.100000:0:a",
        b"3.000000:0:a",
        b"1.000000:2:c",
    ]
