"""fp16 and int8 builds: conversion, calibration records, checks, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from builder.__main__ import main
from builder.build import build, verify_version
from builder.calibration import CalibrationError
from builder.checks import FP16_THRESHOLDS, cpu_session
from builder.options import BuildOptions
from builder.precision import Precision
from builder.repository import list_models
from server.repository import MODEL_FILE, VERIFICATION_FILE
from tests.fixtures.repos import BuildModel


def record_of(version_dir: Path) -> dict:
    return json.loads((version_dir / VERIFICATION_FILE).read_text())


def checks_of(version_dir: Path) -> dict[str, dict]:
    return {check["name"]: check for check in record_of(version_dir)["checks"]}


def elem_types(version_dir: Path) -> tuple[int, int, set[int]]:
    graph = onnx.load(str(version_dir / MODEL_FILE)).graph
    weights = {init.data_type for init in graph.initializer if len(init.dims) == 4}
    io = (graph.input[0].type.tensor_type.elem_type, graph.output[0].type.tensor_type.elem_type)
    return *io, weights


def write_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(3)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{index:02d}.png")


def test_fp16_keeps_float32_io(tmp_path: Path, build_model: BuildModel) -> None:
    version_dir = build_model("resnet20", tmp_path, precision=Precision.FP16)
    inputs, outputs, weights = elem_types(version_dir)
    assert (inputs, outputs) == (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT)
    assert weights == {onnx.TensorProto.FLOAT16}
    record = record_of(version_dir)
    assert record["precision"] == "fp16" and record["recipe"]["fp16_io"] is False
    runtime = checks_of(version_dir)["onnxruntime_vs_pytorch"]
    assert runtime["passed"] and runtime["thresholds"]["max_rel_error"] == 0.05
    worst = max(b["max_rel_error"] for b in runtime["figures"]["batches"].values())
    assert 0 < worst <= FP16_THRESHOLDS.max_rel_error
    assert verify_version(version_dir).passed
    (entry,) = list_models(tmp_path)
    assert [(v.version, v.precision) for v in entry.versions] == [(1, "fp16")]


def test_fp16_io_takes_and_gives_float16(tmp_path: Path, build_model: BuildModel) -> None:
    version_dir = build_model("resnet20", tmp_path, precision=Precision.FP16, fp16_io=True)
    inputs, outputs, _ = elem_types(version_dir)
    assert inputs == outputs == onnx.TensorProto.FLOAT16
    (logits,) = cpu_session(version_dir / MODEL_FILE).run(
        None, {"images": np.zeros((2, 3, 32, 32), np.float16)}
    )
    assert logits.dtype == np.float16 and logits.shape == (2, 10)
    report = verify_version(version_dir)
    assert report.passed and report.scope == "full"


def test_int8_on_a_synthetic_set_is_flagged(tmp_path: Path, build_model: BuildModel) -> None:
    version_dir = build_model("resnet20", tmp_path, precision=Precision.INT8)
    graph = onnx.load(str(version_dir / MODEL_FILE)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert any(len(w.dims) == 4 for w in int8_weights)
    scales = {i.name: i for i in graph.initializer}
    per_channel = [
        node
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in {w.name for w in int8_weights}
        and len(scales[node.input[1]].dims) == 1
    ]
    assert per_channel  # one scale per output channel
    record = record_of(version_dir)
    calibration = record["calibration"]
    assert calibration["source"] == "synthetic" and "not on images" in calibration["warning"]
    agreement = checks_of(version_dir)["top1_agreement"]
    assert agreement["passed"] and agreement["figures"]["images"] == calibration["held_out"]
    assert "onnxruntime_vs_pytorch" not in checks_of(version_dir)
    assert verify_version(version_dir).passed


def test_int8_calibrates_on_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write_images(folder, 10)
    code = main(
        ["build", "resnet20", "--repo", str(tmp_path / "repo"), "--precision", "int8",
         "--calibration", str(folder)]
    )  # fmt: skip
    assert code == 0
    version_dir = tmp_path / "repo" / "resnet20" / "1"
    assert main(["models", "--repo", str(tmp_path / "repo")]) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines()
              if line.startswith("resnet20 ")]  # fmt: skip
    assert row[7:9] == ["1", "int8"] and "verified" in row, row
    calibration = record_of(version_dir)["calibration"]
    assert calibration["source"] == "folder" and calibration["path"] == str(folder.resolve())
    assert (calibration["images"], calibration["held_out"]) == (8, 2)
    assert checks_of(version_dir)["top1_agreement"]["figures"]["images"] == 2
    assert verify_version(version_dir).scope == "full"
    for image in folder.iterdir():
        image.unlink()
    folder.rmdir()
    report = verify_version(version_dir)
    assert report.passed and report.scope.startswith("onnx-only: calibration folder")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fp16_io": True}, "needs --precision fp16"),
        ({"precision": Precision.FP16, "fp16_io": True, "input_dtype": "uint8"}, "uint8"),
        ({"calibration": Path("images")}, "int8 only"),
    ],
)
def test_contradicting_options_raise(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(BuildOptions(arch="resnet20", repo=tmp_path, **options))
    assert list(tmp_path.iterdir()) == []


def test_a_calibration_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    options = BuildOptions(
        arch="resnet20",
        repo=tmp_path / "repo",
        precision=Precision.INT8,
        calibration=tmp_path / "empty",
    )
    with pytest.raises(CalibrationError, match="0 images"):
        build(options)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("arch", ["preact_resnet164", "densenet121"])
def test_new_families_build_and_verify(tmp_path: Path, build_model: BuildModel, arch: str) -> None:
    version_dir = build_model(arch, tmp_path)
    checks = checks_of(version_dir)
    assert all(check["passed"] for check in checks.values())
    if arch == "densenet121":
        assert checks["parameter_count"]["figures"]["counted"] == 7_978_856
        assert abs(checks["multiply_adds"]["figures"]["rel_difference"]) < 0.01


def test_stochastic_depth_is_recorded_and_exports_the_eval_net(
    tmp_path: Path, build_model: BuildModel
) -> None:
    plain = build_model("resnet20", tmp_path, name="plain")
    deep = build_model("resnet20", tmp_path, name="deep", stochastic_depth=0.5)
    assert record_of(deep)["recipe"]["stochastic_depth"] == 0.5
    assert (plain / MODEL_FILE).read_bytes() == (deep / MODEL_FILE).read_bytes()
    assert verify_version(deep).passed
