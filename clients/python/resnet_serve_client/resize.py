"""Optional client-side shrinking of images before they are sent (needs Pillow: the `resize` extra).

The server resizes every image so its shorter side is 256 pixels and takes the
224×224 centre; sending a multi-megapixel original only to have it shrunk on
the server wastes bandwidth. ``Resize("jpeg")`` sends a JPEG whose shorter
side is ``size`` (the server's crop then sees the same pixels);
``Resize("uint8")`` does the server's resize and centre crop here and sends
the ``crop``×``crop``×3 uint8 tensor, which the server only normalizes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from .proto.resnet_serve.v1 import classifier_pb2 as pb

if TYPE_CHECKING:
    from PIL import Image as PILImage

_JPEG_MAGIC = b"\xff\xd8\xff"


def pillow() -> object:
    """The ``PIL.Image`` module, or an ImportError saying which extra brings it."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "client-side image work needs Pillow: pip install 'resnet-serve-client[resize]'"
        ) from error
    return Image


@dataclass(frozen=True, slots=True)
class Resize:
    """How to shrink images on the client.

    mode: ``"jpeg"`` (shorter side to ``size``, re-encoded at ``quality``) or
    ``"uint8"`` (shorter side to ``size``, centre ``crop``, raw HWC tensor).
    """

    mode: Literal["jpeg", "uint8"] = "jpeg"
    size: int = 256
    crop: int = 224
    quality: int = 90

    def __post_init__(self) -> None:
        if self.mode not in ("jpeg", "uint8"):
            raise ValueError(f"resize mode must be 'jpeg' or 'uint8'; got {self.mode!r}")
        if not 0 < self.crop <= self.size:
            raise ValueError(f"need 0 < crop <= size; got crop={self.crop}, size={self.size}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"JPEG quality must be 1..95; got {self.quality}")

    def encoded(self, data: bytes) -> pb.Image:
        """Shrink an encoded image; a JPEG already small enough is sent untouched."""
        image_module = pillow()
        image = image_module.open(io.BytesIO(data))  # type: ignore[attr-defined]
        if self.mode == "jpeg" and data.startswith(_JPEG_MAGIC) and min(image.size) <= self.size:
            return pb.Image(encoded=data)
        return self.pil(image)

    def pil(self, image: PILImage.Image) -> pb.Image:
        image = _shorter_side(image.convert("RGB"), self.size, enlarge=self.mode == "uint8")
        if self.mode == "jpeg":
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.quality)
            return pb.Image(encoded=buffer.getvalue())
        width, height = image.size
        left, top = (width - self.crop) // 2, (height - self.crop) // 2
        array = np.asarray(image.crop((left, top, left + self.crop, top + self.crop)))
        return pb.Image(
            tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=array.shape, data=array.tobytes())
        )


def _shorter_side(image: PILImage.Image, size: int, enlarge: bool) -> PILImage.Image:
    """Scale so the shorter side is ``size``; enlarge a smaller image only if asked."""
    width, height = image.size
    scale = size / min(width, height)
    if scale == 1 or (scale > 1 and not enlarge):
        return image
    target = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(target, resample=pillow().Resampling.BILINEAR, reducing_gap=3.0)  # type: ignore[attr-defined]
