"""Preprocessing against a numpy reference of torchvision's eval transform.

The reference computes Resize(256, bilinear, antialias) → CenterCrop(224) →
ToTensor → Normalize in float64 from fully decoded pixels. Pillow resizes
8-bit images in fixed point and rounds after each pass, so the server may
differ by a little over one 8-bit level. Stated tolerance, in pixel units of
1/255 before normalization: max |difference| <= 2, mean <= 0.5 for images
decoded at full size; for JPEGs that the server decodes in draft mode (at
1/2, 1/4 or 1/8 scale) mean <= 3 (the DCT-scaled decode is a different
low-pass filter).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.repository import ImageError, ImageLimits, ModelConfig
from server.repository.transform import (
    crop_only,
    decode,
    prepare_encoded,
    prepare_pixels,
    to_rgb,
)
from tests.fixtures.messages import PHOTOS, png_claiming

IMAGENET = ModelConfig(name="imagenet", arch="resnet18", num_classes=1000)
LIMITS = ImageLimits(max_image_bytes=20 << 20, max_image_pixels=40_000_000)
STD = np.asarray(IMAGENET.preprocessing.std).reshape(3, 1, 1)


def _weights(in_size: int, out_size: int) -> np.ndarray:
    """Antialiased bilinear (triangle) resampling matrix, as Pillow defines it."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((x + 0.5 - center) / support), 0.0, None)
        matrix[i, lo:hi] = w / w.sum()
    return matrix


def reference(pixels: np.ndarray, config: ModelConfig = IMAGENET) -> np.ndarray:
    """torchvision's Resize → CenterCrop → ToTensor → Normalize on HWC uint8, in numpy."""
    p = config.preprocessing
    h, w = pixels.shape[:2]
    if w <= h:
        out_w, out_h = p.resize, int(p.resize * h / w)
    else:
        out_w, out_h = int(p.resize * w / h), p.resize
    image = pixels.astype(np.float64) / 255.0
    rows = np.tensordot(_weights(h, out_h), image, axes=(1, 0))  # (out_h, w, c)
    resized = np.tensordot(rows, _weights(w, out_w), axes=(1, 1)).transpose(0, 2, 1)
    top = round((out_h - p.crop) / 2.0)
    left = round((out_w - p.crop) / 2.0)
    crop = resized[top : top + p.crop, left : left + p.crop]
    mean = np.asarray(p.mean)
    std = np.asarray(p.std)
    return ((crop - mean) / std).transpose(2, 0, 1)


