"""Property tests of the decoders, in process: any input gives a result or a refusal
(`ImageError` from the transform, `InvalidInput` from the v2 parsers).

Never another exception (which the server would answer with INTERNAL), and
never a hang: hypothesis fails an example that runs past `DEADLINE`, far
above what any of these takes (a few milliseconds). The over-the-wire
examples are in test_catalogue.py.

- images: arbitrary bytes, and real PNG/JPEG/GIF/WebP/BMP files with bytes
  flipped, cut short or their header dimensions rewritten, through
  ``prepare_encoded`` (header checks, decode, orientation, RGB, resize, crop);
- v2 tensors: any datatype name, shape and raw buffer through ``decode_raw``,
  BYTES buffers through ``bytes_tensor.deserialize`` (and back), typed contents
  through ``decode_contents``, whole ``ModelInferRequest`` messages through
  ``parse_images`` and ``parse_outputs``;
- received messages: any ``ModelInferRequest``, large enough for the codec's ``parse`` to
  take its raw contents out of the received bytes, and any bytes at all, read as protobuf
  reads them (the same fields, the same raw contents, the same refusal).
"""

from __future__ import annotations

import struct
from datetime import timedelta
from functools import cache
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resnet_serve_client import bytes_tensor
from tritonclient.grpc import service_pb2 as v2

from server import validation
from server.errors import InvalidInput
from server.protocols.v2 import request as v2_request
from server.protocols.v2 import tensors as v2_tensors
from server.repository import (
    ImageError,
    ImageLimits,
    InputSpec,
    ModelConfig,
    Preprocessing,
    prepare_encoded,
)
from server.validation import Unread
from tests.reliability import images

DEADLINE = timedelta(seconds=10)
CASES = settings(
    max_examples=150, deadline=DEADLINE, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
CIFAR = ModelConfig(
    name="cifar", arch="resnet20", num_classes=10, input=InputSpec(size=32),
    preprocessing=Preprocessing(resize=32, crop=32),
)  # fmt: skip
UINT8 = ModelConfig(
    name="u8", arch="resnet18", num_classes=1000,
    input=InputSpec(dtype="uint8", layout="NHWC", size=32),
    preprocessing=Preprocessing(resize=36, crop=32),
)  # fmt: skip
LIMITS = ImageLimits(max_image_bytes=1 << 20, max_image_pixels=4_000_000)
DATATYPES = [*v2_tensors.DATATYPES, "FP8", "", "fp32"]


@cache
def seeds() -> tuple[bytes, ...]:
    """Valid files of every accepted format, the starting points for mutation."""
    small = images.photo().resize((24, 16))
    return (
        images.png(small), images.jpeg(small), images.encode(small, "GIF"),
        images.encode(small, "WEBP"), images.encode(small, "BMP"), images.exif_rotated()[0],
        images.sixteen_bit_png()[0], images.palette_png(), images.cmyk_jpeg(),
    )  # fmt: skip


def assert_result_or_invalid(config: ModelConfig, data: bytes) -> None:
    try:
        result = prepare_encoded(data, config, LIMITS)
    except ImageError as exc:
        assert str(exc)
        return
    if config.input.dtype == "uint8":
        assert result.shape == (32, 32, 3) and result.dtype == np.uint8
    else:
        assert result.shape == (3, 32, 32) and result.dtype == np.float32
        assert np.isfinite(result).all()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # rewrite the bytes where PNG's IHDR keeps the width and height
        struct.pack_into(">II", data, 16, draw(st.integers(0, 1 << 31)), draw(st.integers(0, 99)))
    return bytes(data[: draw(st.integers(0, len(data)))])


@CASES
@given(data=st.binary(max_size=2048))
def test_any_bytes_decode_or_are_invalid(data: bytes) -> None:
    assert_result_or_invalid(CIFAR, data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@CASES
@given(data=mutated(), config=st.sampled_from([CIFAR, UINT8]))
def test_damaged_images_decode_or_are_invalid(data: bytes, config: ModelConfig) -> None:
    assert_result_or_invalid(config, data)


shapes = st.lists(st.integers(-3, 1 << 40) | st.integers(0, 8), max_size=5)


@CASES
@given(datatype=st.sampled_from(DATATYPES), shape=shapes, raw=st.binary(max_size=512))
def test_any_raw_tensor_decodes_or_is_invalid(datatype: str, shape: list[int], raw: bytes) -> None:
    try:
        array = v2_tensors.decode_raw("images", datatype, shape, raw)
    except InvalidInput as exc:
        assert "'images'" in str(exc) or "datatype" in str(exc)
        return
    assert list(array.shape) == shape


@CASES
@given(raw=st.binary(max_size=512))
def test_any_bytes_buffer_splits_or_is_invalid(raw: bytes) -> None:
    try:
        elements = bytes_tensor.deserialize(raw)
    except ValueError:
        return
    assert bytes_tensor.serialize(elements) == raw


@CASES
@given(elements=st.lists(st.binary(max_size=64), max_size=8))
def test_bytes_round_trip(elements: list[bytes]) -> None:
    raw = bytes_tensor.serialize(elements)
    assert bytes_tensor.deserialize(raw) == elements


contents_fields = st.fixed_dictionaries(
    {},
    optional={
        "fp32_contents": st.lists(st.floats(width=32), max_size=6),
        "int_contents": st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=6),
        "uint_contents": st.lists(st.integers(0, (1 << 32) - 1), max_size=6),
        "int64_contents": st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=6),
        "bytes_contents": st.lists(st.binary(max_size=16), max_size=6),
        "bool_contents": st.lists(st.booleans(), max_size=6),
    },
)


