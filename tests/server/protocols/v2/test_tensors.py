"""The v2 tensor codec: raw and typed contents, BYTES framing, classification strings."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from resnet_serve_client import bytes_tensor
from resnet_serve_client.proto.inference.grpc_service_pb2 import InferTensorContents
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from server.protocols.v2 import tensors as t


def test_fp32_raw_round_trip() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)
    decoded = t.decode_raw("images", "FP32", x.shape, x.tobytes())
    np.testing.assert_array_equal(decoded, x)
    assert decoded.dtype == np.float32


def test_uint8_raw() -> None:
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(t.decode_raw("images", "UINT8", [2, 4, 4, 3], x.tobytes()), x)


def test_raw_byte_length_is_checked() -> None:
    with pytest.raises(t.TensorError, match=r"needs 96 bytes of raw contents, got 95"):
        t.decode_raw("images", "FP32", [2, 3, 2, 2], bytes(95))


def test_unknown_datatype_lists_the_known_ones() -> None:
    with pytest.raises(t.TensorError, match=r"unknown datatype 'FLOAT'.*FP32"):
        t.decode_raw("images", "FLOAT", [1], bytes(4))


def test_negative_dimension() -> None:
    with pytest.raises(t.TensorError, match=r"shape \[-1, 3\]"):
        t.decode_raw("images", "FP32", [-1, 3], b"")


def test_bytes_as_tritonclient_serializes_them() -> None:
    elements = np.array([b"\xff\xd8jpeg", b"", b"png\x00\x00"], dtype=object)
    raw = serialize_byte_tensor(elements).item()
    decoded = t.decode_raw("images", "BYTES", [3], raw)
    assert decoded.tolist() == [b"\xff\xd8jpeg", b"", b"png\x00\x00"]
    assert bytes_tensor.serialize(decoded.tolist()) == raw


def test_bytes_element_count_must_match_shape() -> None:
    raw = bytes_tensor.serialize([b"a", b"b"])
    with pytest.raises(t.TensorError, match=r"shape \[3\] \(3 elements\).*holds? 2 BYTES"):
        t.decode_raw("images", "BYTES", [3], raw)


def test_bytes_length_prefix_past_the_end() -> None:
    raw = struct.pack("<I", 10) + b"short"
    with pytest.raises(
        t.TensorError, match=r"^input 'images': BYTES element 0 declares 10 bytes but only 5 remain"
    ):
        t.decode_raw("images", "BYTES", [1], raw)


def test_bytes_truncated_length_prefix() -> None:
    raw = bytes_tensor.serialize([b"abc"]) + b"\x01\x00"
    with pytest.raises(t.TensorError, match=r"element 1 starts at byte 7 but only 2 bytes remain"):
        t.decode_raw("images", "BYTES", [2], raw)


def test_empty_bytes_buffer_has_no_elements() -> None:
    assert bytes_tensor.deserialize(b"") == []
    assert t.decode_raw("images", "BYTES", [0], b"").shape == (0,)


def test_typed_fp32_contents() -> None:
    contents = InferTensorContents(fp32_contents=[0.5, -1.0, 2.0, 3.0])
    decoded = t.decode_contents("images", "FP32", [1, 4], contents)
    np.testing.assert_array_equal(decoded, np.array([[0.5, -1.0, 2.0, 3.0]], dtype=np.float32))
    assert decoded.dtype == np.float32


def test_typed_uint8_contents_and_range() -> None:
    decoded = t.decode_contents(
        "images", "UINT8", [3], InferTensorContents(uint_contents=[0, 7, 255])
    )
    assert decoded.dtype == np.uint8 and decoded.tolist() == [0, 7, 255]
    with pytest.raises(t.TensorError, match="outside the range of UINT8"):
        t.decode_contents("images", "UINT8", [1], InferTensorContents(uint_contents=[256]))


def test_typed_contents_in_the_wrong_field() -> None:
    with pytest.raises(
        t.TensorError, match=r"FP32, whose contents go in 'fp32_contents'.*uint_contents"
    ):
        t.decode_contents("images", "FP32", [1], InferTensorContents(uint_contents=[1]))


def test_typed_contents_count() -> None:
    with pytest.raises(t.TensorError, match=r"shape \[2, 2\] \(4 elements\).*holds 3"):
        t.decode_contents("images", "FP32", [2, 2], InferTensorContents(fp32_contents=[1, 2, 3]))


def test_typed_bytes_contents() -> None:
    contents = InferTensorContents(bytes_contents=[b"one", b"two"])
    assert t.decode_contents("images", "BYTES", [2], contents).tolist() == [b"one", b"two"]


def test_encode_fp32() -> None:
    x = np.array([[1.0, -2.5]], dtype=np.float32)
    name, raw = t.encode_raw(x)
    assert name == "FP32" and np.frombuffer(raw, "<f4").tolist() == [1.0, -2.5]


def test_encode_bytes_reads_back_with_tritonclient() -> None:
    name, raw = t.encode_raw(np.array([[b"a:1", b"bc:2"]], dtype=object))
    assert name == "BYTES"
    assert deserialize_bytes_tensor(raw).tolist() == [b"a:1", b"bc:2"]


def test_classification_format_and_order() -> None:
    scores = np.array([[1.1, 3.3, 0.5, 2.4], [0.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    labels = ["w", "x", "y", "z"]
    out = t.classification(scores, 2, labels)
    assert out.shape == (2, 2)
    assert out[0].tolist() == [b"3.300000:1:x", b"2.400000:3:z"]
    # ties keep the lower index first
    assert out[1].tolist() == [b"1.000000:2:y", b"0.000000:0:w"]


def test_classification_without_labels_and_k_larger_than_classes() -> None:
    out = t.classification(np.array([[-1.5, 2.0]], dtype=np.float32), 5)
    assert out.tolist() == [[b"2.000000:1", b"-1.500000:0"]]


def test_classification_count_must_be_positive() -> None:
    with pytest.raises(t.TensorError, match="classification count must be >= 1, got 0"):
        t.classification(np.zeros((1, 3), np.float32), 0)
