"""The builder's Python API: ``build`` a verified version into a repository,
``verify_version`` re-runs the checks on a published one.

from builder.build import build
from builder.options import BuildOptions
result = build(BuildOptions(arch="resnet50", repo=Path("models")))
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from pydantic import ValidationError
from torch import nn
from tqdm import tqdm

from builder.architectures import ArchSpec
from builder.calibration import CalibrationSet, calibration_set, synthetic
from builder.checks import (
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
from builder.conversion import to_fp16, to_int8
from builder.export import export_onnx
from builder.graph_input import PixelInput, preprocessing_for
from builder.labels import labels_for
from builder.options import BuildOptions
from builder.precision import Precision
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
from builder.weights import resolve_weights
from server.repository import (
    MODEL_FILE,
    VERIFICATION_FILE,
    InputSpec,
    ModelConfig,
    Verification,
    sha256_file,
)


class VerificationFailed(RuntimeError):
    """A check failed; nothing was written to the repository."""

    def __init__(self, report: Report) -> None:
        self.report = report
        super().__init__(f"verification failed: {report.failure_summary()}")


def effective_thresholds(
    options: BuildOptions, arch: ArchSpec, thresholds: Thresholds | None = None
) -> Thresholds:
    """The given thresholds, else fp16's or the defaults, widened where the row asks for it."""
    if thresholds is not None:
        return thresholds
    if options.precision is Precision.FP16:
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
    return calibration_set(recipe.calibration, config, recipe.seed)


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
    thresholds: Thresholds,
    calibration: dict[str, Any] | None,
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
        recipe=recipe.model_dump(mode="json"),
        thresholds={
            "max_abs_error": thresholds.max_abs_error,
            "max_rel_error": thresholds.max_rel_error,
            "macs_rel_tolerance": thresholds.macs_rel_tolerance,
            "batch_sizes": list(thresholds.batch_sizes),
            "min_top1_agreement": thresholds.min_top1_agreement,
        },
        precision=recipe.precision.value,
        calibration=calibration,
        software={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        checks=[check.to_json() for check in report.checks],
        seconds={stage: round(value, 2) for stage, value in seconds.items()},
    )


def build(options: BuildOptions, thresholds: Thresholds | None = None) -> BuildResult:
    """Export, verify and publish one version. Raises :class:`VerificationFailed` (leaving
    nothing behind) when a check fails. ``thresholds``: default fp16's or the defaults."""
    arch = REGISTRY.get(options.arch)
    name = options.name or arch.name
    model_dir = Path(options.repo) / name
    version = next_version(model_dir) if options.version is None else options.version
    if (model_dir / str(version)).exists():
        raise RepositoryError(f"{model_dir / str(version)} exists; versions are never overwritten")
    num_classes = options.num_classes or arch.default_num_classes
    labels = list(options.labels) if options.labels else labels_for(arch, num_classes)
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels for {num_classes} classes")
    config = model_config(name, arch, num_classes, options.input_dtype)
    check_config_compatible(model_dir, config)
    thresholds = effective_thresholds(options, arch, thresholds)
    calibration = (
        calibration_set(options.calibration, config, options.seed)
        if options.precision is Precision.INT8
        else None
    )
    weights = None if options.weights is None else resolve_weights(options.weights, arch.name)
    recipe = Recipe.model_validate(
        options.model_dump()
        | {
            "name": name,
            "version": version,
            "num_classes": num_classes,
            "weights": None if weights is None else weights.path,
            "weights_sha256": None if weights is None else weights.sha256,
            "weights_origin": None if weights is None else weights.origin,
            "calibration": None if options.calibration is None else options.calibration.resolve(),
        }
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
            export_onnx(module, sample, path, recipe.opset)
        else:
            fp32_path = staged / "fp32.onnx"
            export_onnx(module, sample, fp32_path, recipe.opset)
            if calibration is None:
                to_fp16(fp32_path, path, recipe.fp16_io)
            else:
                to_int8(fp32_path, path, config.input.name, calibration.calibration)
            fp32_path.unlink()
        seconds["export"] = time.perf_counter() - started
        held_out = None if calibration is None else calibration.held_out
        report = Report(run_checks(path, config, recipe, module, thresholds, held_out))
        seconds["checks"] = time.perf_counter() - started - seconds["export"]
        source = None if calibration is None else calibration.source
        verification_record(report, path, recipe, thresholds, source, seconds).write(staged)
        if not report.passed:
            raise VerificationFailed(report)
        target = publish_version(staged, model_dir, version, config, labels)
    return BuildResult(target, report, seconds, removed)


def _rebuild_problem(recipe: Recipe) -> str | None:
    """Why the PyTorch model cannot be rebuilt as it was exported, or None if it can."""
    if recipe.weights is None:
        return None
    path = recipe.weights
    if not path.is_file():
        return f"weights {path} not found"
    if sha256_file(path) != recipe.weights_sha256:
        return f"weights {path} changed since the build (sha256 differs)"
    return None


def _calibration_problem(recipe: Recipe) -> str | None:
    """Why an int8 version's held-out images cannot be read again, or None."""
    if recipe.calibration is not None and not recipe.calibration.is_dir():
        return f"calibration folder {recipe.calibration} not found"
    return None


def verify_version(version_dir: Path, thresholds: Thresholds | None = None) -> Report:
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
    try:
        recipe = Recipe.model_validate(record.recipe)
    except ValidationError as exc:
        raise RepositoryError(
            f"{record_path}: its recipe is not one this builder can rebuild from "
            f"(built by an older builder?): {exc}"
        ) from None
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
