"""What callers hold becomes the right wire image; client-side resize shrinks it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from resnet_serve_client import Resize
from resnet_serve_client.images import split, to_image
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb


def test_paths_and_bytes_are_sent_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"\xff\xd8\xffdata")
    assert to_image(path).encoded == b"\xff\xd8\xffdata"
    assert to_image(str(path)).encoded == b"\xff\xd8\xffdata"
    assert to_image(bytearray(b"png")).encoded == b"png"
    with pytest.raises(ValueError, match="empty"):
        to_image(b"")


def test_arrays_become_tensors() -> None:
    hwc = np.zeros((5, 7, 3), np.uint8)
    tensor = to_image(hwc).tensor
    assert (tensor.dtype, list(tensor.shape), len(tensor.data)) == (pb.Tensor.UINT8, [5, 7, 3], 105)
    chw = np.ones((3, 4, 4), np.float64)
    tensor = to_image(chw).tensor
    assert tensor.dtype == pb.Tensor.FLOAT32
    assert np.frombuffer(tensor.data, "<f4").tolist() == [1.0] * 48
    for bad in (np.zeros((3, 5, 5), np.uint8), np.zeros((5, 5, 3), np.float32),
                np.zeros((5, 5, 3), np.int32), np.zeros((5, 5), np.uint8)):
        with pytest.raises(ValueError):
            to_image(bad)


def test_pil_images_are_sent_losslessly() -> None:
    image = Image.new("RGB", (9, 6), (10, 200, 30))
    decoded = Image.open(io.BytesIO(to_image(image).encoded))
    assert decoded.format == "PNG"
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_one_image_or_many() -> None:
    assert len(split(b"x")) == 1
    assert len(split("photo.jpg")) == 1
    assert len(split(np.zeros((4, 4, 3), np.uint8))) == 1
    assert len(split(np.zeros((2, 4, 4, 3), np.uint8))) == 2
    assert len(split([b"a", b"b", b"c"])) == 3
    with pytest.raises(TypeError):
        split(42)


def _photo(width: int, height: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_jpeg_resize_brings_the_shorter_side_to_the_servers_size() -> None:
    image = to_image(_photo(1200, 800), Resize("jpeg"))
    shrunk = Image.open(io.BytesIO(image.encoded))
    assert (shrunk.format, shrunk.size) == ("JPEG", (384, 256))


def test_small_jpegs_are_sent_untouched_and_pngs_reencoded() -> None:
    small = _photo(300, 200)
    assert to_image(small, Resize("jpeg")).encoded == small
    png = to_image(_photo(300, 200, "PNG"), Resize("jpeg")).encoded
    assert png.startswith(b"\xff\xd8\xff")


def test_uint8_resize_sends_the_square_the_server_crops_from() -> None:
    tensor = to_image(_photo(640, 427), Resize("uint8")).tensor
    assert (tensor.dtype, list(tensor.shape)) == (pb.Tensor.UINT8, [256, 256, 3])
    tensor = to_image(Image.new("RGB", (100, 50)), Resize("uint8")).tensor
    assert list(tensor.shape) == [256, 256, 3]


def test_exif_orientation_is_applied_before_resizing() -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    Image.new("RGB", (1000, 600)).save(buffer, format="JPEG", exif=exif)
    shrunk = Image.open(io.BytesIO(to_image(buffer.getvalue(), Resize("jpeg")).encoded))
    assert shrunk.size == (256, 426)


def test_resize_saves_bandwidth_on_the_shared_photos(photos: Path) -> None:
    originals = {p.name: p.read_bytes() for p in sorted(photos.iterdir())}
    sent = {name: len(to_image(data, Resize("jpeg")).encoded) for name, data in originals.items()}
    assert sum(sent.values()) < sum(map(len, originals.values())) / 5
    assert all(sent[name] <= len(data) for name, data in originals.items())


def test_resize_options_are_checked() -> None:
    with pytest.raises(ValueError):
        Resize("webp")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Resize(quality=100)
