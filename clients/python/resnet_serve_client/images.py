"""Turning what callers hold (paths, bytes, PIL images, numpy arrays) into wire images."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from .proto.resnet_serve.v1 import classifier_pb2 as pb

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from .resize import Resize

ImageLike: TypeAlias = (
    "str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | PILImage.Image"
)
"""One image: a file path, encoded bytes (JPEG, PNG, WebP, BMP, GIF), a PIL image,
a uint8 HWC RGB array or a float32 CHW array already normalized for the model."""


def is_single(images: Any) -> bool:
    """True when ``images`` is one image rather than a collection of them."""
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 3
    return _is_pil(images)


def split(images: Any) -> list[Any]:
    """The images of ``classify``'s argument: one image, a 4-D array batch or an iterable."""
    if is_single(images):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(
                f"an array must be one image (3-D, HWC uint8 or CHW float32) or a batch of them "
                f"(4-D); got shape {images.shape}"
            )
        return list(images)
    if isinstance(images, Iterable):
        return list(images)
    raise TypeError(f"cannot classify a {type(images).__name__}; {_ALLOWED}")


_ALLOWED = "pass a path, encoded bytes, a PIL image or a numpy array (HWC uint8 or CHW float32)"


def to_image(image: Any, resize: Resize | None = None) -> pb.Image:
    """The wire form of one image, shrunk on the client first when ``resize`` is given."""
    if isinstance(image, str | os.PathLike):
        image = Path(image).read_bytes()
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if not data:
            raise ValueError("an image is empty (0 bytes)")
        return resize.encoded(data) if resize else pb.Image(encoded=data)
    if isinstance(image, np.ndarray):
        return pb.Image(tensor=to_tensor(image))
    if _is_pil(image):
        return resize.pil(image) if resize else pb.Image(encoded=encode_png(image))
    raise TypeError(f"cannot classify a {type(image).__name__}; {_ALLOWED}")


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """A uint8 HWC RGB array or a float CHW array as a wire tensor."""
    if array.ndim != 3:
        raise ValueError(f"an image array must be 3-D; got shape {array.shape}")
    if array.dtype == np.uint8:
        if array.shape[2] != 3:
            raise ValueError(f"a uint8 image must be HWC with 3 channels; got shape {array.shape}")
        dtype = pb.Tensor.UINT8
    elif np.issubdtype(array.dtype, np.floating):
        if array.shape[0] != 3:
            raise ValueError(f"a float image must be CHW with 3 channels; got shape {array.shape}")
        array = array.astype("<f4", copy=False)
        dtype = pb.Tensor.FLOAT32
    else:
        raise ValueError(f"an image array must be uint8 (HWC) or float32 (CHW); got {array.dtype}")
    return pb.Tensor(dtype=dtype, shape=array.shape, data=np.ascontiguousarray(array).tobytes())


def encode_png(image: PILImage.Image) -> bytes:
    """A PIL image as lossless PNG, fast compression: the pixels arrive as they are."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _is_pil(obj: Any) -> bool:
    return any(cls.__module__.startswith("PIL.") and cls.__name__ == "Image"
               for cls in type(obj).__mro__)
