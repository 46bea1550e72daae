"""The v2 gRPC codec: a ``ModelInferRequest`` decoded into the neutral
`server.request.InferRequest`, and a ``ModelInferResponse`` written from the result.

Every model here has one input and one output (`server.repository.config`):

- input ``images`` (the graph's input name) in one of two forms:
  the graph's own tensor, FP32 ``[N, 3, S, S]`` (NCHW) or UINT8 ``[N, S, S, 3]``
  (NHWC) for ``--input uint8`` graphs; or BYTES ``[N]`` (or ``[N, 1]``), each
  element an encoded image (JPEG, PNG, ...) that the server decodes and
  preprocesses exactly like ``Classify``;
- output ``logits``, FP32 ``[N, classes]``, or with the classification
  extension (output parameter ``classification: k``) BYTES ``[N, k]`` of
  ``"<value>:<index>:<label>"``, the value being the logit.

All tensors of a response travel in ``raw_output_contents``, as Triton sends them, except
an output the request puts in system shared memory (Triton's extension: the output's
parameters ``shared_memory_region``, ``shared_memory_byte_size``, optional
``shared_memory_offset``): its bytes go into the region and the response describes it
(name, datatype, shape) with an empty ``raw_output_contents`` entry, as Triton does. An
input with those parameters is read from its region (`server.shared_memory`) and carries
no data in the message.

Decoding reads nothing: raw contents stay the message's bytes, typed ``contents`` its
repeated field (`server.request.Elements`); what cannot be read at all (data in both
places, in neither, a non-integer classification count) travels as
`server.request.Invalid`. `server.validation` checks the request against the model
before any data is read.

A received message is `parse`d into a `Received`: a message of
``RAW_SPLIT_BYTES`` or more has its ``raw_input_contents`` entries taken as views of the
bytes gRPC received (found by the protobuf wire format's top-level fields: a tag, a
length, the bytes), and only its other fields parsed by protobuf. Parsing the whole
message copies each entry into protobuf's arena, and reading an entry copies it once
more; an input is then copied once, where it goes (a front end's slot, the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb

from server import shared_memory
from server.protocols.v2 import tensors
from server.request import InferRequest, Invalid, Output, Tensor, TensorData
from server.shared_memory import SharedMemory
from server.validation import CLASSIFICATION

_NONE: frozenset[str] = frozenset()

# A message this large or larger has its raw contents split off as it is received (`parse`);
# below it, copying them costs less than finding them.
RAW_SPLIT_BYTES = 32 * 1024
_RAW_FIELD = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


@dataclass(frozen=True, slots=True)
class Received:
    """A ModelInferRequest as received: the message, and its inputs' raw contents (the
    message's own ``raw_input_contents``, or views of the received bytes that `parse` took
    out of it)."""

    message: Any  # pb.ModelInferRequest
    raw: Sequence[bytes | memoryview]


def parse(data: bytes) -> Received:
    """gRPC's request deserializer for ModelInfer and ModelStreamInfer (see the module).
    A message whose top-level fields cannot be walked is parsed whole, as protobuf parses
    it (and refuses it) anyway."""
    split = None
    if len(data) >= RAW_SPLIT_BYTES:
        try:
            split = _split_raw(data)
        except IndexError:  # a varint that runs past the end
            split = None
    if split is None:
        message = pb.ModelInferRequest.FromString(data)
        return Received(message, message.raw_input_contents)
    rest, raw = split
    return Received(pb.ModelInferRequest.FromString(rest), raw)


def _split_raw(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """The message's bytes without its ``raw_input_contents`` fields, and those fields'
    contents as views of `data`, in order; None where the wire format is not as expected
    (a group, a length past the end)."""
    view = memoryview(data)
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    end = len(data)
    at = 0
    while at < end:
        start = at
        key, at = _varint(data, at)
        kind = key & 7
        if kind == _LENGTH_DELIMITED:
            length, at = _varint(data, at)
            if at + length > end:
                return None
            if key >> 3 == _RAW_FIELD:
                raw.append(view[at : at + length])
            else:
                rest.append(view[start : at + length])
            at += length
            continue
        if kind == _VARINT:
            _, at = _varint(data, at)
        elif kind == _FIXED64:
            at += 8
        elif kind == _FIXED32:
            at += 4
        else:
            return None
        rest.append(view[start:at])
    if at != end:
        return None
    return b"".join(rest), raw


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The base-128 varint at `at` and where the next field starts; IndexError past the
    end is the caller's to treat as malformed."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def infer_request(received: Received, deadline: float | None) -> InferRequest:
    """The message as the neutral request (nothing checked against a model)."""
    message = received.message
    return InferRequest(
        model=message.model_name,
        version=message.model_version,
        id=message.id,
        deadline=deadline,
        inputs=inputs(message, received.raw),
        outputs=outputs(message),
    )


def inputs(message: Any, raw: Sequence[bytes | memoryview] | None = None) -> tuple[Tensor, ...]:
    """The message's input tensors; their raw contents `raw`, by default the message's."""
    contents = message.raw_input_contents if raw is None else raw
    return tuple(
        Tensor(t.name, t.datatype, tuple(t.shape), _data(message, t, contents),
               frozenset(t.parameters) if t.parameters else _NONE)
        for t in message.inputs
    )


def outputs(message: Any) -> tuple[Output, ...]:
    found = []
    for requested in message.outputs:
        classes: int | None = None
        invalid = None
        if CLASSIFICATION in requested.parameters:
            parameter = requested.parameters[CLASSIFICATION]
            kind = parameter.WhichOneof("parameter_choice")
            if kind in ("int64_param", "uint64_param"):
                classes = int(getattr(parameter, kind))
            else:
                invalid = Invalid(
                    f"output '{requested.name}': parameter '{CLASSIFICATION}' must be an "
                    f"integer, got {kind or 'nothing'}"
                )
        region = _shared(f"output '{requested.name}'", requested.parameters)
        if isinstance(region, Invalid):
            invalid, region = invalid or region, None
        found.append(Output(requested.name, classes, parameters=frozenset(requested.parameters),
                            invalid=invalid, region=region))  # fmt: skip
    return tuple(found)


def _shared(what: str, parameters: Any) -> Any:
    """The shared-memory reference of a tensor's parameters (None: none)."""
    if not parameters or not any(p in parameters for p in shared_memory.PARAMETERS):
        return None
    values = {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
              for key, value in parameters.items() if key in shared_memory.PARAMETERS}  # fmt: skip
    return shared_memory.reference(what, values)


