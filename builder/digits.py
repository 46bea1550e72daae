"""scikit-learn's handwritten digits as 32×32 RGB images, with a fixed train/held-out split.

The 1,797 8×8 images (values 0–16) are scaled to 0–255, upscaled bilinearly to 32×32 and
repeated over three channels: the pixels a user would send as a PNG. ``inputs`` turns them
into what the model sees with the server's own preprocessing (`server.repository.transform`,
CIFAR normalization), so training, the PyTorch reference and the server agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from server.repository import ModelConfig, transform

SIZE = 32
HELD_OUT_SHARE = 0.2
SPLIT_SEED = 0
LABELS = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True)
class Split:
    pixels: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class Digits:
    train: Split
    held_out: Split


def _upscale(image: np.ndarray) -> np.ndarray:
    gray = Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8), "L")
    return np.asarray(gray.resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB"))


def load_digits() -> Digits:
    """The fixed split: 20 % held out, stratified by class, seed 0 (360 of 1,797 images)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    pixels = np.stack([_upscale(image) for image in data.images])
    labels = data.target.astype(np.int64)
    train_x, held_x, train_y, held_y = train_test_split(
        pixels, labels, test_size=HELD_OUT_SHARE, random_state=SPLIT_SEED, stratify=labels
    )
    return Digits(Split(train_x, train_y), Split(held_x, held_y))


def inputs(pixels: np.ndarray, config: ModelConfig) -> np.ndarray:
    """The model's inputs for ``pixels``, preprocessed as the server does it."""
    return np.stack([transform(Image.fromarray(p, "RGB"), config) for p in pixels])


def write_pngs(split: Split, folder: Path) -> list[Path]:
    """``folder/<label>/<index>.png`` for each image, in split order; returns the paths."""
    paths = []
    for index, (pixels, label) in enumerate(zip(split.pixels, split.labels, strict=True)):
        path = Path(folder) / LABELS[label] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths
