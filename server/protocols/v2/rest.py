"""The v2 protocol's HTTP/REST bodies: an inference request read, its response written, and
the metadata messages as Triton's JSON.

An inference request is a JSON object, optionally followed by binary tensor data
(Triton's binary-tensor extension): the header ``Inference-Header-Content-Length``
says how many bytes of the body are JSON; each input whose ``parameters`` hold
``binary_data_size`` takes that many bytes of what follows, in the order of the
inputs. An input without it carries its elements in ``data`` (row-major, flat or
nested; BYTES elements as strings).

The response puts an output in binary when the request asks for it (the output's
``binary_data`` parameter, else the request's ``binary_data_output``), else in
JSON ``data``; with any binary output, ``Inference-Header-Content-Length`` tells
the client where the JSON ends.

Triton's system shared-memory extension: an input or output whose ``parameters`` hold
``shared_memory_region`` and ``shared_memory_byte_size`` (``shared_memory_offset``
optional) is read from (written into) that registered region; such an input carries no
``data`` and no binary data, such an output is described without data.

A body is decoded into the neutral `server.request.InferRequest` (binary data as its
bytes, JSON ``data`` as elements); what a model accepts (one input, its datatype and
shape, the classification extension's count, BYTES framing, raw tensor sizes) is
`server.validation`'s. Errors are `TensorError` (INVALID_ARGUMENT, HTTP 400) saying
what was wrong.

The JSON is read by Python's parser within two limits checked first: nesting at most
`MAX_DEPTH` deep (brackets outside strings counted at C speed before parsing, so a body
of 100,000 ``[`` costs a scan, not a recursion), and integers of at most
``sys.get_int_max_str_digits()`` digits (4300; Python's own limit, answered as the
caller's error). Parsing costs about 25 ms of CPU per MB of JSON, and memory up to about
24 times the JSON's size (a Python object per element: ``[],`` is 3 bytes of JSON and 64
of list); binary tensor data is not parsed at all. A body over `OFF_LOOP_BYTES` (1 MiB) is
parsed on a worker thread in short steps (`server.protocols.v2.json_steps`: `json.loads`
would hold the GIL throughout), so the event loop answers other callers meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from server import shared_memory
from server.protocols.v2 import json_steps, tensors
from server.protocols.v2.tensors import BYTES, TensorError
from server.request import Elements, InferRequest, Invalid, Output, SharedRegion, TensorData
from server.request import Tensor as NeutralTensor
from server.validation import CLASSIFICATION

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data_output"
BINARY_DATA = "binary_data"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
OFF_LOOP_BYTES = 1 << 20  # a larger JSON body is parsed on a worker thread, in steps
MAX_DEPTH = 64  # JSON nesting: a tensor's data nests once per dimension, inside 3 levels


@dataclass(frozen=True)
class Tensor:
    """One input of a request, its data still as sent."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any]
    binary: memoryview | None = None  # its bytes after the JSON (binary-tensor extension)
    data: Any = None  # its JSON ``data``
    region: SharedRegion | None = None  # its range of a shared-memory region


@dataclass(frozen=True)
class InferBody:
    """An inference request's body, read: its id, inputs and requested outputs."""

    id: str
    inputs: list[Tensor]
    outputs: list[dict[str, Any]]
    binary_output: bool  # the request's ``binary_data_output``: the default for every output
    parameters: dict[str, Any] = field(default_factory=dict)

    def request(self, model: str, version: str) -> InferRequest:
        """The body as the neutral request (nothing checked against a model; JSON ``data``
        stays elements, read on the preprocessing pool)."""
        return InferRequest(
            model=model,
            version=version,
            id=self.id,
            inputs=tuple(
                NeutralTensor(t.name, t.datatype, tuple(t.shape), _tensor_data(t),
                              frozenset(t.parameters))
                for t in self.inputs
            ),
            outputs=tuple(self._output(requested) for requested in self.outputs),
        )  # fmt: skip

    def binary(self, outputs: tuple[Output, ...]) -> list[bool]:
        """Whether each output goes back in binary (the request's default for the model's
        output when none was asked)."""
        return [o.binary for o in outputs] if self.outputs else [self.binary_output]

    def _output(self, requested: Any) -> Output:
        try:
            name = _string(requested if isinstance(requested, dict) else {}, "name", "output")
        except TensorError as exc:
            return Output("", invalid=Invalid(str(exc)))
        try:
            parameters = _object(requested.get("parameters", {}), f"output '{name}' parameters")
            binary = _flag(parameters, BINARY_DATA, self.binary_output, f"output '{name}'")
        except TensorError as exc:
            return Output(name, invalid=Invalid(str(exc)))
        region = shared_memory.reference(f"output '{name}'", parameters)
        if isinstance(region, Invalid):
            return Output(name, invalid=region)
        return Output(name, parameters.get(CLASSIFICATION), binary, frozenset(parameters),
                      region=region)  # fmt: skip


