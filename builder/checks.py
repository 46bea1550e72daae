"""The checks every build runs, with their figures and thresholds.

- ``onnx_checker``: ``onnx.checker`` full check (which includes strict shape inference);
- ``shape_inference``: the inferred input and output shapes match the config's input spec
  and head, with a symbolic batch axis;
- ``onnxruntime_vs_pytorch``: ONNX Runtime (CPUExecutionProvider) against the PyTorch model
  on fresh seeded random inputs at several batch sizes (fp32 and fp16 graphs, each with
  its own limits);
- ``top1_agreement`` (int8 graphs): the share of held-out images on which the int8 graph's
  top-1 class is the fp32 PyTorch model's;
- ``parameter_count``: the PyTorch model's parameters against the reference table;
- ``multiply_adds``: multiply-adds counted from the graph against the papers' figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import shape_inference

from builder.architectures import ArchSpec, Layout
from builder.flops import count_macs
from builder.tables import format_table
from server.repository import InputSpec, ModelConfig, top1_agreement

Reference = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Thresholds:
    """Pass limits. ``max_rel_error`` is the largest error over the largest reference logit.

    float32 rounding differs between PyTorch and ONNX Runtime (BatchNorm is folded into the
    convolutions, kernels sum in other orders) and grows with depth: measured with seeded
    weights, resnet18 2e-6, resnet50 5e-5, resnet101 1.4e-4 relative.
    """

    max_abs_error: float = 5e-3
    max_rel_error: float = 1e-3
    macs_rel_tolerance: float = 0.03  # the papers round to 0.1 G; layouts differ by ~2 %
    batch_sizes: tuple[int, ...] = (1, 4, 7)
    # int8: random-weight nets have nearly flat logits, so near-ties flip under quantization
    # (on synthetic inputs resnet50 agrees on ~90 %, resnet18 with uint8 pixels on ~80 %);
    # a trained net on real images agrees on >= 99 % (the digits model of the tests).
    min_top1_agreement: float = 0.7


FP16_THRESHOLDS = Thresholds(max_abs_error=0.25, max_rel_error=0.05)
"""float16 keeps 11 significant bits: measured with seeded weights, resnet18 3e-3,
resnet50 2.7e-2 relative to the largest logit, top-1 unchanged."""


@dataclass
class Check:
    name: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    checks: list[Check]
    scope: str = "full"

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def failure_summary(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failures())

    def table(self) -> str:
        rows = [("check", "result", "detail")]
        rows += [(c.name, "pass" if c.passed else "FAIL", c.detail) for c in self.checks]
        return format_table(rows)


def check_onnx(path: Path) -> Check:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return Check("onnx_checker", False, detail=f"invalid model: {exc}")
    return Check("onnx_checker", True, detail="full check passed")


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def check_shapes(model: onnx.ModelProto, config: ModelConfig, io_dtype: str | None = None) -> Check:
    """``io_dtype``: the graph's input dtype when it differs from the config's (fp16 IO)."""
    try:
        graph = shape_inference.infer_shapes(model, strict_mode=True).graph
    except shape_inference.InferenceError as exc:
        return Check("shape_inference", False, detail=f"shape inference failed: {exc}")
    spec, output = config.input, config.output.name
    inputs = {v.name: _dims(v) for v in graph.input}
    outputs = {v.name: _dims(v) for v in graph.output}
    expected_in: list[int | str] = ["batch", *spec.shape(batch=0)[1:]]
    expected_out: list[int | str] = ["batch", config.num_classes]
    figures = {"inputs": inputs, "outputs": outputs}
    thresholds = {"input": expected_in, "output": expected_out}
    problems = []
    for kind, name, got, expected in (
        ("input", spec.name, inputs.get(spec.name), expected_in),
        ("output", output, outputs.get(output), expected_out),
    ):
        if got is None or got[1:] != expected[1:] or isinstance(got[0], int):
            shown = "missing" if got is None else _format_dims(got)
            problems.append(f"{kind} {name} is {shown}, expected {_format_dims(expected)}")
    expected_dtype = np.dtype(io_dtype or spec.dtype)
    for kind, value in (("input", graph.input[0]), ("output", graph.output[0])):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        wanted = expected_dtype if kind == "input" else np.dtype(io_dtype or "float32")
        if dtype != wanted:
            problems.append(f"{kind} dtype is {dtype}, expected {wanted}")
    if problems:
        return Check("shape_inference", False, figures, thresholds, "; ".join(problems))
    detail = f"{_format_dims(inputs[spec.name])} -> {_format_dims(outputs[output])}"
    return Check("shape_inference", True, figures, thresholds, detail)


def _format_dims(dims: list[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def random_inputs(spec: InputSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    shape = spec.shape(batch)
    if spec.dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(size=shape, dtype=np.float32)


def cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_runtime(
    path: Path,
    config: ModelConfig,
    reference: Reference | None,
    thresholds: Thresholds,
    seed: int,
    io_dtype: str | None = None,
) -> Check:
    """ORT vs PyTorch per batch size; with no reference, only finite outputs of the right shape.

    ``io_dtype``: the graph's input and output dtype when it differs from the config's
    (fp16 IO); ONNX Runtime is fed the same inputs cast to it, the logits read back as float32.
    """
    spec, num_classes = config.input, config.num_classes
    session = cpu_session(path)
    rng = np.random.default_rng(seed)
    per_batch: dict[str, dict[str, float]] = {}
    problems: list[str] = []
    for batch in thresholds.batch_sizes:
        images = random_inputs(spec, batch, rng)
        feed = images if io_dtype is None else images.astype(io_dtype)
        (logits,) = session.run([config.output.name], {spec.name: feed})
        logits = logits.astype(np.float32, copy=False)
        if logits.shape != (batch, num_classes):
            problems.append(f"batch {batch}: output shape {logits.shape}")
            continue
        if not np.isfinite(logits).all():
            problems.append(f"batch {batch}: non-finite outputs")
            continue
        if reference is None:
            per_batch[str(batch)] = {"max_abs_logit": float(np.abs(logits).max())}
            continue
        expected = reference(images)
        abs_error = float(np.abs(logits - expected).max())
        scale = float(np.abs(expected).max())
        rel_error = abs_error / scale if scale else abs_error
        per_batch[str(batch)] = {
            "max_abs_error": abs_error,
            "max_rel_error": rel_error,
            "max_abs_logit": scale,
        }
        if abs_error > thresholds.max_abs_error:
            problems.append(
                f"batch {batch}: max_abs_error {abs_error:.3g} > {thresholds.max_abs_error:g}"
            )
        if rel_error > thresholds.max_rel_error:
            problems.append(
                f"batch {batch}: max_rel_error {rel_error:.3g} > {thresholds.max_rel_error:g}"
            )
    limits: dict[str, Any] = {"batch_sizes": list(thresholds.batch_sizes), "input_seed": seed}
    if reference is not None:
        limits |= {
            "max_abs_error": thresholds.max_abs_error,
            "max_rel_error": thresholds.max_rel_error,
        }
    name = "onnxruntime_vs_pytorch" if reference is not None else "onnxruntime_runs"
    if problems:
        return Check(name, False, {"batches": per_batch}, limits, "; ".join(problems))
    if reference is None:
        detail = f"batches {list(thresholds.batch_sizes)}: finite, shape [batch, {num_classes}]"
    else:
        worst_abs = max(v["max_abs_error"] for v in per_batch.values())
        worst_rel = max(v["max_rel_error"] for v in per_batch.values())
        detail = (
            f"batches {list(thresholds.batch_sizes)}: max abs {worst_abs:.2g} "
            f"(<= {thresholds.max_abs_error:g}), "
            f"rel {worst_rel:.2g} (<= {thresholds.max_rel_error:g})"
        )
    return Check(name, True, {"batches": per_batch}, limits, detail)


def check_agreement(
    path: Path,
    config: ModelConfig,
    reference: Reference | None,
    held_out: np.ndarray,
    minimum: float,
) -> Check:
    """Top-1 of the (int8) graph vs the fp32 PyTorch model on held-out inputs."""
    session = cpu_session(path)
    batches = [held_out[i : i + 16] for i in range(0, len(held_out), 16)]
    logits = np.concatenate(
        [session.run([config.output.name], {config.input.name: b})[0] for b in batches]
    )
    limits = {"min_top1_agreement": minimum}
    if not np.isfinite(logits).all():
        return Check("top1_agreement", False, {}, limits, "non-finite outputs")
    if reference is None:
        detail = f"{len(held_out)} held-out inputs: finite, no fp32 model to compare with"
        return Check("top1_agreement", True, {"images": len(held_out)}, limits, detail)
    expected = np.concatenate([reference(b) for b in batches])
    judged = top1_agreement(expected, logits, error_bound=0.0)
    agreement = judged.rate
    figures = {
        "images": len(held_out),
        "agreement": agreement,
        "max_abs_error": judged.max_abs_error,
        "max_abs_logit": float(np.abs(expected).max()),
    }
    passed = agreement >= minimum
    detail = (
        f"{agreement:.2%} of {len(held_out)} held-out inputs "
        f"({'>=' if passed else '<'} {minimum:.0%})"
    )
    return Check("top1_agreement", passed, figures, limits, detail)


def check_parameters(counted: int, arch: ArchSpec, num_classes: int) -> Check:
    reference = arch.params_for(num_classes)
    tolerance = arch.reference_params_tolerance
    if reference is None:
        figures = {"counted": counted, "reference": None}
        detail = f"{counted:,} counted; no published figure"
        return Check("parameter_count", True, figures, {}, detail)
    difference = counted - reference
    figures = {"counted": counted, "reference": reference, "difference": difference}
    limits = {"max_abs_difference": tolerance}
    passed = abs(difference) <= tolerance
    if passed:
        relation = "==" if tolerance == 0 else f"within ±{tolerance:,} of"
        detail = f"{counted:,} {relation} {reference:,}"
    else:
        detail = f"{counted:,} differs from the reference {reference:,} by {difference:+,}"
    return Check("parameter_count", passed, figures, limits, detail)


def check_macs(
    model: onnx.ModelProto, arch: ArchSpec, layout: Layout, num_classes: int, tolerance: float
) -> Check:
    try:
        count = count_macs(model)
    except ValueError as exc:
        return Check("multiply_adds", False, detail=f"cannot count: {exc}")
    reference = arch.macs_for(layout, num_classes)
    figures: dict[str, Any] = {"counted": count.total, "by_op": count.by_op, "reference": reference}
    limits = {"max_rel_difference": tolerance}
    if reference is None:
        return Check(
            "multiply_adds",
            True,
            figures,
            limits,
            f"{count.total / 1e9:.3f} G counted; no published figure for the {layout} layout",
        )
    difference = (count.total - reference) / reference
    figures["rel_difference"] = difference
    passed = abs(difference) <= tolerance
    detail = (
        f"{_giga(count.total)} vs {_giga(reference)} ({difference:+.1%}, "
        f"{'within' if passed else 'outside'} ±{tolerance:.0%})"
    )
    return Check("multiply_adds", passed, figures, limits, detail)


def _giga(value: float) -> str:
    return f"{value / 1e9:.3f} G" if value >= 1e8 else f"{value / 1e6:.1f} M"
