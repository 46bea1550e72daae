"""The v2 codec, shared by both v2 transports: typed contents to the neutral request's
elements, outputs to raw bytes, the classification extension.

- A tensor travels either as one ``raw_input_contents`` entry (little-endian,
  row-major, no padding: the neutral form, `server.tensors`) or as the repeated field of
  its datatype in ``contents`` (``fp32_contents`` for FP32, ``uint_contents`` for UINT8,
  ...), which `contents_elements` hands on as `server.request.Elements`.
- A BYTES element travels as a 4-byte little-endian length and its bytes,
  elements back to back (`resnet_serve_client.bytes_tensor`, shared with the SDK).
- The classification extension turns a row of scores into ``k`` BYTES elements
  ``"<value>:<index>[:<label>]"``, best first, the value printed like C++'s
  ``std::to_string`` (six decimals) as Triton does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from resnet_serve_client import bytes_tensor

from server.request import Elements, Invalid
from server.tensors import (
    BYTES,
    DATATYPES,
    NUMPY_TO_DATATYPE,
    TensorError,
    check_shape,
    datatype,
    decode_elements,
    decode_raw,
)

__all__ = [
    "BYTES", "DATATYPES", "TensorError", "check_shape", "classification", "contents_elements",
    "datatype", "decode_contents", "decode_raw", "encode_raw",
]  # fmt: skip


class Contents(Protocol):
    """The typed contents of a tensor (``InferTensorContents``)."""

    def ListFields(self) -> list[tuple[Any, Any]]: ...


def contents_elements(tensor: str, type_name: str, contents: Contents) -> Elements | Invalid:
    """Typed ``contents`` as the neutral request's elements: the one field of the tensor's
    datatype (only its presence is checked here; validation counts and reads it)."""
    present = {field.name: values for field, values in contents.ListFields()}
    dt = DATATYPES.get(type_name)
    if dt is None:  # validation names the unknown datatype first
        return Elements((), "contents", flat=True)
    if not dt.contents_field:
        return Invalid(f"input '{tensor}': {dt.name} travels only in raw_input_contents")
    wrong = sorted(set(present) - {dt.contents_field})
    if wrong:
        return Invalid(
            f"input '{tensor}' is {dt.name}, whose contents go in '{dt.contents_field}', "
            f"but the request sets {', '.join(wrong)}"
        )
    return Elements(present.get(dt.contents_field, ()), f"'{dt.contents_field}'", flat=True)


def decode_contents(
    tensor: str, type_name: str, shape: Sequence[int], contents: Contents
) -> np.ndarray:
    """A tensor sent in typed ``contents``, read (validation's order: datatype, shape, the
    field, its count, the values)."""
    datatype(type_name)
    dims = check_shape(tensor, shape)
    elements = contents_elements(tensor, type_name, contents)
    if isinstance(elements, Invalid):
        raise TensorError(elements.message)
    return decode_elements(tensor, type_name, dims, elements.values, elements.where)


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