def _tensor_data(tensor: Tensor) -> TensorData:
    if tensor.region is not None:
        return tensor.region
    if tensor.binary is not None:
        return tensor.binary
    data = tensor.data
    return Elements(data if isinstance(data, list) else [data], "'data'")


async def read_infer(body: bytes, header_length: str | None) -> InferBody:
    """`parse_infer`, on a worker thread in short steps (`json_steps`) for a body over
    `OFF_LOOP_BYTES`, so other callers are answered meanwhile."""
    if len(body) <= OFF_LOOP_BYTES:
        return parse_infer(body, header_length)
    return await asyncio.to_thread(parse_infer, body, header_length, steps=True)


async def read_object(body: bytes) -> dict[str, Any]:
    """`parse_object` (an empty body: {}), off the event loop as `read_infer`."""
    if not body.strip():
        return {}
    if len(body) <= OFF_LOOP_BYTES:
        return parse_object(body)
    return await asyncio.to_thread(parse_object, body, steps=True)


def parse_infer(body: bytes, header_length: str | None, *, steps: bool = False) -> InferBody:
    """Read an inference request's body; ``header_length`` is the value of the
    ``Inference-Header-Content-Length`` header (None: the whole body is JSON)."""
    view = memoryview(body)
    json_end = len(view)
    if header_length is not None:
        try:
            json_end = int(header_length)
        except ValueError:
            shown = header_length if len(header_length) <= 40 else f"{header_length[:40]}..."
            raise TensorError(f"{HEADER_LENGTH} is {shown!r}; it must be a byte count") from None
        if not 0 <= json_end <= len(view):
            raise TensorError(f"{HEADER_LENGTH} is {json_end} but the body has {len(view)} bytes")
    text = body if json_end == len(view) else view[:json_end]  # the whole body: no copy
    header = _object(_json(text, steps), "the request body")
    parameters = _object(header.get("parameters", {}), "request parameters")
    binary_output = _flag(parameters, BINARY_OUTPUT, False, "the request")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise TensorError("the request body needs 'inputs', a list of tensors")
    inputs = _inputs(raw_inputs, view[json_end:])
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise TensorError("'outputs' must be a list")
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise TensorError("'id' must be a string")
    return InferBody(request_id, inputs, outputs, binary_output, parameters)


def _inputs(raw_inputs: list[Any], binary: memoryview) -> list[Tensor]:
    """The inputs of the JSON header, each with its ``data`` or its share of the binary
    data after the JSON (in the order of the inputs, every byte of it claimed)."""
    offset = 0
    inputs = []
    for index, item in enumerate(raw_inputs):
        tensor = _object(item, f"input {index}")
        name = _string(tensor, "name", f"input {index}")
        datatype = _string(tensor, "datatype", f"input '{name}'")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise TensorError(f"input '{name}': 'shape' must be a list of integers")
        tensor_parameters = _object(tensor.get("parameters", {}), f"input '{name}' parameters")
        region = shared_memory.reference(f"input '{name}'", tensor_parameters)
        if isinstance(region, Invalid):
            raise TensorError(region.message)
        if region is not None:
            if "data" in tensor or BINARY_SIZE in tensor_parameters:
                raise TensorError(
                    f"input '{name}' is in shared memory ('{shared_memory.REGION}') and also "
                    f"carries 'data' or '{BINARY_SIZE}'; send one or the other"
                )
            inputs.append(Tensor(name, datatype, shape, tensor_parameters, region=region))
            continue
        size = tensor_parameters.get(BINARY_SIZE)
        if size is None:
            if "data" not in tensor:
                raise TensorError(
                    f"input '{name}' carries no data; send it in 'data' or as binary data "
                    f"with the parameter '{BINARY_SIZE}'"
                )
            inputs.append(Tensor(name, datatype, shape, tensor_parameters, data=tensor["data"]))
            continue
        if not _is_int(size) or size < 0:
            raise TensorError(f"input '{name}': '{BINARY_SIZE}' must be an integer >= 0")
        if "data" in tensor:
            raise TensorError(f"input '{name}' has both 'data' and '{BINARY_SIZE}'; send one")
        if offset + size > len(binary):
            raise TensorError(
                f"input '{name}' declares {size} bytes of binary data at byte {offset} after "
                f"the JSON, but only {len(binary) - offset} remain"
            )
        inputs.append(Tensor(name, datatype, shape, tensor_parameters,
                             binary=binary[offset : offset + size]))  # fmt: skip
        offset += size
    if offset != len(binary):
        raise TensorError(
            f"{len(binary)} bytes follow the JSON but the inputs declare {offset} "
            f"({HEADER_LENGTH} counts the JSON alone)"
        )
    return inputs


