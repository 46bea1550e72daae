"""Images for int8 calibration and for checking it: a user's folder, or a synthetic set.

A folder's images (JPEG, PNG, WebP, BMP, GIF; sorted by path, subfolders included) are
decoded and preprocessed exactly as the server does it (`server.repository.transform`), then split
deterministically: every ``HELD_OUT_EVERY``-th image is held out of calibration and used to
measure top-1 agreement with the fp32 model. Without a folder, both sets are seeded random
inputs (N(0, 1) after normalization, or uniform pixels for uint8 graphs) and the record
says ``"source": "synthetic"``: such an int8 model is calibrated on no real image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.checks import random_inputs
from server.repository import ImageLimits, ModelConfig, prepare_encoded

HELD_OUT_EVERY = 5
SYNTHETIC_CALIBRATION = 64
SYNTHETIC_HELD_OUT = 64
_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
_LIMITS = ImageLimits(max_image_bytes=1 << 30, max_image_pixels=1 << 30)


class CalibrationError(ValueError):
    """The calibration folder cannot be used."""


@dataclass(frozen=True)
class CalibrationSet:
    calibration: np.ndarray  # model inputs, batch axis first
    held_out: np.ndarray
    source: dict[str, Any]  # what verification.json records

    @property
    def synthetic(self) -> bool:
        return self.source["source"] == "synthetic"


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in _SUFFIXES)


def from_folder(folder: Path, config: ModelConfig) -> CalibrationSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder {folder} does not exist")
    files = image_files(folder)
    if len(files) < HELD_OUT_EVERY:
        raise CalibrationError(
            f"calibration folder {folder} has {len(files)} images; at least {HELD_OUT_EVERY} "
            f"needed (every {HELD_OUT_EVERY}th is held out to check the int8 model)"
        )
    inputs = np.stack([prepare_encoded(path.read_bytes(), config, _LIMITS) for path in files])
    held = np.arange(len(files)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return CalibrationSet(
        calibration=inputs[~held],
        held_out=inputs[held],
        source={
            "source": "folder",
            "path": str(folder.resolve()),
            "images": int((~held).sum()),
            "held_out": int(held.sum()),
            "held_out_rule": f"every {HELD_OUT_EVERY}th image in sorted path order",
        },
    )


def synthetic(config: ModelConfig, seed: int) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    calibration = random_inputs(config.input, SYNTHETIC_CALIBRATION, rng)
    held_out = random_inputs(config.input, SYNTHETIC_HELD_OUT, rng)
    return CalibrationSet(
        calibration=calibration,
        held_out=held_out,
        source={
            "source": "synthetic",
            "warning": "calibrated on seeded random inputs, not on images: pass --calibration "
            "DIR with representative images for a model meant to serve",
            "seed": seed,
            "images": SYNTHETIC_CALIBRATION,
            "held_out": SYNTHETIC_HELD_OUT,
        },
    )


def calibration_set(folder: Path | None, config: ModelConfig, seed: int) -> CalibrationSet:
    return synthetic(config, seed) if folder is None else from_folder(folder, config)