@CASES
@given(datatype=st.sampled_from(DATATYPES), shape=shapes, fields=contents_fields)
def test_any_typed_contents_decode_or_are_invalid(
    datatype: str, shape: list[int], fields: dict[str, Any]
) -> None:
    contents = v2.InferTensorContents(**fields)
    try:
        array = v2_tensors.decode_contents("images", datatype, shape, contents)
    except InvalidInput:
        return
    assert list(array.shape) == shape


@st.composite
def infer_requests(draw: st.DrawFn) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="cifar")
    for _ in range(draw(st.integers(0, 2))):
        request.inputs.add(
            name=draw(st.sampled_from(["images", "pixels", ""])),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(st.integers(-1, 4), max_size=4)),
        )
    for _ in range(draw(st.integers(0, 2))):
        request.raw_input_contents.append(draw(st.binary(max_size=256)))
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name=draw(st.sampled_from(["logits", "probabilities"])))
        if draw(st.booleans()):
            parameter = output.parameters["classification"]
            if draw(st.booleans()):
                parameter.int64_param = draw(st.integers(-5, 20))
            else:
                parameter.string_param = "5"
    return request


@CASES
@given(request=infer_requests())
def test_any_infer_request_parses_or_is_invalid(request: v2.ModelInferRequest) -> None:
    try:
        parsed = validation.tensor_inputs(v2_request.inputs(request), CIFAR)
        outputs = validation.check_outputs(v2_request.outputs(request), CIFAR)
        if isinstance(parsed.tensor, Unread):  # typed contents: read later, on a worker
            assert parsed.tensor.read().shape[0] == parsed.tensor.images
    except InvalidInput:
        return
    assert parsed.tensor is not None or parsed.images
    assert outputs


@CASES
@given(request=infer_requests(), large=st.binary(min_size=1, max_size=64), spare=st.binary())
def test_a_received_message_reads_as_protobuf_reads_it(
    request: v2.ModelInferRequest, large: bytes, spare: bytes
) -> None:
    """With an entry past ``RAW_SPLIT_BYTES`` and unknown fields of every wire type."""
    request.raw_input_contents.append(large * (v2_request.RAW_SPLIT_BYTES // len(large) + 1))
    data = request.SerializeToString() + _unknown_fields(spare)
    received = v2_request.parse(data)
    whole = v2.ModelInferRequest.FromString(data)
    assert [bytes(raw) for raw in received.raw] == list(whole.raw_input_contents)
    assert all(isinstance(raw, memoryview) and raw.obj is data for raw in received.raw)
    del whole.raw_input_contents[:]
    assert _same(received.message, whole)


def _unknown_fields(seed: bytes) -> bytes:
    """Fields numbered above the message's: a varint, 64 and 32 bits, bytes."""
    return (
        b"\xa8\x06" + bytes([len(seed) & 0x7F])  # field 101, varint
        + b"\xb1\x06" + (seed + bytes(8))[:8]  # field 102, 64-bit
        + b"\xbd\x06" + (seed + bytes(4))[:4]  # field 103, 32-bit
        + b"\xc2\x06" + bytes([min(len(seed), 127)]) + seed[:127]  # field 104, bytes
    )  # fmt: skip


@CASES
@given(head=st.binary(max_size=64), tail=st.binary(max_size=64))
def test_any_bytes_around_a_large_entry_parse_as_protobuf_parses_them(
    head: bytes, tail: bytes
) -> None:
    """Any bytes before and after a raw contents entry past ``RAW_SPLIT_BYTES``."""
    size = v2_request.RAW_SPLIT_BYTES
    length = bytes([0x80 | size & 0x7F, 0x80 | size >> 7 & 0x7F, size >> 14])  # a varint
    entry = b"\x3a" + length + bytes(size)  # field 7 (raw_input_contents), bytes
    data = head + entry + tail
    try:
        whole = v2.ModelInferRequest.FromString(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            v2_request.parse(data)
        return
    received = v2_request.parse(data)
    assert [bytes(raw) for raw in received.raw] == list(whole.raw_input_contents)
    del whole.raw_input_contents[:]
    assert _same(received.message, whole)


def _same(message: Any, other: Any) -> bool:
    """The same fields, unknown ones included (the server's generated classes are not
    tritonclient's, so they never compare equal)."""
    return message.SerializeToString(deterministic=True) == other.SerializeToString(
        deterministic=True
    )


def test_the_seeds_are_valid_images() -> None:
    """Mutation starts from files that decode, so the damage is what gets tested."""
    for data in seeds():
        prepare_encoded(data, CIFAR, LIMITS)
