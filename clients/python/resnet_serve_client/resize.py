"""Optional client-side shrinking of images before they are sent (needs Pillow: the `resize` extra).

The server turns every image upright (EXIF), resizes it so its shorter side
is 256 pixels (bilinear) and takes the 224×224 centre. Sending a
multi-megapixel original only to have it shrunk there wastes bandwidth; doing
the resize here, the same way, leaves the server's resize a no-op, so the
model sees the same pixels (up to JPEG re-encoding):

- ``Resize("jpeg")``: shorter side to ``size``, re-encoded as JPEG at ``quality``;
- ``Resize("uint8")``: shorter side to ``size``, centre ``size``×``size`` square,
  sent as a raw HWC uint8 tensor: no decoding on the server, more bytes than a JPEG.

``size`` must be the model's resize side (256 for the ImageNet models); a
JPEG already that small is sent untouched.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .proto.resnet_serve.v1 import classifier_pb2 as pb

if TYPE_CHECKING:
    from PIL import Image as PILImage

_JPEG_MAGIC = b"\xff\xd8\xff"


def pillow() -> Any:
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
    """How to shrink images on the client: ``"jpeg"`` or ``"uint8"`` (see the module doc)."""

    mode: Literal["jpeg", "uint8"] = "jpeg"
    size: int = 256
    quality: int = 90

    def __post_init__(self) -> None:
        if self.mode not in ("jpeg", "uint8"):
            raise ValueError(f"resize mode must be 'jpeg' or 'uint8'; got {self.mode!r}")
        if self.size < 1:
            raise ValueError(f"resize size must be >= 1; got {self.size}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"JPEG quality must be 1..95; got {self.quality}")
        pillow()  # fail here, not at the first image, when Pillow is missing

    def encoded(self, data: bytes) -> pb.Image:
        """Shrink an encoded image; a JPEG already small enough is sent untouched."""
        image_module = pillow()
        try:
            image = image_module.open(io.BytesIO(data))
        except (OSError, ValueError, SyntaxError) as error:
            raise ValueError(
                "image bytes are not an image Pillow can decode, so they cannot be resized here"
            ) from error
        if self.mode == "jpeg" and data.startswith(_JPEG_MAGIC) and min(image.size) <= self.size:
            return pb.Image(encoded=data)
        if image.format == "JPEG":
            # Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 first, as the server does.
            scale = self.size / min(image.size)
            image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        return self.pil(image)

    def pil(self, image: PILImage.Image) -> pb.Image:
        """Shrink a PIL image."""
        from PIL import ImageOps

        image = (ImageOps.exif_transpose(image) or image).convert("RGB")
        image = _shorter_side(image, self.size, enlarge=self.mode == "uint8")
        if self.mode == "jpeg":
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.quality)
            return pb.Image(encoded=buffer.getvalue())
        width, height = image.size
        left, top = round((width - self.size) / 2), round((height - self.size) / 2)
        array = np.asarray(image.crop((left, top, left + self.size, top + self.size)))
        return pb.Image(
            tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=array.shape, data=array.tobytes())
        )


def _shorter_side(image: PILImage.Image, size: int, enlarge: bool) -> PILImage.Image:
    """torchvision's Resize(size): the shorter side becomes ``size``, aspect kept (floored)."""
    width, height = image.size
    if min(width, height) == size or (min(width, height) < size and not enlarge):
        return image
    if width <= height:
        target = (size, int(size * height / width))
    else:
        target = (int(size * width / height), size)
    return image.resize(target, pillow().Resampling.BILINEAR)
