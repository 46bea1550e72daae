"""Building Classifier requests and reading metrics scrapes, for the server tests."""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb

from tests.shared_data import PHOTOS

CHELSEA = (PHOTOS / "chelsea.jpg").read_bytes()  # 451x300: decoded at full size


def encoded(data: bytes) -> pb.Image:
    return pb.Image(encoded=data)


def uint8_tensor(pixels: np.ndarray) -> pb.Image:
    return pb.Image(
        tensor=pb.Tensor(dtype=pb.Tensor.UINT8, shape=pixels.shape, data=pixels.tobytes())
    )


def float_tensor(chw: np.ndarray) -> pb.Image:
    data = chw.astype("<f4").tobytes()
    return pb.Image(tensor=pb.Tensor(dtype=pb.Tensor.FLOAT32, shape=chw.shape, data=data))


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text scrape (0 when absent)."""
    wanted = ",".join(sorted(f'{k}="{v}"' for k, v in labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match[1].split(","))) == wanted:
            return float(match[2])
    return 0.0


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))  # fmt: skip


def random_chw(seed: int, size: int = 224) -> np.ndarray:
    """A normalized-looking float32 CHW image, reproducible from `seed`."""
    return np.random.default_rng(seed).standard_normal((3, size, size), dtype=np.float32)