def output_arrays(
    outputs: tuple[Output, ...], logits: np.ndarray, labels: list[str]
) -> list[tuple[str, np.ndarray]]:
    """Each requested output of ``logits`` [N, classes]: the logits as FP32, or the
    classification extension's BYTES [N, k]."""
    arrays = []
    for output in outputs:
        if output.classes is None:
            array = np.ascontiguousarray(logits, dtype=np.float32)
        else:
            array = tensors.classification(logits, output.classes, labels)
        arrays.append((output.name, array))
    return arrays


def fill_response(
    response: Any,
    outputs: tuple[Output, ...],
    logits: np.ndarray,
    labels: list[str],
    memory: SharedMemory | None = None,
) -> None:
    """Add each requested output of ``logits`` [N, classes] to ``response``; one into shared
    memory is written there and its raw contents entry is empty."""
    for output, (name, array) in zip(outputs, output_arrays(outputs, logits, labels), strict=True):
        datatype, raw = tensors.encode_raw(array)
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        # one entry per output, empty for one in shared memory, as Triton's: clients find an
        # output's bytes by its position (perf_analyzer's C++ client reads the entry unchecked)
        response.raw_output_contents.append(b"" if write_shared(memory, output, raw) else raw)


def write_shared(memory: SharedMemory | None, output: Output, raw: bytes) -> bool:
    """Write an output's bytes into its shared-memory range, if it has one; whether it did."""
    if output.region is None:
        return False
    assert memory is not None  # validation refused the request otherwise
    memory.write(f"output '{output.name}'", output.region, raw)
    return True


def _data(message: Any, tensor: Any, raw: Sequence[bytes | memoryview]) -> TensorData:
    """The input's raw contents or typed elements, as sent, or its shared-memory range
    (nothing read)."""
    has_contents = tensor.HasField("contents")
    region = _shared(f"input '{tensor.name}'", tensor.parameters)
    if region is not None:
        if raw or has_contents:
            return Invalid(
                f"input '{tensor.name}' is in shared memory ('{shared_memory.REGION}') and also "
                "carries data in the request; send one or the other"
            )
        return region
    if raw:
        if len(raw) != len(message.inputs):
            return Invalid(
                f"raw_input_contents has {len(raw)} entries for "
                f"{len(message.inputs)} input(s); it needs one per input, in order"
            )
        if has_contents:
            return Invalid(
                f"input '{tensor.name}' sets contents while the request uses raw_input_contents; "
                f"use one or the other"
            )
        return raw[0]
    if not has_contents:
        return Invalid(
            f"input '{tensor.name}' carries no data; send it in raw_input_contents or contents"
        )
    return tensors.contents_elements(tensor.name, tensor.datatype, tensor.contents)
