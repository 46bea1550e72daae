"""The builder's one options object: what `resnet-serve build` takes, as typed fields.

`BuildOptions` is built from the command line (each field is a flag, derived by
`server.repository.flags`), from Python (``BuildOptions(arch="resnet50", seed=3)``, keyword
arguments only), or from a verification.json recipe (`builder.recipe.Recipe` is the same
fields, resolved, plus what the build read). Adding an option is one field here plus its use.

Torch-free: argument parsing imports it in the runtime image.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from builder.architectures import Layout
from builder.precision import Precision
from builder.registry import REGISTRY, UnknownArchitectureError
from server.repository.flags import Flag

DEFAULT_OPSET = 18
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def canonical_arch(name: str) -> str:
    """The registry's spelling of an architecture; unknown names raise, listing the known."""
    try:
        return REGISTRY.get(name).name
    except UnknownArchitectureError as exc:
        raise ValueError(str(exc)) from None


def architecture_argument(name: str) -> str:
    try:
        return canonical_arch(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Class names from a file, one per line; blank lines are skipped."""
    lines = Path(path).read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip())


class ModelOptions(BaseModel):
    """What, beside the architecture, decides the PyTorch model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_classes: int | None = Field(
        None, ge=1, description="size of the head (default: 1000, CIFAR 10)"
    )
    layout: Layout = Field(
        Layout.TORCHVISION,
        description="bottleneck stride on the 3x3 (torchvision) or on the first 1x1 "
        "(original paper)",
    )
    zero_init_last: bool = Field(False, description="zero each block's last BatchNorm weight")
    seed: int = Field(0, description="seed of the random weights")
    stochastic_depth: Annotated[float | None, Flag(const=0.5, metavar="P_L")] = Field(
        None,
        gt=0.0,
        le=1.0,
        description="record stochastic depth (survival of the last block P_L, default 0.5, "
        "linear decay) in the recipe; a training option: the exported graph is the eval net "
        "either way",
    )

    def updated(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated as a new object is (``model_copy`` is not)."""
        return type(self).model_validate(self.model_dump() | changes)


class BuildOptions(ModelOptions):
    """Everything one build takes: the model's options, the export's, and where it goes."""

    arch: Annotated[
        str, AfterValidator(canonical_arch), Flag(positional=True, read=architecture_argument)
    ] = Field(description=f"one of: {', '.join(REGISTRY.names())}")
    weights: Annotated[str | Path | None, Flag(metavar="FILE|URL|torchvision")] = Field(
        None,
        description="torchvision-format checkpoint (.pth, .safetensors): a file, a URL "
        "(fetched into the torch hub cache), or 'torchvision' for torchvision's ImageNet "
        "weights of ARCH (from the torch hub cache, else fetched); default: seeded random "
        "weights, which classify nothing",
    )
    repo: Path = Field(Path("models"), description="model repository")
    name: str | None = Field(
        None,
        pattern=_NAME_PATTERN,
        description="model name in the repository, of letters, digits, '_', '-', '.' "
        "(default: ARCH)",
    )
    version: int | None = Field(
        None, ge=1, description="version number (default: 1 for a new model, else highest + 1)"
    )
    opset: int = Field(DEFAULT_OPSET, ge=1, description="ONNX opset")
    input_dtype: Annotated[Literal["float32", "uint8"], Flag(name="--input")] = Field(
        "float32",
        description="float32: normalized NCHW; uint8: raw RGB pixels NHWC, normalized in the graph",
    )
    labels: Annotated[tuple[str, ...] | None, Flag(metavar="FILE", read=read_labels)] = Field(
        None,
        description="class names, one per line (default: ImageNet's, CIFAR-10's, or class_<i>)",
    )
    precision: Precision = Field(
        Precision.FP32,
        description="fp32; fp16 (GPUs: float16 weights and compute, float32 IO unless "
        "--fp16-io); int8 (CPUs: static QDQ quantization, per-channel weights)",
    )
    fp16_io: bool = Field(False, description="fp16: float16 graph inputs and outputs")
    calibration: Annotated[Path | None, Flag(metavar="DIR")] = Field(
        None,
        description="int8: folder of representative images (every 5th is held out to check "
        "agreement with fp32); default: a synthetic set, flagged in verification.json",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BuildOptions:
        """Options that contradict each other are refused, not silently dropped."""
        if self.fp16_io and self.precision is not Precision.FP16:
            raise ValueError("fp16 IO needs --precision fp16")
        if self.fp16_io and self.input_dtype != "float32":
            raise ValueError("fp16 IO replaces float32 inputs; a uint8 input stays uint8")
        if self.calibration is not None and self.precision is not Precision.INT8:
            raise ValueError("a calibration folder is for --precision int8 only")
        return self


def default_note(_: str, field: FieldInfo) -> str:
    """`` (default: X)`` after a flag's help, where the default is a value to show."""
    default = field.default
    if default is None or isinstance(default, bool) or field.is_required():
        return ""
    return f" (default: {getattr(default, 'value', default)})"
