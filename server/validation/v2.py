"""A v2 request's one input tensor and its requested outputs, checked against the model:
the declared datatype and shape before any data is read, then the data (raw bytes at
once, elements still `Unread`). A tensor in shared memory (`server.request.SharedRegion`)
is checked here, once, against the table and the tensor (registered, its range within the
region, its size the tensor's), then read from the region (`server.shared_memory`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Container, Sequence

import numpy as np

from server import tensors
from server.errors import InvalidInput
from server.repository import InputSpec, ModelConfig
from server.request import Elements, Invalid, Output, SharedRegion, Tensor, TensorData
from server.shared_memory import BYTE_SIZE, SharedMemory
from server.tensors import BYTES, TensorError
from server.validation.types import Inputs, Unread

GRAPH_DATATYPES = {"float32": "FP32", "uint8": "UINT8"}
CLASSIFICATION = "classification"
# A shared-memory input up to this size is read on the event loop (a few microseconds);
# a larger one on the preprocessing pool, as typed elements are.
INLINE_READ = 1 << 20


def input_datatype(config: ModelConfig) -> str:
    return GRAPH_DATATYPES[config.input.dtype]


def describe_input(config: ModelConfig) -> str:
    return (
        f"'{config.input.name}' as {input_datatype(config)} {config.input.shape()} "
        f"({config.input.layout}) or BYTES [-1] of encoded images"
    )


def tensor_inputs(
    inputs: Sequence[Tensor], config: ModelConfig, memory: SharedMemory | None = None
) -> Inputs:
    check_inputs([t.name for t in inputs], config)
    tensor = inputs[0]
    shape = check_declared(tensor.name, tensor.datatype, tensor.shape, tensor.parameters, config)
    return images_of(tensor.name, tensor.datatype, shape, tensor.data, memory)


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
    """What the request declares for the input, checked before any data is read: a known
    datatype, BYTES ``[N]``/``[N, 1]`` or the graph's own ``[N, *dims]``. The shape."""
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


def check_batch_shape(model: str, spec: InputSpec, shape: Sequence[int]) -> None:
    """A batch of the graph's input: [N, *the model's dimensions] with N >= 1."""
    expected = spec.shape()
    if len(shape) != 4 or list(shape[1:]) != expected[1:] or shape[0] < 1:
        raise InvalidInput(
            f"model {model} takes input of shape {expected} ({spec.layout}, "
            f"batch >= 1), got {list(shape)}"
        )


def images_of(
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    data: TensorData,
    memory: SharedMemory | None = None,
) -> Inputs:
    """The checked input as the request path takes it: encoded images (BYTES), or the graph's
    own batch from raw bytes or, still `Unread`, from elements or a large shared-memory
    range."""
    if isinstance(data, Invalid):
        raise TensorError(data.message)
    if isinstance(data, SharedRegion):
        ref, what = data, f"input '{name}'"
        table = _table(what, memory)
        table.region(what, ref)
        if datatype != BYTES:
            size = math.prod(shape) * tensors.datatype(datatype).dtype.itemsize
            if ref.byte_size != size:
                raise TensorError(
                    f"{what} is {datatype} {list(shape)}, {size} bytes, but its "
                    f"{BYTE_SIZE} is {ref.byte_size}; they must be equal"
                )
            if size > INLINE_READ:
                read = functools.partial(_read_raw, table, what, ref, name, datatype, shape)
                return Inputs(tensor=Unread(shape[0], read))
        data = table.read(what, ref)
    if isinstance(data, Elements):
        count = math.prod(shape)
        if data.flat and len(data.values) != count:
            raise TensorError(
                f"input '{name}' has shape {list(shape)} ({count} elements) but {data.where} "
                f"holds {len(data.values)}"
            )
        read = functools.partial(
            tensors.decode_elements, name, datatype, shape, data.values, data.where
        )
        if datatype == BYTES:  # N elements, N within max_images_per_request: cheap
            return Inputs(images=tuple(read().ravel().tolist()))
        return Inputs(tensor=Unread(shape[0], read))
    array = tensors.decode_raw(name, datatype, shape, data)
    if datatype == BYTES:
        return Inputs(images=tuple(array.ravel().tolist()))
    return Inputs(tensor=array)


def _read_raw(
    table: SharedMemory, what: str, ref: SharedRegion, name: str, datatype: str,
    shape: tuple[int, ...],
) -> np.ndarray:  # fmt: skip
    return tensors.decode_raw(name, datatype, shape, table.read(what, ref))


def _table(what: str, memory: SharedMemory | None) -> SharedMemory:
    if memory is None:
        raise TensorError(f"{what} refers to shared memory, which this server does not take")
    return memory


def check_outputs(
    outputs: Sequence[Output],
    config: ModelConfig,
    images: int = 0,
    memory: SharedMemory | None = None,
) -> tuple[Output, ...]:
    """The requested outputs, checked; none requested means the model's output as a tensor.
    An output into shared memory: its range within a registered region and, for the logits
    of `images` images, long enough to hold them."""
    checked: list[Output] = []
    for output in outputs:
        if output.invalid is not None and not output.name:
            raise TensorError(output.invalid.message)
        check_output(output.name, output.parameters, checked, config)
        if output.invalid is not None:
            raise TensorError(output.invalid.message)
        if output.classes is not None:
            classification_count(output.name, output.classes)
        if output.region is not None:
            what = f"output '{output.name}'"
            if output.classes is not None:
                raise TensorError(
                    f"{what} asks for '{CLASSIFICATION}' and shared memory; a classification "
                    "output goes in the response only (as Triton's), the tensor may go into "
                    "shared memory"
                )
            _table(what, memory).region(what, output.region)
            need = images * config.num_classes * 4
            if output.region.byte_size < need:
                raise TensorError(
                    f"{what} is FP32 [{images}, {config.num_classes}], {need} bytes, but its "
                    f"{BYTE_SIZE} is {output.region.byte_size}; give at least {need} bytes"
                )
        checked.append(output)
    return tuple(checked) or (Output(config.output.name),)


def check_output(
    name: str, parameters: Container[str], previous: Sequence[Output], config: ModelConfig
) -> None:
    """A requested output is the model's, requested once."""
    if name != config.output.name:
        raise TensorError(
            f"unknown output '{name}'; model '{config.name}' has one output "
            f"'{config.output.name}'"
        )
    if any(o.name == name for o in previous):
        raise TensorError(f"output '{name}' is requested more than once")


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
