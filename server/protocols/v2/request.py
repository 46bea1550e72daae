"""A v2 ``ModelInferRequest`` read against one model, and its ``ModelInferResponse`` written.

Every model here has one input and one output (`server.repository.config`):

- input ``images`` (the graph's input name) in one of two forms:
  the graph's own tensor, FP32 ``[N, 3, S, S]`` (NCHW) or UINT8 ``[N, S, S, 3]``
  (NHWC) for ``--input uint8`` graphs; or BYTES ``[N]`` (or ``[N, 1]``), each
  element an encoded image (JPEG, PNG, ...) that the server decodes and
  preprocesses exactly like ``Classify``;
- output ``logits``, FP32 ``[N, classes]``, or with the classification
  extension (output parameter ``classification: k``) BYTES ``[N, k]`` of
  ``"<value>:<index>:<label>"``, the value being the logit.

All tensors of a response travel in ``raw_output_contents``, as Triton sends them.

Limits come before work: the request path has checked the declared batch (the input's
first dimension) against ``max_images_per_request``; here the datatype and the whole
shape are checked against the model — BYTES ``[N]``/``[N, 1]``, the graph's
``[N, *dims]`` — before any data is read, so what is read is bounded by the declared
batch. A BYTES buffer is split no further than one element past the shape, and typed
``contents`` are read into an array on the preprocessing pool (`Unread`), not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.models import check_batch_shape
from server.protocols.v2 import tensors
from server.protocols.v2.tensors import BYTES, TensorError
from server.repository import ModelConfig
from server.request_path import Inputs, Unread

GRAPH_DATATYPES = {"float32": "FP32", "uint8": "UINT8"}
CLASSIFICATION = "classification"
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass(frozen=True)
class Output:
    name: str
    classes: int | None = None  # the classification extension's k


def input_datatype(config: ModelConfig) -> str:
    return GRAPH_DATATYPES[config.input.dtype]


def describe_input(config: ModelConfig) -> str:
    return (
        f"'{config.input.name}' as {input_datatype(config)} {config.input.shape()} "
        f"({config.input.layout}) or BYTES [-1] of encoded images"
    )


def parse_images(request: Any, config: ModelConfig) -> Inputs:
    """The request's one input: the graph's own batch (its typed contents still `Unread`),
    or encoded images; everything declared is checked before any data is read."""
    if len(request.inputs) != 1:
        got = ", ".join(f"'{i.name}'" for i in request.inputs) or "none"
        raise TensorError(
            f"model '{config.name}' takes exactly one input, {describe_input(config)}; got {got}"
        )
    tensor = request.inputs[0]
    if tensor.name != config.input.name:
        raise TensorError(
            f"unknown input '{tensor.name}'; model '{config.name}' takes {describe_input(config)}"
        )
    _no_shared_memory(f"input '{tensor.name}'", tensor.parameters)
    # what is declared, before any data is read
    tensors.datatype(tensor.datatype)
    shape = tensors.check_shape(tensor.name, tensor.shape)
    if tensor.datatype == BYTES:
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
            raise TensorError(
                f"input '{tensor.name}' (BYTES) has shape {list(shape)}; encoded images go in "
                f"shape [N] or [N, 1] with N >= 1"
            )
    else:
        if tensor.datatype != input_datatype(config):
            raise TensorError(
                f"input '{tensor.name}' is {tensor.datatype}; model '{config.name}' takes "
                f"{describe_input(config)}"
            )
        check_batch_shape(config.name, config.input, shape)
    data = _data(request, tensor)
    if tensor.datatype == BYTES:
        # N elements, N within max_images_per_request (checked by the request path): cheap
        array = data() if callable(data) else tensors.decode_raw(tensor.name, BYTES, shape, data)
        return Inputs(images=tuple(array.ravel().tolist()))
    if callable(data):
        return Inputs(tensor=Unread(shape[0], data))
    return Inputs(tensor=tensors.decode_raw(tensor.name, tensor.datatype, shape, data))


def parse_outputs(request: Any, config: ModelConfig) -> list[Output]:
    """The requested outputs; none requested means the model's output as a tensor."""
    if not request.outputs:
        return [Output(config.output.name)]
    outputs: list[Output] = []
    for requested in request.outputs:
        if requested.name != config.output.name:
            raise TensorError(
                f"unknown output '{requested.name}'; model '{config.name}' has one output "
                f"'{config.output.name}'"
            )
        if any(o.name == requested.name for o in outputs):
            raise TensorError(f"output '{requested.name}' is requested more than once")
        _no_shared_memory(f"output '{requested.name}'", requested.parameters)
        outputs.append(Output(requested.name, _classes(requested)))
    return outputs


def fill_response(
    response: Any, outputs: list[Output], logits: np.ndarray, labels: list[str]
) -> None:
    """Add each requested output of ``logits`` [N, classes] to ``response``."""
    for output in outputs:
        if output.classes is None:  # the logits' own bytes: float32 rows, as the session gave
            array = np.ascontiguousarray(logits, dtype="<f4")
            datatype, raw = "FP32", array.tobytes()
        else:
            array = tensors.classification(logits, output.classes, labels)
            datatype, raw = tensors.encode_raw(array)
        response.outputs.add(name=output.name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(raw)


def _data(request: Any, tensor: Any) -> bytes | Callable[[], np.ndarray]:
    """The input's raw contents, or the reader of its typed contents (checked, not read)."""
    has_contents = tensor.HasField("contents")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise TensorError(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                f"{len(request.inputs)} input(s); it needs one per input, in order"
            )
        if has_contents:
            raise TensorError(
                f"input '{tensor.name}' sets contents while the request uses raw_input_contents; "
                f"use one or the other"
            )
        return request.raw_input_contents[0]
    if not has_contents:
        raise TensorError(
            f"input '{tensor.name}' carries no data; send it in raw_input_contents or contents"
        )
    return tensors.contents_reader(tensor.name, tensor.datatype, tensor.shape, tensor.contents)


def _classes(requested: Any) -> int | None:
    if CLASSIFICATION not in requested.parameters:
        return None
    parameter = requested.parameters[CLASSIFICATION]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise TensorError(
            f"output '{requested.name}': parameter '{CLASSIFICATION}' must be an integer, "
            f"got {kind or 'nothing'}"
        )
    count = getattr(parameter, kind)
    if count < 1:
        raise TensorError(
            f"output '{requested.name}': parameter '{CLASSIFICATION}' must be >= 1, got {count}"
        )
    return int(count)


def _no_shared_memory(what: str, parameters: Any) -> None:
    if not parameters:  # the usual case: no parameters at all
        return
    used = [p for p in _SHARED_MEMORY if p in parameters]
    if used:
        raise TensorError(
            f"{what} uses {', '.join(used)}; this server does not support the shared-memory "
            f"extension, send tensors in the request"
        )
