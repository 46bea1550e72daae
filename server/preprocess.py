"""Images to model inputs: decode, orient, convert to RGB, resize, crop, normalize.

Equal (within the tolerance stated in tests/server/test_preprocess.py) to
torchvision's ``Resize(resize) → CenterCrop(crop) → ToTensor() →
Normalize(mean, std)`` on an RGB PIL image, with the numbers taken from the
model's ``config.json``. For float32 graphs the result is a normalized CHW
float32 array; for uint8 graphs (which normalize inside the graph) the
resized, cropped HWC uint8 pixels.

Decoding runs in a thread pool (`Preprocessor`): Pillow releases the GIL in
decode and resize, and threads avoid copying every result between processes.
The pool's backlog is bounded (``max_decode_backlog`` images, server-wide):
past it an image is refused at once with `QueueFull` (RESOURCE_EXHAUSTED),
so an overload of encoded images cannot pile up unbounded waits and memory
in front of the models' own bounded queues.
JPEGs decode in draft mode, i.e. already scaled down by 1/2, 1/4 or 1/8 by
the JPEG decoder while staying at least as large as the resize target. Image
size is checked from the header against the pixel limit before any pixel is
decoded, so decompression bombs cost nothing.

API for servicers::

    pre = Preprocessor(settings)
    chw = await pre.encoded(jpeg_bytes, model.config)   # InvalidInput on bad images
    chw = await pre.pixels(hwc_uint8_array, model.config)
"""

from __future__ import annotations

import asyncio
import io
import math
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.config import Settings
from server.errors import InvalidInput, QueueFull
from server.model_config import ModelConfig

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


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_image_bytes, settings.max_image_pixels)


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `shorter`, aspect kept (floored)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Identify the image and check its limits; only the header is read."""
    if not data:
        raise InvalidInput(f"image is empty; send {_ALLOWED} bytes or a tensor")
    if len(data) > limits.max_image_bytes:
        raise InvalidInput(
            f"image has {len(data)} bytes; at most {limits.max_image_bytes} are allowed"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidInput(_unidentified(data)) from None
    except Image.DecompressionBombError:  # Pillow's own ceiling, above ours (Preprocessor)
        raise InvalidInput(
            f"image has too many pixels; at most {limits.max_image_pixels} are allowed"
        ) from None
    except _DECODE_ERRORS:
        raise InvalidInput(f"image header is corrupt; send a valid {_ALLOWED} image") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise InvalidInput(
            f"image is {width}x{height} = {width * height} pixels; "
            f"at most {limits.max_image_pixels} are allowed"
        )
    if width == 0 or height == 0:
        raise InvalidInput(f"image is {width}x{height}; both sides must be at least 1 pixel")
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


def decode(data: bytes, limits: Limits, shorter: int) -> Image.Image:
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
        raise InvalidInput(f"image data is truncated or corrupt; send a valid {_ALLOWED} image")\
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
        raise InvalidInput(f"image mode {image.mode} cannot be converted to RGB") from None


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


def prepare_encoded(data: bytes, config: ModelConfig, limits: Limits) -> np.ndarray:
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


class Preprocessor:
    """Runs decoding and transforms on a pool of worker threads, with a bounded backlog."""

    def __init__(self, settings: Settings) -> None:
        self.limits = Limits.from_settings(settings)
        self.max_backlog = settings.max_decode_backlog
        self.backlog = 0  # images waiting for or in a worker (touched only on the event loop)
        ceiling = Image.MAX_IMAGE_PIXELS
        if ceiling is not None and self.limits.max_image_pixels > ceiling:
            Image.MAX_IMAGE_PIXELS = self.limits.max_image_pixels  # keep Pillow's above ours
        self._pool = ThreadPoolExecutor(settings.decode_threads(), thread_name_prefix="decode")

    async def encoded(self, data: bytes, config: ModelConfig) -> np.ndarray:
        return await self._run(prepare_encoded, data, config, self.limits)

    async def pixels(self, pixels: np.ndarray, config: ModelConfig) -> np.ndarray:
        # a crop copies at most crop² × 3 bytes (~20 µs): cheaper on the event loop than
        # the two thread hand-overs of a worker
        cropped = crop_only(pixels, config)
        if cropped is not None:
            return cropped
        return await self._run(prepare_pixels, pixels, config)

    async def _run(self, function: Callable[..., np.ndarray], *args: object) -> np.ndarray:
        if self.backlog >= self.max_backlog:
            raise QueueFull(
                f"{self.backlog} images are waiting to be decoded (at most {self.max_backlog}); "
                f"retry later"
            )
        self.backlog += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, function, *args)
        finally:
            self.backlog -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)
