"""Tensors as the server takes them from any protocol: datatypes, shapes, raw bytes and
elements read into arrays.

The neutral form of a tensor's data is the Open Inference Protocol's: raw bytes
(little-endian, row-major, no padding; a BYTES element as a 4-byte little-endian length
and its bytes, `resnet_serve_client.bytes_tensor`), or elements (a protocol's typed
values or JSON numbers, flat or nested, row-major). Pure functions over numpy arrays and
bytes; errors are `TensorError` (INVALID_ARGUMENT) saying what was wrong and what is
allowed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from resnet_serve_client import bytes_tensor

from server.errors import InvalidInput

BYTES = "BYTES"
MAX_ELEMENTS = 1 << 40  # far above any message the server accepts


class TensorError(InvalidInput):
    """A tensor of a request is malformed; the message says what and what is allowed."""


@dataclass(frozen=True)
class Datatype:
    name: str
    dtype: np.dtype
    contents_field: str  # the v2 gRPC ``InferTensorContents`` field its elements travel in


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        Datatype("BOOL", np.dtype("?"), "bool_contents"),
        Datatype("UINT8", np.dtype("<u1"), "uint_contents"),
        Datatype("UINT16", np.dtype("<u2"), "uint_contents"),
        Datatype("UINT32", np.dtype("<u4"), "uint_contents"),
        Datatype("UINT64", np.dtype("<u8"), "uint64_contents"),
        Datatype("INT8", np.dtype("<i1"), "int_contents"),
        Datatype("INT16", np.dtype("<i2"), "int_contents"),
        Datatype("INT32", np.dtype("<i4"), "int_contents"),
        Datatype("INT64", np.dtype("<i8"), "int64_contents"),
        Datatype("FP16", np.dtype("<f2"), ""),
        Datatype("FP32", np.dtype("<f4"), "fp32_contents"),
        Datatype("FP64", np.dtype("<f8"), "fp64_contents"),
        Datatype(BYTES, np.dtype(object), "bytes_contents"),
    )
}
NUMPY_TO_DATATYPE = {d.dtype: d.name for d in DATATYPES.values() if d.name != BYTES}

# numpy kinds elements may come as, per datatype kind: a float tensor takes integers too
_ELEMENT_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


def datatype(name: str) -> Datatype:
    try:
        return DATATYPES[name]
    except KeyError:
        raise TensorError(
            f"unknown datatype '{name}'; the protocol's datatypes are {', '.join(DATATYPES)}"
        ) from None


def check_shape(tensor: str, shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(map(int, shape))
    if dims and min(dims) < 0:
        raise TensorError(f"input '{tensor}' has shape {list(shape)}; dimensions must be >= 0")
    # numpy refuses such a shape even when a zero dimension leaves it empty
    if math.prod(filter(None, dims)) > MAX_ELEMENTS:
        raise TensorError(
            f"input '{tensor}' has shape {list(shape)}; its non-zero dimensions may multiply "
            f"to at most {MAX_ELEMENTS}"
        )
    return dims


def decode_raw(
    tensor: str, type_name: str, shape: Sequence[int], raw: bytes | memoryview
) -> np.ndarray:
    """Raw contents as an array of ``shape`` (dtype object for BYTES)."""
    dt = datatype(type_name)
    dims = check_shape(tensor, shape)
    count = math.prod(dims)
    if dt.name == BYTES:
        try:  # read no further than one element past the shape's count
            elements = list(itertools.islice(bytes_tensor.elements(raw), count + 1))
        except ValueError as exc:
            raise TensorError(f"input '{tensor}': {exc}") from None
        if len(elements) != count:
            held = f"more than {count}" if len(elements) > count else str(len(elements))
            raise TensorError(
                f"input '{tensor}' has shape {list(dims)} ({count} elements) but its raw "
                f"contents hold {held} BYTES elements"
            )
        return object_array(elements, dims)
    expected = count * dt.dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"input '{tensor}' ({dt.name}, shape {list(dims)}) needs {expected} bytes of raw "
            f"contents, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dt.dtype).reshape(dims)


def decode_elements(
    tensor: str, type_name: str, shape: Sequence[int], values: Any, where: str
) -> np.ndarray:
    """Elements (a sequence, flat or nested, row-major) as an array of ``shape``; ``where``
    names what held them in the request (``'data'``, ``'fp32_contents'``) for the errors.
    About 0.1 s per million values: call it off the event loop."""
    dt = datatype(type_name)
    dims = check_shape(tensor, shape)
    count = math.prod(dims)
    values = values if isinstance(values, list) else list(values)
    if dt.name == BYTES:
        elements = list(_flatten(values))
        if not all(isinstance(e, str | bytes) for e in elements):
            raise TensorError(f"input '{tensor}' is BYTES; its {where} must hold strings")
        array = object_array([e.encode() if isinstance(e, str) else bytes(e) for e in elements],
                             (len(elements),))  # fmt: skip
    else:
        if _holds_strings(values):  # before np.asarray would turn every number into a string
            raise TensorError(f"input '{tensor}' is {dt.name} but its {where} holds strings")
        try:
            array = np.asarray(values)
        except ValueError:
            raise TensorError(
                f"input '{tensor}': {where} is not a regular array (nested lists of unequal "
                f"lengths)"
            ) from None
        allowed = _ELEMENT_KINDS.get(dt.dtype.kind, "")
        if array.size and array.dtype.kind not in allowed:
            raise TensorError(
                f"input '{tensor}' is {dt.name} but its {where} holds "
                f"{_kind_name(array.dtype.kind)}"
            )
        if array.size and dt.dtype.kind in "iu":
            info = np.iinfo(dt.dtype)
            if array.min() < info.min or array.max() > info.max:
                raise TensorError(f"input '{tensor}' has values outside the range of {dt.name}")
        array = array.astype(dt.dtype).ravel()
    if array.size != count:
        raise TensorError(
            f"input '{tensor}' has shape {list(dims)} ({count} elements) but {where} holds "
            f"{array.size}"
        )
    return array.reshape(dims)


def _holds_strings(values: list[Any]) -> bool:
    """Whether a regular array of elements holds a string, found without converting a number:
    given one string among 9.6 million JSON numbers, np.asarray makes all of them strings
    (1.2 GB and seconds with the GIL held) before the datatype check could refuse them."""
    try:
        elements = np.asarray(values, dtype=object)  # references only, 8 bytes an element
    except ValueError:
        return False  # not a regular array: said without converting anything
    return str in set(map(type, elements.ravel().tolist()))


def object_array(elements: list[bytes], dims: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(dims)


def _flatten(data: list[Any]) -> Iterator[Any]:
    for element in data:
        if isinstance(element, list):
            yield from _flatten(element)
        else:
            yield element


def _kind_name(kind: str) -> str:
    return {
        "b": "booleans", "f": "floating-point numbers", "i": "integers", "u": "integers",
        "U": "strings", "S": "strings", "O": "mixed values",
    }.get(kind, "values of another type")  # fmt: skip