def parse_object(body: bytes, *, steps: bool = False) -> dict[str, Any]:
    """A body that must be one JSON object."""
    return _object(_json(body, steps), "the request body")


def write_infer(
    model: str,
    version: str,
    request_id: str,
    outputs: list[tuple[str, np.ndarray, bool | None]],
) -> tuple[bytes, int | None]:
    """The response body for ``(name, array, binary)`` outputs (binary None: the output went
    into shared memory, described without data), and the JSON's length when binary data
    follows it (for ``Inference-Header-Content-Length``)."""
    described = []
    chunks = []
    for name, array, binary in outputs:
        datatype, raw = tensors.encode_raw(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary is None:
            pass
        elif binary:
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        elif datatype == BYTES:
            entry["data"] = [e.decode("utf-8", "replace") for e in array.ravel().tolist()]
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id:
        response["id"] = request_id
    response["outputs"] = described
    header = dumps(response)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def message_json(message: Message) -> dict[str, Any]:
    """A v2 response message as Triton's HTTP JSON: field names as in the .proto, every
    field present, 64-bit integers as numbers (protobuf's JSON writes them as strings)."""
    value = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message.DESCRIPTOR, value)
    return value


_INT64 = {
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def _numbers(message: descriptor.Descriptor, value: dict[str, Any]) -> None:
    for f in message.fields:
        if f.name not in value:
            continue
        item = value[f.name]
        entry = f.message_type
        if entry is not None and entry.GetOptions().map_entry:
            mapped = entry.fields_by_name["value"]
            for key, element in item.items():
                if mapped.message_type is not None:
                    _numbers(mapped.message_type, element)
                elif mapped.type in _INT64:
                    item[key] = int(element)
        elif entry is not None:
            for element in item if isinstance(item, list) else [item]:
                if isinstance(element, dict):
                    _numbers(entry, element)
        elif f.type in _INT64:
            value[f.name] = [int(e) for e in item] if isinstance(item, list) else int(item)


def _json(data: bytes | memoryview, steps: bool = False) -> Any:
    text = data if isinstance(data, bytes) else bytes(data)
    _check_depth(text)
    try:
        return json_steps.loads(text) if steps else json.loads(text)
    except UnicodeDecodeError:
        raise TensorError(
            "the request's JSON is not UTF-8 (binary data without "
            f"{HEADER_LENGTH} saying where the JSON ends?)"
        ) from None
    except json.JSONDecodeError as exc:
        raise TensorError(f"the request body is not valid JSON: {exc}") from None
    except ValueError:  # the one other: an integer past Python's limit on digits
        raise TensorError(
            f"the request body holds an integer of more than {sys.get_int_max_str_digits()} "
            "digits"
        ) from None
    except RecursionError:  # not reached below MAX_DEPTH; kept as the caller's error
        raise TensorError(f"the request's JSON nests deeper than {MAX_DEPTH} levels") from None


_NESTING = np.zeros(256, np.int8)
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1
_SCAN_BYTES = 1 << 20
_QUOTE = ord('"')


def _check_depth(text: bytes) -> None:
    """Refuse JSON nested deeper than `MAX_DEPTH` before it is parsed: the brackets outside
    strings, counted with numpy 1 MiB at a time (a copy of the text when it holds
    backslashes, a few MiB of scratch). Escapes first: left to right, a backslash pair and
    an escaped quote are two characters of a string, never a quote."""
    if text.count(b"[") + text.count(b"{") <= MAX_DEPTH:
        return
    if b"\\" in text:
        text = text.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    data = np.frombuffer(text, np.uint8)
    depth, in_string = 0, False
    for start in range(0, data.size, _SCAN_BYTES):
        chunk = data[start : start + _SCAN_BYTES]
        nesting = np.take(_NESTING, chunk)
        quotes = chunk == _QUOTE
        odd = bool(np.count_nonzero(quotes) & 1)
        if in_string or odd or quotes.any():  # inside a string: after an odd count of quotes
            inside = (np.cumsum(quotes, dtype=np.uint8) & 1).view(bool)
            nesting[inside != in_string] = 0
        steps = nesting[nesting != 0]
        if steps.size:
            levels = np.cumsum(steps, dtype=np.int32)
            if depth + int(levels.max()) > MAX_DEPTH:
                raise TensorError(f"the request's JSON nests deeper than {MAX_DEPTH} levels")
            depth += int(levels[-1])
        in_string ^= odd


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TensorError(f"{what} must be a JSON object")
    return value


def _string(value: dict[str, Any], key: str, what: str) -> str:
    found = value.get(key)
    if not isinstance(found, str):
        raise TensorError(f"{what} needs '{key}', a string")
    return found


def _flag(parameters: dict[str, Any], key: str, default: bool, what: str) -> bool:
    found = parameters.get(key, default)
    if not isinstance(found, bool):
        raise TensorError(f"{what}: parameter '{key}' must be true or false")
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
