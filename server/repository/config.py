"""``<name>/config.json``: what a model takes, how its images are prepared, how it is served.

The builder writes it, the server reads it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.repository.layout import CONFIG_FILE, LABELS_FILE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """The graph's image input.

    float32 graphs take NCHW tensors already normalized; uint8 graphs take
    NHWC RGB pixels and normalize inside the graph.
    """

    name: str = "images"
    dtype: Literal["float32", "uint8"] = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    size: int = Field(224, gt=0, description="height and width the graph expects")
    channels: Literal[3] = 3

    @model_validator(mode="after")
    def _layout_matches_dtype(self) -> InputSpec:
        expected = "NHWC" if self.dtype == "uint8" else "NCHW"
        if self.layout != expected:
            raise ValueError(f"a {self.dtype} input must use layout {expected}, got {self.layout}")
        return self

    def shape(self, batch: int = -1) -> list[int]:
        if self.layout == "NCHW":
            return [batch, self.channels, self.size, self.size]
        return [batch, self.size, self.size, self.channels]


class OutputSpec(_Strict):
    name: str = "logits"


class Preprocessing(_Strict):
    """torchvision's eval transform: Resize(resize) → CenterCrop(crop) → ToTensor → Normalize."""

    resize: int = Field(256, gt=0, description="shorter side after resizing")
    crop: int = Field(224, gt=0, description="center crop, square")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class Batching(_Strict):
    """Dynamic batching per model version (Triton's dynamic_batching)."""

    max_batch_size: int = Field(32, ge=1)
    max_queue_delay_us: int = Field(
        0, ge=0, description="wait at most this long for a fuller batch"
    )
    preferred_batch_sizes: tuple[int, ...] = ()
    refill_wait: float = Field(
        0.1,
        ge=0,
        le=1,
        description="with max_queue_delay_us 0: after a batch of n images, wait at most this "
        "fraction of its run time for n images to queue again (0: off)",
    )
    max_queue_size: int = Field(256, ge=1, description="images queued before RESOURCE_EXHAUSTED")

    @model_validator(mode="after")
    def _preferred_within_max(self) -> Batching:
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"preferred_batch_sizes {bad} outside 1..max_batch_size ({self.max_batch_size})"
            )
        return self


class Instances(_Strict):
    count: int = Field(1, ge=1, description="ONNX Runtime sessions per model version")
    intra_op_threads: int | None = Field(None, ge=1, description="None: decided by the server")


class ModelConfig(_Strict):
    name: str
    arch: str
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    num_classes: int = Field(gt=0)
    labels: str = Field(LABELS_FILE, description="file of class names, inside the model directory")
    input: InputSpec = InputSpec()
    output: OutputSpec = OutputSpec()
    preprocessing: Preprocessing = Preprocessing()
    batching: Batching = Batching()
    instances: Instances = Instances()

    @field_validator("labels")
    @classmethod
    def _labels_inside_model_dir(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or "\\" in value or path.is_absolute() or ".." in path.parts:
            raise ValueError(
                f"labels {value!r} must be a file inside the model directory, "
                "named by a relative path without '..'"
            )
        return value

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        return cls.model_validate_json((Path(model_dir) / CONFIG_FILE).read_text())

    def dump(self, model_dir: Path) -> Path:
        path = Path(model_dir) / CONFIG_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path
