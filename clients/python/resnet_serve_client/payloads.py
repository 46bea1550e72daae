"""What the load generator sends: synthetic or file inputs, as Classify or v2 ModelInfer requests.

Requests are built once before the run, so the client's time goes to gRPC,
not to encoding images.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import bytes_tensor
from .images import to_image
from .proto.inference import grpc_service_pb2 as v2
from .proto.resnet_serve.v1 import classifier_pb2 as pb
from .resize import pillow

InputKind = Literal["jpeg", "uint8", "float", "files"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_DISTINCT = 8  # different synthetic images, so no cache anywhere can help


def find_images(paths: list[Path]) -> list[Path]:
    """Files as given; directories recursed for image files, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            found.append(path)
    return found


@dataclass(frozen=True, slots=True)
class Inputs:
    """A pool of images of one kind: encoded bytes, or arrays."""

    kind: InputKind
    images: list[Any]

    @property
    def description(self) -> str:
        first = self.images[0]
        if isinstance(first, bytes):
            mean = sum(map(len, self.images)) / len(self.images)
            return f"{self.kind} ({len(self.images)} images, {mean / 1024:.1f} KiB mean)"
        return f"{self.kind} {first.dtype} {list(first.shape)}"


def make_inputs(kind: InputKind, size: int, files: list[Path], seed: int = 0) -> Inputs:
    rng = np.random.default_rng(seed)
    if kind == "files":
        paths = find_images(files)
        if not paths:
            raise ValueError("--input files needs image files or folders (--files PATH ...)")
        return Inputs(kind, [p.read_bytes() for p in paths])
    if kind == "float":
        arrays = [rng.standard_normal((3, size, size), dtype=np.float32) for _ in range(_DISTINCT)]
        return Inputs(kind, arrays)
    pixels = [_smooth_pixels(rng, size) for _ in range(_DISTINCT)]
    if kind == "uint8":
        return Inputs(kind, pixels)
    return Inputs(kind, [_jpeg(p) for p in pixels])


def _smooth_pixels(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blocks of colour plus a little noise: compresses like a photo, not like static."""
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    big = np.kron(blocks, np.ones((size // 8 + 1, size // 8 + 1, 1), dtype=np.uint8))[:size, :size]
    noise = rng.integers(-8, 9, big.shape)
    return np.clip(big.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    pillow().fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _batches(inputs: Inputs, batch: int) -> list[list[Any]]:
    """As many distinct batches as there are images (at least one), cycling the pool."""
    pool = itertools.cycle(inputs.images)
    return [[next(pool) for _ in range(batch)] for _ in range(max(1, len(inputs.images)))]


def classify_requests(
    inputs: Inputs, *, model: str, batch: int, top_k: int
) -> list[pb.ClassifyRequest]:
    return [
        pb.ClassifyRequest(model=model, images=[to_image(i) for i in group], top_k=top_k)
        for group in _batches(inputs, batch)
    ]


def v2_requests(
    inputs: Inputs, *, model: str, input_name: str, output_name: str, batch: int, top_k: int
) -> list[v2.ModelInferRequest]:
    """``ModelInfer`` requests: encoded images as BYTES [N], arrays as FP32/UINT8 [N, ...];
    the output asked for with the classification extension (top ``top_k``)."""
    output = v2.ModelInferRequest.InferRequestedOutputTensor(
        name=output_name, parameters={"classification": v2.InferParameter(int64_param=top_k)}
    )
    requests = []
    for group in _batches(inputs, batch):
        if isinstance(group[0], bytes):
            datatype, shape = "BYTES", [len(group)]
            raw = bytes_tensor.serialize(group)
        else:
            array = np.stack(group)
            datatype = "UINT8" if array.dtype == np.uint8 else "FP32"
            shape, raw = list(array.shape), array.astype(array.dtype.newbyteorder("<")).tobytes()
        tensor = v2.ModelInferRequest.InferInputTensor(
            name=input_name, datatype=datatype, shape=shape
        )
        requests.append(
            v2.ModelInferRequest(
                model_name=model, inputs=[tensor], outputs=[output], raw_input_contents=[raw]
            )
        )
    return requests
