"""A null model with ResNet-50's input and output: what the server costs around a free graph.

uint8 ``[N, 224, 224, 3]`` in, float32 ``[N, 1000]`` out, as a ``--input uint8`` ResNet-50
takes and gives, but the graph only reads one pixel per image (Slice, Cast, Reshape,
MatMul, Add): microseconds in ONNX Runtime. Served, every millisecond above raw ONNX
Runtime is the server's own, for requests as large as a real ResNet-50's (150 KB in,
4 KB out).

`build` writes it into a repository as version 1, with a ``verification.json`` that says
what was checked here (``onnx.checker`` in full, shape inference, ONNX Runtime against the
same arithmetic in numpy at batch 1 and 3) and, in its scope, what was not (no PyTorch
model: nothing to compare parameters or multiply-adds with).
"""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from server.repository import (
    MODEL_FILE,
    CheckRecord,
    InputSpec,
    ModelConfig,
    Verification,
    labels_text,
    sha256_file,
)

NAME = "null"
CLASSES = 1000
OPSET = 17
TOLERANCE = 1e-4
SEED = 0


def graph(seed: int = SEED) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """The graph, and its weight and bias (for the numpy reference)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3, CLASSES), dtype=np.float32)
    bias = rng.standard_normal(CLASSES, dtype=np.float32)
    spec = InputSpec(dtype="uint8", layout="NHWC")
    constants = [
        numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "ends"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1, 3], np.int64), "flat"),
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(bias, "bias"),
    ]
    nodes = [
        helper.make_node("Slice", [spec.name, "starts", "ends", "axes"], ["pixel"]),
        helper.make_node("Cast", ["pixel"], ["pixel_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["pixel_f", "flat"], ["rgb"]),
        helper.make_node("MatMul", ["rgb", "weight"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    body = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info(spec.name, TensorProto.UINT8, ["N", 224, 224, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        constants,
    )
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model, weight, bias


def reference(images: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, :].astype(np.float32) @ weight + bias


def build(repo: Path, name: str = NAME) -> Path:
    """Write the null model into ``repo/name`` (replacing one there); its version directory."""
    started = time.perf_counter()
    model_dir = repo / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version = model_dir / "1"
    version.mkdir(parents=True)
    model, weight, bias = graph()
    path = version / MODEL_FILE
    onnx.save(model, path)
    checks = [_check_onnx(path), _check_runtime(path, weight, bias)]
    config = ModelConfig(
        name=name, arch=NAME, num_classes=CLASSES, input=InputSpec(dtype="uint8", layout="NHWC")
    )
    config.dump(model_dir)
    (model_dir / config.labels).write_text(labels_text([f"class {i}" for i in range(CLASSES)]))
    Verification(
        passed=all(check.passed for check in checks),
        sha256=sha256_file(path),
        scope="onnx-only: a benchmark graph without a PyTorch model (no parameter or "
        "multiply-add table to compare with)",
        seed=SEED,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        thresholds={"max_abs_diff": TOLERANCE},
        software={
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
        checks=checks,
        seconds={"build": round(time.perf_counter() - started, 3)},
    ).write(version)
    return version


def _check_onnx(path: Path) -> CheckRecord:
    onnx.checker.check_model(str(path), full_check=True)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True)
    dims = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    passed = dims == ["N", CLASSES]
    return CheckRecord(
        name="onnx",
        passed=passed,
        figures={"output_shape": dims},
        detail="onnx.checker (full_check) and strict shape inference",
    )


def _check_runtime(path: Path, weight: np.ndarray, bias: np.ndarray) -> CheckRecord:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(SEED)
    worst = 0.0
    for batch in (1, 3):
        images = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        (logits,) = session.run(None, {"images": images})
        worst = max(worst, float(np.abs(logits - reference(images, weight, bias)).max()))
    return CheckRecord(
        name="runtime",
        passed=worst <= TOLERANCE,
        figures={"max_abs_diff": worst, "batch_sizes": [1, 3]},
        thresholds={"max_abs_diff": TOLERANCE},
        detail="ONNX Runtime (CPU) against the same arithmetic in numpy",
    )
