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
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server import shared_memory
from server.protocols.v2 import tensors
from server.request import InferRequest, Invalid, Output, Tensor, TensorData
from server.shared_memory import SharedMemory
from server.validation import CLASSIFICATION

_NONE: frozenset[str] = frozenset()


def infer_request(message: Any, deadline: float | None) -> InferRequest:
    """The message as the neutral request (nothing checked against a model)."""
    return InferRequest(
        model=message.model_name,
        version=message.model_version,
        id=message.id,
        deadline=deadline,
        inputs=inputs(message),
        outputs=outputs(message),
    )


def inputs(message: Any) -> tuple[Tensor, ...]:
    return tuple(
        Tensor(t.name, t.datatype, tuple(t.shape), _data(message, t),
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


def _data(message: Any, tensor: Any) -> TensorData:
    """The input's raw contents or typed elements, as sent, or its shared-memory range
    (nothing read)."""
    has_contents = tensor.HasField("contents")
    region = _shared(f"input '{tensor.name}'", tensor.parameters)
    if region is not None:
        if message.raw_input_contents or has_contents:
            return Invalid(
                f"input '{tensor.name}' is in shared memory ('{shared_memory.REGION}') and also "
                "carries data in the request; send one or the other"
            )
        return region
    if message.raw_input_contents:
        if len(message.raw_input_contents) != len(message.inputs):
            return Invalid(
                f"raw_input_contents has {len(message.raw_input_contents)} entries for "
                f"{len(message.inputs)} input(s); it needs one per input, in order"
            )
        if has_contents:
            return Invalid(
                f"input '{tensor.name}' sets contents while the request uses raw_input_contents; "
                f"use one or the other"
            )
        return message.raw_input_contents[0]
    if not has_contents:
        return Invalid(
            f"input '{tensor.name}' carries no data; send it in raw_input_contents or contents"
        )
    return tensors.contents_elements(tensor.name, tensor.datatype, tensor.contents)
