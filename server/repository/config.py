"""``<name>/config.json``: what a model takes, how its images are prepared, how it is served.

The builder writes it, the server reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

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
        description="with max_queue_delay_us 0: after a batch of n images, with q more "
        "queued by then, wait at most this fraction of its run time for n + q images to queue "
        "(0: off)",
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


class TensorRT(_Strict):
    """ONNX Runtime's TensorRT execution provider, tried before CUDA (Triton's
    ``gpu_execution_accelerator: [{name: "tensorrt"}]``). Engines are built for batch sizes
    1..max_batch_size and cached in the server's ``--tensorrt-cache-dir``."""

    precision: Literal["fp32", "fp16"] = Field(
        "fp16", description="fp16: TensorRT may run layers in half precision (trt_fp16_enable)"
    )
    max_workspace_bytes: int = Field(
        1 << 30, gt=0, description="scratch memory TensorRT may use while it builds an engine"
    )


class CudaOptions(_Strict):
    """How the model runs on the CUDA execution provider; ignored on the CPU."""

    use_tf32: bool = Field(
        False,
        description="TF32 matrix maths on Ampere and later: faster, but fp32 logits then drift "
        "beyond the build's fp32 check (ONNX Runtime turns it on unless told)",
    )
    batch_buckets: tuple[int, ...] = Field(
        (),
        description="pad each batch up to the smallest of these sizes (max_batch_size is "
        "always one) and warm only them; empty: no padding, every size 1..max_batch_size "
        "is warmed",
    )
    graphs: bool = Field(
        False,
        description="capture one CUDA graph per bucket size and replay it (needs batch_buckets "
        "or runs every batch at max_batch_size); every node must run on the GPU",
    )

    @field_validator("batch_buckets")
    @classmethod
    def _buckets_sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 for b in value):
            raise ValueError(f"batch_buckets {list(value)} must be positive")
        return tuple(sorted(set(value)))


class Optimization(_Strict):
    """Execution-provider options per model, as Triton's ``optimization`` section holds them."""

    cuda: CudaOptions = CudaOptions()
    tensorrt: TensorRT | None = Field(
        None, description="opt in to the TensorRT execution provider (falls back to CUDA)"
    )
class LatestVersions(_Strict):
    num_versions: int = Field(1, ge=1, description="how many of the highest versions serve")


class AllVersions(_Strict):
    pass


class SpecificVersions(_Strict):
    versions: tuple[int, ...] = Field(min_length=1, description="the version numbers that serve")

    @field_validator("versions")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 1 for v in value):
            raise ValueError(f"versions {list(value)}: each must be a positive integer")
        return tuple(sorted(set(value)))


class VersionPolicy(_Strict):
    """Which versions of a model serve: Triton's ``version_policy``, one of

    ``{"latest": {"num_versions": N}}``  the N highest versions that pass the version check
                                        (a refused version does not take a place);
    ``{"all": {}}``                      every version in the repository (the default);
    ``{"specific": {"versions": [...]}}`` those versions.

    The default is ``all``, not Triton's ``latest 1``: every version of a repository has
    always been served here, and a client that names its version keeps working when a new
    one is published. ``latest`` makes publishing a version also retire the old one.
    """

    latest: LatestVersions | None = None
    all: AllVersions | None = None
    specific: SpecificVersions | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        given = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"version_policy takes exactly one of latest, all, specific; got {given or 'none'}"
            )
        return self

    @model_serializer(mode="wrap")
    def _only_the_one_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    def describe(self) -> str:
        """``latest 1``, ``all``, ``specific 1, 3``: how logs and listings name it."""
        if self.latest is not None:
            return f"latest {self.latest.num_versions}"
        if self.specific is not None:
            return "specific " + ", ".join(str(v) for v in self.specific.versions)
        return "all"

    def excluded(self) -> str:
        """Why a version that passes the check does not serve, as listings say it."""
        return f"not in the version policy ({self.describe()})"

    def select(self, versions: Sequence[int], servable: Callable[[int], bool]) -> list[int]:
        """The versions of `versions` (the repository's) that should serve, ascending.

        `servable(v)` is asked only for ``latest``, highest version first, until enough
        are found: the others need no check to be chosen.
        """
        if self.specific is not None:
            return [v for v in sorted(versions) if v in self.specific.versions]
        if self.latest is not None:
            chosen: list[int] = []
            for v in sorted(versions, reverse=True):
                if len(chosen) == self.latest.num_versions:
                    break
                if servable(v):
                    chosen.append(v)
            return sorted(chosen)
        return sorted(versions)


SERVE_ALL = VersionPolicy(all=AllVersions())


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
    version_policy: VersionPolicy = SERVE_ALL
    optimization: Optimization = Optimization()

    @model_validator(mode="after")
    def _buckets_within_max(self) -> ModelConfig:
        most = self.batching.max_batch_size
        bad = [b for b in self.optimization.cuda.batch_buckets if b > most]
        if bad:
            raise ValueError(f"batch_buckets {bad} above max_batch_size ({most})")
        return self

    def batch_buckets(self) -> tuple[int, ...]:
        """The padded batch sizes on CUDA, max_batch_size included; () when padding is off."""
        cuda = self.optimization.cuda
        if not cuda.batch_buckets and not cuda.graphs:
            return ()
        return tuple(sorted({*cuda.batch_buckets, self.batching.max_batch_size}))

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
