"""What a model accepts: the one place a request is checked against the model it names.

`accept` takes a neutral `InferRequest` (`server.request`) and the model's config, and
returns the request's `Inputs` (encoded files, pixels, or the graph's own batch, bounded
and of the model's dtype and shape) and what the caller asked back (top-k or v2
outputs). Adapters only decode their wire format; the request path and the engine take
what this module returns and never check it again. Limits come before work: the
declared images against ``max_images_per_request`` and the model's queue, then the
declared datatype and shape, and only then is any data read (typed elements on the
preprocessing pool, `Unread`). Every error is `InvalidInput` (INVALID_ARGUMENT, HTTP
400) saying what was wrong and what is allowed.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import numpy as np

from server import tensors
from server.errors import InvalidInput
from server.repository import InputSpec, ModelConfig
from server.request import (
    Elements,
    InferRequest,
    Invalid,
    Output,
    Pixels,
    Tensor,
    TensorData,
)
from server.tensors import BYTES, TensorError

DEFAULT_TOP_K = 5
MAX_REQUEST_ID = 128
GRAPH_DATATYPES = {"float32": "FP32", "uint8": "UINT8"}
CLASSIFICATION = "classification"
SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")


@dataclass(frozen=True)
class Limits:
    """The server's limits on one request (from `server.config.Settings`)."""

    max_images: int
    max_image_pixels: int
    reject_non_finite: bool = False


@dataclass(frozen=True, slots=True)
class Unread:
    """The graph's own batch of `images`, checked against its declared shape but still to be
    read by the blocking `read` (typed elements: about 0.1 s per million values), which
    runs on the preprocessing pool."""

    images: int
    read: Callable[[], np.ndarray]


# One accepted image: an encoded file, uint8 pixels [H, W, 3] to resize, or a float32
# [C, H, W] tensor of the model's size.
Accepted = bytes | np.ndarray


@dataclass(slots=True)
class Inputs:
    """The images of one request, accepted: prepared one by one, or the graph's own batch."""

    images: Sequence[Accepted] = ()
    tensor: np.ndarray | Unread | None = None

    def __len__(self) -> int:
        if isinstance(self.tensor, Unread):
            return self.tensor.images
        return len(self.tensor) if self.tensor is not None else len(self.images)

    @property
    def sent_tensors(self) -> bool:
        """Whether the caller sent tensors (the graph's batch or pixels), not files."""
        return self.tensor is not None or not all(isinstance(i, bytes) for i in self.images)


@dataclass(slots=True)
class Checked:
    """A request as the model accepts it: its inputs, and what goes back (the top-k of a
    classify request; a v2 request's outputs, the model's output when none was asked)."""

    inputs: Inputs
    top_k: int = DEFAULT_TOP_K
    outputs: tuple[Output, ...] = ()


def check_request_id(request_id: str) -> str:
    """The caller's request id as given, or `InvalidInput` saying what is allowed."""
    if _REQUEST_ID.fullmatch(request_id) is None:
        raise InvalidInput(
            f"request id of {len(request_id)} characters is not allowed: send 1 to "
            f"{MAX_REQUEST_ID} visible ASCII characters (letters, digits, punctuation; no "
            f"spaces or control characters), or none to have one made"
        )
    return request_id


def accept(request: InferRequest, config: ModelConfig, limits: Limits) -> Checked:
    """`request` checked against the model `config` and `limits` (see the module)."""
    declared = request.declared_images()
    check_limit(declared, limits)
    check_queue(declared, config)
    if request.classify:
        top_k = check_top_k(request.top_k or 0, config)
        inputs = Inputs(images=[_image(i, image, config, limits)
                                for i, image in enumerate(request.images)])  # fmt: skip
        checked = Checked(inputs, top_k=top_k)
    else:
        inputs = tensor_inputs(request.inputs, config)
        checked = Checked(inputs, outputs=check_outputs(request.outputs, config))
    count = len(inputs)
    if inputs.tensor is None and count == 0:
        raise InvalidInput(f"request has no images; send 1 to {limits.max_images}")
    check_limit(count, limits)
    return checked


def check_limit(count: int, limits: Limits) -> None:
    if count > limits.max_images:
        raise InvalidInput(
            f"request has {count} images; at most {limits.max_images} are allowed"
        )


def check_queue(count: int, config: ModelConfig) -> None:
    """A request no larger than the model's queue (it could never be queued whole)."""
    limit = config.batching.max_queue_size
    if count > limit:
        raise InvalidInput(
            f"{count} images in one request; model {config.name} queues at most {limit}"
        )


def check_top_k(k: int, config: ModelConfig) -> int:
    classes = config.num_classes
    if not 1 <= k <= classes:
        raise InvalidInput(f"top_k is {k}; allowed: 1 to {classes} (model {config.name})")
    return k


