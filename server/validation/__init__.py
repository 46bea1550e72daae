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

import re

import numpy as np

from server.errors import InvalidInput
from server.repository import ModelConfig
from server.request import InferRequest
from server.shared_memory import SharedMemory
from server.validation.pixels import accept_image, pixels
from server.validation.types import DEFAULT_TOP_K, Accepted, Checked, Inputs, Limits, Unread
from server.validation.v2 import (
    CLASSIFICATION,
    check_batch_shape,
    check_declared,
    check_inputs,
    check_output,
    check_outputs,
    classification_count,
    describe_input,
    input_datatype,
    tensor_inputs,
)

__all__ = [
    "CLASSIFICATION", "DEFAULT_TOP_K", "Accepted", "Checked", "Inputs", "Limits", "Unread",
    "accept", "check_batch_shape", "check_declared", "check_finite", "check_inputs",
    "check_limit", "check_output", "check_outputs", "check_queue", "check_request_id",
    "check_top_k", "classification_count", "describe_input", "input_datatype",
    "pixels", "tensor_inputs",
]  # fmt: skip

MAX_REQUEST_ID = 128
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")


def check_request_id(request_id: str) -> str:
    """The caller's request id as given, or `InvalidInput` saying what is allowed."""
    if _REQUEST_ID.fullmatch(request_id) is None:
        raise InvalidInput(
            f"request id of {len(request_id)} characters is not allowed: send 1 to "
            f"{MAX_REQUEST_ID} visible ASCII characters (letters, digits, punctuation; no "
            f"spaces or control characters), or none to have one made"
        )
    return request_id


def accept(
    request: InferRequest,
    config: ModelConfig,
    limits: Limits,
    memory: SharedMemory | None = None,
) -> Checked:
    """`request` checked against the model `config` and `limits` (see the module); tensors
    in shared memory against the server's table `memory`."""
    declared = request.declared_images()
    check_limit(declared, limits)
    check_queue(declared, config)
    if request.classify:
        top_k = check_top_k(request.top_k or 0, config)
        inputs = Inputs(images=[accept_image(i, image, config, limits)
                                for i, image in enumerate(request.images)])  # fmt: skip
        checked = Checked(inputs, top_k=top_k)
    else:
        inputs = tensor_inputs(request.inputs, config, memory)
        outputs = check_outputs(request.outputs, config, declared, memory)
        checked = Checked(inputs, outputs=outputs)
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
