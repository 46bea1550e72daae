"""The builder's Python API: ``build`` a verified version into a repository, ``verify`` one.

from builder.build import BuildRequest, build
result = build(BuildRequest("resnet50", repo=Path("models")))
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from torch import nn
from tqdm import tqdm

from builder.architectures import ArchSpec, Layout
from builder.calibration import CalibrationSet, calibration_set, from_folder, synthetic
from builder.conversion import to_fp16, to_int8
from builder.export import DEFAULT_OPSET, export_onnx
from builder.labels import labels_for
from builder.precision import Precision
from builder.preprocessing import PixelInput, preprocessing_for
from builder.recipe import Recipe
from builder.registry import REGISTRY
from builder.repository import (
    RepositoryError,
    check_config_compatible,
    next_version,
    publish_version,
    remove_abandoned_staging,
    staging_dir,
)
from builder.verify import (
    FP16_THRESHOLDS,
    Check,
    Reference,
    Report,
    Thresholds,
    check_agreement,
    check_macs,
    check_onnx,
    check_parameters,
    check_runtime,
    check_shapes,
    random_inputs,
)
from builder.weights import weights_source
from server.repository import (
    MODEL_FILE,
    VERIFICATION_FILE,
    InputSpec,
    ModelConfig,
    Verification,
    sha256_file,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class VerificationFailed(RuntimeError):
    """A check failed; nothing was written to the repository."""

    def __init__(self, report: Report) -> None:
        self.report = report
        super().__init__(f"verification failed: {report.failure_summary()}")


@dataclass(frozen=True)
class BuildRequest:
    arch: str
    repo: Path = Path("models")
    name: str | None = None  # default: the architecture's name
    version: int | None = None  # default: 1 for a new model, else one past the highest
    weights: Path | None = None  # torchvision-format checkpoint; default: seeded random weights
    num_classes: int | None = None  # default: the architecture's (1000 or 10)
    input_dtype: Literal["float32", "uint8"] = "float32"
    opset: int = DEFAULT_OPSET
    seed: int = 0
    layout: Layout = Layout.TORCHVISION
    zero_init_last: bool = False
    stochastic_depth: float | None = None  # p_L; training only, the exported graph is the same
    precision: Precision = Precision.FP32
    fp16_io: bool = False  # fp16: float16 graph inputs and outputs instead of float32
    calibration: Path | None = None  # int8: a folder of images; default: a synthetic set
    labels: tuple[str, ...] | None = None  # default: the dataset's class names
    thresholds: Thresholds | None = None  # default: FP16_THRESHOLDS for fp16, else Thresholds()

    def check_options(self) -> None:
        """Raise ValueError on options that contradict each other."""
        if self.fp16_io and self.precision is not Precision.FP16:
            raise ValueError("fp16 IO needs --precision fp16")
        if self.fp16_io and self.input_dtype != "float32":
            raise ValueError("fp16 IO replaces float32 inputs; a uint8 input stays uint8")
        if self.calibration is not None and self.precision is not Precision.INT8:
            raise ValueError("a calibration folder is for --precision int8 only")

    def effective_thresholds(self, arch: ArchSpec) -> Thresholds:
        """The request's, else fp16's or the defaults, widened where the row asks for it."""
        if self.thresholds is not None:
            return self.thresholds
        if self.precision is Precision.FP16:
            return FP16_THRESHOLDS
        if arch.max_rel_error is not None:
            return Thresholds(max_rel_error=max(arch.max_rel_error, Thresholds().max_rel_error))
        return Thresholds()


@dataclass(frozen=True)
class BuildResult:
    version_dir: Path
    report: Report
    seconds: dict[str, float]  # wall time of the stages: model, export, checks
    # Staging directories of killed builds that this build removed first.
    removed: list[Path] = field(default_factory=list)


def model_config(name: str, arch: ArchSpec, num_classes: int, input_dtype: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        arch=arch.name,
        num_classes=num_classes,
        input=InputSpec(
            dtype=input_dtype,
            layout="NHWC" if input_dtype == "uint8" else "NCHW",
            size=arch.input_size,
        ),
        preprocessing=preprocessing_for(arch),
    )


def graph_module(model: nn.Module, config: ModelConfig) -> nn.Module:
    """What gets exported: the net, behind the in-graph preprocessing for uint8 inputs."""
    if config.input.dtype == "uint8":
        return PixelInput(model, config.preprocessing).eval()
    return model


def torch_reference(module: nn.Module) -> Reference:
    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()

    return run


def held_out_set(recipe: Recipe, config: ModelConfig) -> CalibrationSet:
    """The int8 calibration set a recipe records, rebuilt (its held-out part is checked)."""
    record = recipe.calibration or {}
    if record.get("source") == "folder":
        return from_folder(Path(record["path"]), config)
    return synthetic(config, int(record.get("seed", recipe.seed)))


def run_checks(
    path: Path,
    config: ModelConfig,
    recipe: Recipe,
    module: nn.Module | None,
    thresholds: Thresholds,
    held_out: np.ndarray | None = None,
) -> list[Check]:
    """All checks on an exported file; without the PyTorch module, those the ONNX file allows.

    int8 graphs are compared by top-1 agreement on ``held_out`` (default: rebuilt from the
    recipe's calibration record) instead of by logits.
    """
    arch = REGISTRY.get(recipe.arch)
    try:
        proto = onnx.load(str(path))
    except DecodeError as exc:
        return [Check("onnx_checker", False, detail=f"{path.name} is not an ONNX model: {exc}")]
    reference = None if module is None else torch_reference(module)
    if recipe.precision is Precision.INT8:
        inputs = held_out if held_out is not None else held_out_set(recipe, config).held_out
        outputs: Callable[[], Check] = partial(
            check_agreement, path, config, reference, inputs, thresholds.min_top1_agreement
        )
    else:
        outputs = partial(
            check_runtime, path, config, reference, thresholds, recipe.seed, recipe.io_dtype
        )
    steps: list[Callable[[], Check]] = [
        lambda: check_onnx(path),
        lambda: check_shapes(proto, config, recipe.io_dtype),
        outputs,
        lambda: check_macs(
            proto, arch, recipe.layout, config.num_classes, thresholds.macs_rel_tolerance
        ),
    ]
    if module is not None:
        counted = sum(p.numel() for p in module.parameters())
        steps.append(lambda: check_parameters(counted, arch, config.num_classes))
    return [
        step() for step in tqdm(steps, desc="verifying", unit="check", leave=False, disable=None)
    ]


def verification_record(
    report: Report,
    model_path: Path,
    recipe: Recipe,
    opset: int,
    thresholds: Thresholds,
    seconds: dict[str, float],
) -> Verification:
    """The content of verification.json. The server trusts a version only if ``passed`` is
    true and ``sha256`` is the hash of model.onnx."""
    return Verification(
        passed=report.passed,
        sha256=sha256_file(model_path),
        model_file=MODEL_FILE,
        scope=report.scope,
        seed=recipe.seed,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        recipe=recipe.to_json() | {"opset": opset},
        thresholds={
            "max_abs_error": thresholds.max_abs_error,
            "max_rel_error": thresholds.max_rel_error,
            "macs_rel_tolerance": thresholds.macs_rel_tolerance,
            "batch_sizes": list(thresholds.batch_sizes),
            "min_top1_agreement": thresholds.min_top1_agreement,
        },
        precision=recipe.precision.value,
        calibration=recipe.calibration,
        software={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        checks=[check.to_json() for check in report.checks],
        seconds={stage: round(value, 2) for stage, value in seconds.items()},
    )


def build(request: BuildRequest) -> BuildResult:
    """Export, verify and publish one version. Raises :class:`VerificationFailed` (leaving
    nothing behind) when a check fails."""
    request.check_options()
    arch = REGISTRY.get(request.arch)
    name = request.name or arch.name
    if not _NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.'")
    if request.num_classes is not None and request.num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {request.num_classes}")
    model_dir = Path(request.repo) / name
    version = next_version(model_dir) if request.version is None else request.version
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    if (model_dir / str(version)).exists():
        raise RepositoryError(f"{model_dir / str(version)} exists; versions are never overwritten")
    num_classes = request.num_classes or arch.default_num_classes
    labels = list(request.labels) if request.labels else labels_for(arch, num_classes)
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels for {num_classes} classes")
    config = model_config(name, arch, num_classes, request.input_dtype)
    check_config_compatible(model_dir, config)
    thresholds = request.effective_thresholds(arch)
    calibration = (
        calibration_set(request.calibration, config, request.seed)
        if request.precision is Precision.INT8
        else None
    )

    recipe = Recipe(
        arch=arch.name,
        num_classes=num_classes,
        layout=request.layout,
        seed=request.seed,
        zero_init_last=request.zero_init_last,
        weights=None if request.weights is None else weights_source(request.weights),
        stochastic_depth=request.stochastic_depth,
        precision=request.precision,
        fp16_io=request.fp16_io,
        calibration=None if calibration is None else calibration.source,
    )
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    module = graph_module(recipe.model(), config)
    sample = torch.from_numpy(random_inputs(config.input, 1, np.random.default_rng(recipe.seed)))
    seconds["model"] = time.perf_counter() - started
    removed = remove_abandoned_staging(model_dir)
    with staging_dir(model_dir) as staged:
        path = staged / MODEL_FILE
        started = time.perf_counter()
        if recipe.precision is Precision.FP32:
            export_onnx(module, sample, path, request.opset)
        else:
            fp32_path = staged / "fp32.onnx"
            export_onnx(module, sample, fp32_path, request.opset)
            if calibration is None:
                to_fp16(fp32_path, path, request.fp16_io)
            else:
                to_int8(fp32_path, path, config.input.name, calibration.calibration)
            fp32_path.unlink()
        seconds["export"] = time.perf_counter() - started
        held_out = None if calibration is None else calibration.held_out
        report = Report(run_checks(path, config, recipe, module, thresholds, held_out))
        seconds["checks"] = time.perf_counter() - started - seconds["export"]
        verification_record(report, path, recipe, request.opset, thresholds, seconds).write(staged)
        if not report.passed:
            raise VerificationFailed(report)
        target = publish_version(staged, model_dir, version, config, labels)
    return BuildResult(target, report, seconds, removed)


def _rebuild_problem(recipe: Recipe) -> str | None:
    """Why the PyTorch model cannot be rebuilt as it was exported, or None if it can."""
    if recipe.weights is None:
        return None
    path = recipe.weights.path
    if not path.is_file():
        return f"weights {path} not found"
    if sha256_file(path) != recipe.weights.sha256:
        return f"weights {path} changed since the build (sha256 differs)"
    return None


def _calibration_problem(recipe: Recipe) -> str | None:
    """Why an int8 version's held-out images cannot be read again, or None."""
    record = recipe.calibration or {}
    if record.get("source") == "folder" and not Path(record["path"]).is_dir():
        return f"calibration folder {record['path']} not found"
    return None


def verify(version_dir: Path, thresholds: Thresholds | None = None) -> Report:
    """Re-run the checks on a published version, against a rebuilt PyTorch model if possible."""
    version_dir = Path(version_dir)
    record_path, model_path = version_dir / VERIFICATION_FILE, version_dir / MODEL_FILE
    for required in (record_path, model_path):
        if not required.is_file():
            raise RepositoryError(f"{version_dir} is not a model version: no {required.name}")
    record = Verification.load(version_dir)
    if record.recipe is None:
        raise RepositoryError(f"{record_path} does not record how the model was built")
    config = ModelConfig.load(version_dir.parent)
    recipe = Recipe.from_json(record.recipe)
    if thresholds is None:
        recorded = record.thresholds
        thresholds = replace(
            Thresholds(),
            **{k: v for k, v in recorded.items() if k != "batch_sizes"},
            batch_sizes=tuple(recorded.get("batch_sizes", Thresholds().batch_sizes)),
        )
    actual = sha256_file(model_path)
    recorded_hash = record.sha256
    sha_check = Check(
        "sha256",
        actual == recorded_hash,
        {"actual": actual},
        {"recorded": recorded_hash},
        "model.onnx matches its record" if actual == recorded_hash else "model.onnx was modified",
    )
    problem = _rebuild_problem(recipe) or _calibration_problem(recipe)
    module = None if problem else graph_module(recipe.model(), config)
    held_out = None
    if recipe.precision is Precision.INT8 and problem is not None:
        held_out = synthetic(config, recipe.seed).held_out  # runs, but nothing to compare with
    return Report(
        [sha_check, *run_checks(model_path, config, recipe, module, thresholds, held_out)],
        scope="full" if problem is None else f"onnx-only: {problem}",
    )
