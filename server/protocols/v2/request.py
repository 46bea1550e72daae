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

from collections.abc import Callable, Container, Sequence
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
    check_inputs([i.name for i in request.inputs], config)
    tensor = request.inputs[0]
    shape = check_declared(tensor.name, tensor.datatype, tensor.shape, tensor.parameters, config)
    return images_of(tensor.name, tensor.datatype, shape, _data(request, tensor))


def check_inputs(names: list[str], config: ModelConfig) -> None:
    """A request names exactly one input, the model's."""
    if len(names) != 1:
        got = ", ".join(f"'{n}'" for n in names) or "none"
        raise TensorError(
            f"model '{config.name}' takes exactly one input, {describe_input(config)}; got {got}"
        )
    if names[0] != config.input.name:
        raise TensorError(
            f"unknown input '{names[0]}'; model '{config.name}' takes {describe_input(config)}"
        )


def check_declared(
    name: str,
    datatype: str,
    declared: Sequence[int],
    parameters: Container[str],
    config: ModelConfig,
) -> tuple[int, ...]:
    """What the request declares for the input, checked before any data is read: no shared
    memory, a known datatype, BYTES ``[N]``/``[N, 1]`` or the graph's own ``[N, *dims]``.
    The shape."""
    no_shared_memory(f"input '{name}'", parameters)
    tensors.datatype(datatype)
    shape = tensors.check_shape(name, declared)
    if datatype == BYTES:
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
            raise TensorError(
                f"input '{name}' (BYTES) has shape {list(shape)}; encoded images go in "
                f"shape [N] or [N, 1] with N >= 1"
            )
    else:
        if datatype != input_datatype(config):
            raise TensorError(
                f"input '{name}' is {datatype}; model '{config.name}' takes "
                f"{describe_input(config)}"
            )
        check_batch_shape(config.name, config.input, shape)
    return shape


def images_of(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    data: bytes | memoryview | Callable[[], np.ndarray],
) -> Inputs:
    """The checked input as the request path takes it: encoded images (BYTES), or the graph's
    own batch from raw bytes or, still `Unread`, from a reader of typed contents."""
    if datatype == BYTES:
        # N elements, N within max_images_per_request (checked by the request path): cheap
        array = data() if callable(data) else tensors.decode_raw(name, BYTES, shape, data)
        return Inputs(images=tuple(array.ravel().tolist()))
    if callable(data):
        return Inputs(tensor=Unread(shape[0], data))
    return Inputs(tensor=tensors.decode_raw(name, datatype, shape, data))


def parse_outputs(request: Any, config: ModelConfig) -> list[Output]:
    """The requested outputs; none requested means the model's output as a tensor."""
    outputs: list[Output] = []
    for requested in request.outputs:
        check_output(requested.name, requested.parameters, outputs, config)
        outputs.append(Output(requested.name, _classes(requested)))
    return outputs or [Output(config.output.name)]


def check_output(
    name: str, parameters: Container[str], previous: list[Output], config: ModelConfig
) -> None:
    """A requested output is the model's, requested once, without shared memory."""
    if name != config.output.name:
        raise TensorError(
            f"unknown output '{name}'; model '{config.name}' has one output "
            f"'{config.output.name}'"
        )
    if any(o.name == name for o in previous):
        raise TensorError(f"output '{name}' is requested more than once")
    no_shared_memory(f"output '{name}'", parameters)


def classification_count(output: str, count: object) -> int:
    """The classification extension's k, checked: an integer >= 1."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TensorError(
            f"output '{output}': parameter '{CLASSIFICATION}' must be an integer, "
            f"got {type(count).__name__}"
        )
    if count < 1:
        raise TensorError(
            f"output '{output}': parameter '{CLASSIFICATION}' must be >= 1, got {count}"
        )
    return count


def output_arrays(
    outputs: list[Output], logits: np.ndarray, labels: list[str]
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
    response: Any, outputs: list[Output], logits: np.ndarray, labels: list[str]
) -> None:
    """Add each requested output of ``logits`` [N, classes] to ``response``."""
    for name, array in output_arrays(outputs, logits, labels):
        datatype, raw = tensors.encode_raw(array)
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
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
    return classification_count(requested.name, int(getattr(parameter, kind)))


def no_shared_memory(what: str, parameters: Any) -> None:
    if not parameters:  # the usual case: no parameters at all
        return
    used = [p for p in _SHARED_MEMORY if p in parameters]
    if used:
        raise TensorError(
            f"{what} uses {', '.join(used)}; this server does not support the shared-memory "
            f"extension, send tensors in the request"
        )
