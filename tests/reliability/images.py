"""Odd and hostile images, made with Pillow at test time (nothing large is ever decoded).

Each builder returns encoded bytes; the ones whose answer must equal another
image's answer return that reference too (``(image, reference)``).
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

import numpy as np
from PIL import Image

from tests.shared_data import PHOTOS

PHOTO = PHOTOS / "chelsea.jpg"
ORIENTATION = 0x0112  # EXIF tag
ROTATE_90_CW = 6  # EXIF orientation: turn the stored pixels 90° clockwise to view them


@cache
def photo() -> Image.Image:
    """A small real photo, landscape (so a rotation changes what a model sees)."""
    with Image.open(PHOTO) as image:
        return image.convert("RGB").resize((96, 64), Image.Resampling.BILINEAR)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(image: Image.Image, **options: object) -> bytes:
    return encode(image, "PNG", **options)


def jpeg(image: Image.Image, **options: object) -> bytes:
    return encode(image, "JPEG", quality=90, **options)


def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int = 100_000, rows: int = 8) -> bytes:
    """A PNG of a few hundred bytes whose IHDR declares ``side`` x ``side`` RGB pixels, with a
    valid deflate stream of zero rows behind it: decoded in full it would need 30 GB."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    row = b"\0" * (1 + 3 * side)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )  # fmt: skip


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is rewritten to claim width x height."""
    data = bytearray(jpeg(photo()))
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise AssertionError("Pillow wrote no baseline SOF0 marker")
    struct.pack_into(">HH", data, sof + 5, height, width)  # marker, length, precision, H, W
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = jpeg(photo())
    return data[: len(data) // 2]


def tiff() -> bytes:
    return encode(photo(), "TIFF")


def one_pixel() -> bytes:
    return png(Image.new("RGB", (1, 1), (200, 30, 60)))


def animated_gif() -> tuple[bytes, bytes]:
    """Three frames; the server classifies the first: the reference is that frame as PNG."""
    frames = [photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT), photo().rotate(180)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(gif)) as decoded:
        assert getattr(decoded, "n_frames", 1) == 3
        first = decoded.convert("RGB")
    return gif, png(first)


def cmyk_jpeg() -> bytes:
    return jpeg(photo().convert("CMYK"))


def sixteen_bit_png() -> tuple[bytes, bytes]:
    """16-bit grayscale whose top byte is an 8-bit grayscale image: the reference."""
    gray = np.asarray(photo().convert("L"), dtype=np.uint16)
    wide = Image.fromarray((gray * 257).astype("<u2"))
    assert wide.mode == "I;16"
    return png(wide), png(Image.fromarray(gray.astype(np.uint8)))


def grayscale_png() -> bytes:
    return png(photo().convert("L"))


def palette_png() -> bytes:
    return png(photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=64))


def rgba_png() -> bytes:
    image = photo().convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return png(image)


def exif_rotated() -> tuple[bytes, bytes]:
    """The photo stored sideways with EXIF orientation 6, and the same view stored upright.

    Both lossless (PNG with an eXIf chunk), so equal answers mean the orientation was applied.
    """
    upright = photo()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[ORIENTATION] = ROTATE_90_CW
    return png(stored, exif=exif), png(upright)


def exif_ignored() -> bytes:
    """The sideways pixels without the EXIF tag: what a server ignoring orientation would see."""
    return png(photo().transpose(Image.Transpose.ROTATE_90))