def check_finite(batch: np.ndarray) -> None:
    """A float batch the caller sent holds no NaN or Inf (``reject_non_finite``)."""
    if batch.dtype.kind == "f" and not np.isfinite(batch).all():
        raise InvalidInput(
            "input holds NaN or Inf values; this server takes only finite values "
            "(reject_non_finite)"
        )


# classify: encoded files and pixels


def _image(index: int, image: bytes | Pixels | Invalid, config: ModelConfig,
           limits: Limits) -> Accepted:  # fmt: skip
    if isinstance(image, bytes):
        return image
    try:
        if isinstance(image, Invalid):
            raise InvalidInput(image.message)
        return pixels(image, config, limits)
    except InvalidInput as exc:
        raise InvalidInput(f"image {index}: {exc}") from None


def pixels(image: Pixels, config: ModelConfig, limits: Limits) -> np.ndarray:
    """An image sent as pixels: uint8 [H, W, 3] (any size, resized by preprocessing) or,
    for a float32 model, float32 [C, S, S] as the graph takes it."""
    shape = list(image.shape)
    spec = config.input
    if image.dtype == "uint8":
        if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
            raise InvalidInput(f"uint8 tensor shape is {shape}; expected [height, width, 3]")
        count = shape[0] * shape[1]
        if count > limits.max_image_pixels:
            raise InvalidInput(
                f"uint8 tensor has {count} pixels; at most {limits.max_image_pixels} allowed"
            )
        return _from_bytes(image.data, np.uint8, shape)
    if image.dtype == "float32":
        if spec.dtype != "float32":
            raise InvalidInput(
                f"model {config.name} takes uint8 pixels; send encoded images or uint8 tensors"
            )
        expected = [spec.channels, spec.size, spec.size]
        if shape != expected:
            raise InvalidInput(
                f"float32 tensor shape is {shape}; model {config.name} takes {expected} (CHW)"
            )
        return _from_bytes(image.data, np.dtype("<f4"), shape).astype(np.float32, copy=False)
    raise InvalidInput("tensor dtype is unset; use UINT8 (HWC) or FLOAT32 (CHW)")


def _from_bytes(data: bytes, dtype: np.dtype | type, shape: list[int]) -> np.ndarray:
    dtype = np.dtype(dtype)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"tensor data has {len(data)} bytes; shape {shape} of {dtype.name} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# v2: the one input tensor


def input_datatype(config: ModelConfig) -> str:
    return GRAPH_DATATYPES[config.input.dtype]


def describe_input(config: ModelConfig) -> str:
    return (
        f"'{config.input.name}' as {input_datatype(config)} {config.input.shape()} "
        f"({config.input.layout}) or BYTES [-1] of encoded images"
    )


def tensor_inputs(inputs: Sequence[Tensor], config: ModelConfig) -> Inputs:
    check_inputs([t.name for t in inputs], config)
    tensor = inputs[0]
    shape = check_declared(tensor.name, tensor.datatype, tensor.shape, tensor.parameters, config)
    return images_of(tensor.name, tensor.datatype, shape, tensor.data)


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


def check_batch_shape(model: str, spec: InputSpec, shape: Sequence[int]) -> None:
    """A batch of the graph's input: [N, *the model's dimensions] with N >= 1."""
    expected = spec.shape()
    if len(shape) != 4 or list(shape[1:]) != expected[1:] or shape[0] < 1:
        raise InvalidInput(
            f"model {model} takes input of shape {expected} ({spec.layout}, "
            f"batch >= 1), got {list(shape)}"
        )


def images_of(name: str, datatype: str, shape: tuple[int, ...], data: TensorData) -> Inputs:
    """The checked input as the request path takes it: encoded images (BYTES), or the graph's
    own batch from raw bytes or, still `Unread`, from elements."""
    if isinstance(data, Invalid):
        raise TensorError(data.message)
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


# v2: the outputs


def check_outputs(outputs: Sequence[Output], config: ModelConfig) -> tuple[Output, ...]:
    """The requested outputs, checked; none requested means the model's output as a tensor."""
    checked: list[Output] = []
    for output in outputs:
        if output.invalid is not None and not output.name:
            raise TensorError(output.invalid.message)
        check_output(output.name, output.parameters, checked, config)
        if output.invalid is not None:
            raise TensorError(output.invalid.message)
        if output.classes is not None:
            classification_count(output.name, output.classes)
        checked.append(output)
    return tuple(checked) or (Output(config.output.name),)


def check_output(
    name: str, parameters: Container[str], previous: Sequence[Output], config: ModelConfig
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


def no_shared_memory(what: str, parameters: Container[str]) -> None:
    if not parameters:  # the usual case: no parameters at all
        return
    used = [p for p in SHARED_MEMORY if p in parameters]
    if used:
        raise TensorError(
            f"{what} uses {', '.join(used)}; this server does not support the shared-memory "
            f"extension, send tensors in the request"
        )