def _full_decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _pixel_error(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|difference| in 1/255 pixel units (normalization undone)."""
    return np.abs(ours.astype(np.float64) - ref) * STD * 255


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png", "coffee.png", "camera.png"])
def test_full_size_decode_matches_reference(name: str) -> None:
    data = (PHOTOS / name).read_bytes()
    ours = prepare_encoded(data, IMAGENET, LIMITS)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    error = _pixel_error(ours, reference(_full_decode(PHOTOS / name)))
    assert error.max() <= 2.0
    assert error.mean() <= 0.5


def test_draft_mode_jpeg_matches_reference_within_draft_tolerance() -> None:
    path = PHOTOS / "hubble_deep_field.jpg"  # 1000x872: decoded at 1/2 scale
    with Image.open(path) as image:
        image.draft("RGB", (294, 256))
        assert image.size == (500, 436), "the photo should take the draft path"
    error = _pixel_error(prepare_encoded(path.read_bytes(), IMAGENET, LIMITS),
                         reference(_full_decode(path)))  # fmt: skip
    assert error.mean() <= 3.0


def test_uint8_graph_gets_the_resized_crop() -> None:
    config = IMAGENET.model_copy(update={"input": IMAGENET.input.model_copy(
        update={"dtype": "uint8", "layout": "NHWC"})})  # fmt: skip
    data = (PHOTOS / "coffee.png").read_bytes()
    pixels = prepare_encoded(data, config, LIMITS)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    as_float = prepare_encoded(data, IMAGENET, LIMITS)
    mean = np.asarray(IMAGENET.preprocessing.mean, dtype=np.float32).reshape(3, 1, 1)
    normalized = (pixels.transpose(2, 0, 1) / np.float32(255) - mean) / STD.astype(np.float32)
    np.testing.assert_allclose(normalized, as_float, atol=1e-5)


def test_tensor_pixels_equal_decoded_image() -> None:
    data = (PHOTOS / "chelsea.jpg").read_bytes()  # short side < 512: no draft scaling
    pixels = _full_decode(PHOTOS / "chelsea.jpg")
    np.testing.assert_array_equal(
        prepare_pixels(pixels, IMAGENET), prepare_encoded(data, IMAGENET, LIMITS)
    )


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(PHOTOS / "coffee.png") as image:
        return image.convert("RGB")


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("P", "GIF"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG"), ("1", "BMP"),
     ("RGB", "WEBP")],
)  # fmt: skip
def test_modes_become_rgb(photo: Image.Image, mode: str, fmt: str) -> None:
    data = _encode(photo.convert(mode), fmt)
    image = decode(data, LIMITS, 256)
    assert image.mode == "RGB"
    assert prepare_encoded(data, IMAGENET, LIMITS).shape == (3, 224, 224)


def test_palette_with_transparency(photo: Image.Image) -> None:
    palette = photo.convert("P")
    data = _encode(palette, "PNG", transparency=0)
    assert decode(data, LIMITS, 256).mode == "RGB"


def test_sixteen_bit_grayscale_keeps_its_range() -> None:
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (200, 1))
    data = _encode(Image.fromarray(ramp), "PNG")
    rgb = np.asarray(decode(data, LIMITS, 256))
    assert rgb.shape == (200, 300, 3)
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    np.testing.assert_array_equal(rgb[..., 0], (ramp >> 8).astype(np.uint8))


def test_sixteen_bit_mode_i() -> None:
    wide = np.full((10, 10), 40000, dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(wide, "I")))[0, 0, 0] == 40000 >> 8


def test_exif_orientation_is_applied(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; display turns it 90° clockwise
    data = _encode(photo, "JPEG", quality=95, exif=exif)
    upright = decode(data, LIMITS, 256)
    assert upright.size == (photo.height, photo.width)
    turned = decode(_encode(photo.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95),
                    LIMITS, 256)  # fmt: skip
    difference = np.abs(np.asarray(upright, float) - np.asarray(turned, float)).mean()
    assert difference < 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "image is empty"),
        (b"\x00" * 100, "not a decodable image"),
        (png_claiming(8000, 8000), "8000x8000 = 64000000 pixels; at most 40000000"),
        (png_claiming(100_000, 100_000), "too many pixels; at most 40000000"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "allowed"),
    ],
    ids=["empty", "garbage", "bomb", "huge-bomb", "broken-jpeg"],
)
def test_bad_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        prepare_encoded(data, IMAGENET, LIMITS)


def test_truncated_image_is_refused() -> None:
    data = (PHOTOS / "coffee.png").read_bytes()
    with pytest.raises(ImageError, match="truncated or corrupt"):
        prepare_encoded(data[: len(data) // 2], IMAGENET, LIMITS)


def test_unsupported_format_is_named(photo: Image.Image) -> None:
    with pytest.raises(ImageError, match="unsupported image format TIFF; allowed: JPEG"):
        prepare_encoded(_encode(photo, "TIFF"), IMAGENET, LIMITS)


def test_byte_limit() -> None:
    with pytest.raises(ImageError, match="at most 10 are allowed"):
        prepare_encoded(b"x" * 11, IMAGENET, ImageLimits(max_image_bytes=10, max_image_pixels=100))


@pytest.mark.parametrize("shape", [(256, 256), (256, 341), (341, 256), (256, 257), (257, 256)])
def test_crop_only_equals_the_full_transform_at_the_resize_size(shape: tuple[int, int]) -> None:
    config = IMAGENET.model_copy(update={"input": IMAGENET.input.model_copy(
        update={"dtype": "uint8", "layout": "NHWC"})})  # fmt: skip
    pixels = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    cropped = crop_only(pixels, config)
    assert cropped is not None and cropped.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(cropped, prepare_pixels(pixels, config))


def test_crop_only_declines_what_needs_more() -> None:
    uint8 = IMAGENET.model_copy(update={"input": IMAGENET.input.model_copy(
        update={"dtype": "uint8", "layout": "NHWC"})})  # fmt: skip
    pixels = np.zeros((300, 400, 3), np.uint8)
    assert crop_only(pixels, uint8) is None  # needs a resize first
    assert crop_only(pixels[:256], IMAGENET) is None  # a float graph also normalizes
    tiny = uint8.model_copy(update={"preprocessing": uint8.preprocessing.model_copy(
        update={"resize": 200})})  # fmt: skip
    assert crop_only(np.zeros((200, 200, 3), np.uint8), tiny) is None  # crop beyond the image
