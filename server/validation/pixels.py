"""A classify request's images: encoded files as they are, pixels checked against the
model."""

from __future__ import annotations

import numpy as np

from server.errors import InvalidInput
from server.repository import ModelConfig
from server.request import Invalid, Pixels
from server.validation.types import Accepted, Limits


def accept_image(index: int, image: bytes | Pixels | Invalid, config: ModelConfig,
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
