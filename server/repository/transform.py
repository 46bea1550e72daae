"""Images to model inputs: decode, orient, convert to RGB, resize, crop, normalize.

Equal (within the tolerance stated in tests/server/test_preprocess.py) to
torchvision's ``Resize(resize) → CenterCrop(crop) → ToTensor() →
Normalize(mean, std)`` on an RGB PIL image, with the numbers taken from the
model's ``config.json``. For float32 graphs the result is a normalized CHW
float32 array; for uint8 graphs (which normalize inside the graph) the
resized, cropped HWC uint8 pixels. The server prepares requests with it
(`server.preprocess` runs it on worker threads), the builder its int8
calibration images, so a model is calibrated on what it will be served.

JPEGs decode in draft mode, i.e. already scaled down by 1/2, 1/4 or 1/8 by
the JPEG decoder while staying at least as large as the resize target. Image
size is checked from the header against the pixel limit before any pixel is
decoded, so decompression bombs cost nothing. A bad image raises `ImageError`.

The SDK's client-side resize (``resnet_serve_client/resize.py``) repeats the
shorter-side and centre-square geometry: the SDK installs without the server
and this package imports no grpc (the SDK's package does), so neither can
import the other; tests/client/test_images.py pins the two to each other.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.repository.config import ModelConfig

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_ALLOWED = "JPEG, PNG, WebP, BMP or GIF"
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# what a corrupt or truncated file makes Pillow's decoders raise
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error)


class ImageError(ValueError):
    """An image the transform refuses; the message says what was wrong and what is allowed."""


@dataclass(frozen=True)
class ImageLimits:
    """Checked from the header, before any pixel is decoded."""

    max_image_bytes: int
    max_image_pixels: int


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `shorter`, aspect kept (floored)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Identify the image and check its limits; only the header is read."""
    if not data:
        raise ImageError(f"image is empty; send {_ALLOWED} bytes or a tensor")
    if len(data) > limits.max_image_bytes:
        raise ImageError(
            f"image has {len(data)} bytes; at most {limits.max_image_bytes} are allowed"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(_unidentified(data)) from None
    except Image.DecompressionBombError:  # Pillow's own ceiling, kept above ours by the server
        raise ImageError(
            f"image has too many pixels; at most {limits.max_image_pixels} are allowed"
        ) from None
    except _DECODE_ERRORS:
        raise ImageError(f"image header is corrupt; send a valid {_ALLOWED} image") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels; "
            f"at most {limits.max_image_pixels} are allowed"
        )
    if width == 0 or height == 0:
        raise ImageError(f"image is {width}x{height}; both sides must be at least 1 pixel")
    return image


def _unidentified(data: bytes) -> str:
    """Name the format when Pillow knows it but the server does not take it."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            found = other.format
    except Exception:
        found = None
    if found:
        return f"unsupported image format {found}; allowed: {_ALLOWED}"
    return f"image bytes are not a decodable image; allowed formats: {_ALLOWED}"


def decode(data: bytes, limits: ImageLimits, shorter: int) -> Image.Image:
    """Decode to an upright RGB image; JPEGs at the smallest scale still >= `shorter`."""
    image = open_image(data, limits)
    try:
        if image.format == "JPEG":
            width, height = image.size
            scale = shorter / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
        image = ImageOps.exif_transpose(image) or image
    except _DECODE_ERRORS:
        raise ImageError(f"image data is truncated or corrupt; send a valid {_ALLOWED} image")\
            from None  # fmt: skip
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, alpha, CMYK and 16-bit images as 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError(f"image mode {image.mode} cannot be converted to RGB") from None


def transform(image: Image.Image, config: ModelConfig) -> np.ndarray:
    """Resize → center crop → (float graphs) ToTensor + Normalize, from `config`."""
    p = config.preprocessing
    size = resized_size(*image.size, p.resize)
    if size != image.size:
        image = image.resize(size, _RESAMPLE[p.interpolation])
    left = round((size[0] - p.crop) / 2.0)
    top = round((size[1] - p.crop) / 2.0)
    pixels = np.asarray(image.crop((left, top, left + p.crop, top + p.crop)), dtype=np.uint8)
    if config.input.dtype == "uint8":
        return np.ascontiguousarray(pixels)
    scaled = pixels.astype(np.float32) / np.float32(255)
    mean = np.asarray(p.mean, dtype=np.float32)
    std = np.asarray(p.std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


def prepare_encoded(data: bytes, config: ModelConfig, limits: ImageLimits) -> np.ndarray:
    return transform(decode(data, limits, config.preprocessing.resize), config)


def prepare_pixels(pixels: np.ndarray, config: ModelConfig) -> np.ndarray:
    return transform(Image.fromarray(pixels, "RGB"), config)


def crop_only(pixels: np.ndarray, config: ModelConfig) -> np.ndarray | None:
    """`prepare_pixels` for a uint8 graph and pixels already at the resize size (what the
    SDK's client-side resize sends): the center crop, as a copy. None when more is needed."""
    p = config.preprocessing
    height, width = pixels.shape[:2]
    if config.input.dtype != "uint8" or resized_size(width, height, p.resize) != (width, height):
        return None
    if min(width, height) < p.crop:
        return None
    left = round((width - p.crop) / 2.0)
    top = round((height - p.crop) / 2.0)
    return np.ascontiguousarray(pixels[top : top + p.crop, left : left + p.crop])
