"""Tensors of the Open Inference Protocol v2: datatypes, raw and typed contents, BYTES, top-k.

Pure functions over numpy arrays and bytes, free of the generated messages,
so the servicer stays thin and every rule here is unit-tested. Errors are
`InvalidInput` (INVALID_ARGUMENT), like every other malformed request.

- A tensor travels either as one ``raw_input_contents`` entry (little-endian,
  row-major, no padding) or as the repeated field of its datatype in
  ``contents`` (``fp32_contents`` for FP32, ``uint_contents`` for UINT8, ...).
- A BYTES element travels as a 4-byte little-endian length and its bytes,
  elements back to back (`resnet_serve_client.bytes_tensor`, shared with the SDK).
- The classification extension turns a row of scores into ``k`` BYTES elements
  ``"<value>:<index>[:<label>]"``, best first, the value printed like C++'s
  ``std::to_string`` (six decimals) as Triton does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
    contents_field: str


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


class Contents(Protocol):
    """The typed contents of a tensor (``InferTensorContents``)."""

    def ListFields(self) -> list[tuple[Any, Any]]: ...


def datatype(name: str) -> Datatype:
    try:
        return DATATYPES[name]
    except KeyError:
        raise TensorError(
            f"unknown datatype '{name}'; the protocol's datatypes are {', '.join(DATATYPES)}"
        ) from None


def check_shape(tensor: str, shape: Sequence[int]) -> tuple[int, ...]:
    if any(d < 0 for d in shape):
        raise TensorError(f"input '{tensor}' has shape {list(shape)}; dimensions must be >= 0")
    # numpy refuses such a shape even when a zero dimension leaves it empty
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise TensorError(
            f"input '{tensor}' has shape {list(shape)}; its non-zero dimensions may multiply "
            f"to at most {MAX_ELEMENTS}"
        )
    return tuple(int(d) for d in shape)


def decode_raw(tensor: str, type_name: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """One ``raw_input_contents`` entry as an array of ``shape`` (dtype object for BYTES)."""
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
        return _object_array(elements, dims)
    expected = count * dt.dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"input '{tensor}' ({dt.name}, shape {list(dims)}) needs {expected} bytes of raw "
            f"contents, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dt.dtype).reshape(dims)


def decode_contents(
    tensor: str, type_name: str, shape: Sequence[int], contents: Contents
) -> np.ndarray:
    """A tensor sent in typed ``contents``: the one field of its datatype, ``shape`` elements."""
    return contents_reader(tensor, type_name, shape, contents)()


def contents_reader(
    tensor: str, type_name: str, shape: Sequence[int], contents: Contents
) -> Callable[[], np.ndarray]:
    """Check typed ``contents`` against the datatype and shape without reading the values
    (field lengths only); return the function that reads them into an array, which takes
    about 0.1 s per million values: call it off the event loop."""
    dt = datatype(type_name)
    dims = check_shape(tensor, shape)
    count = math.prod(dims)
    present = {field.name: values for field, values in contents.ListFields()}
    if not dt.contents_field:
        raise TensorError(f"input '{tensor}': {dt.name} travels only in raw_input_contents")
    wrong = sorted(set(present) - {dt.contents_field})
    if wrong:
        raise TensorError(
            f"input '{tensor}' is {dt.name}, whose contents go in '{dt.contents_field}', "
            f"but the request sets {', '.join(wrong)}"
        )
    values = present.get(dt.contents_field, ())
    if len(values) != count:
        raise TensorError(
            f"input '{tensor}' has shape {list(dims)} ({count} elements) but "
            f"'{dt.contents_field}' holds {len(values)}"
        )

    def read() -> np.ndarray:
        if dt.name == BYTES:
            return _object_array([bytes(v) for v in values], dims)
        array = np.asarray(list(values))
        if (
            dt.dtype.kind in "iu"
            and count
            and (array.min() < np.iinfo(dt.dtype).min or array.max() > np.iinfo(dt.dtype).max)
        ):
            raise TensorError(f"input '{tensor}' has values outside the range of {dt.name}")
        return array.astype(dt.dtype).reshape(dims)

    return read


def encode_raw(array: np.ndarray) -> tuple[str, bytes]:
    """An output array as (datatype, raw bytes); an object array is sent as BYTES."""
    if array.dtype == object:
        return BYTES, bytes_tensor.serialize(array.ravel().tolist())
    little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    try:
        name = NUMPY_TO_DATATYPE[np.dtype(little)]
    except KeyError:
        raise TypeError(f"no v2 datatype for numpy dtype {array.dtype}") from None
    return name, np.ascontiguousarray(array, dtype=little).tobytes()


def classification(scores: np.ndarray, k: int, labels: Sequence[str] | None = None) -> np.ndarray:
    """Top ``k`` of each row of ``scores`` [N, C] as BYTES [N, min(k, C)], best first.

    Each element is ``"<value>:<index>"`` plus ``":<label>"`` when labels are
    given; ties keep the lower index first.
    """
    if k < 1:
        raise TensorError(f"classification count must be >= 1, got {k}")
    rows = np.asarray(scores).reshape(len(scores), -1)
    top = min(k, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :top]
    out = np.empty((rows.shape[0], top), dtype=object)
    for r, indices in enumerate(order):
        for c, index in enumerate(indices):
            text = f"{float(rows[r, index]):f}:{int(index)}"
            if labels is not None:
                text += f":{labels[index]}"
            out[r, c] = text.encode()
    return out


def _object_array(elements: list[bytes], dims: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(dims)
