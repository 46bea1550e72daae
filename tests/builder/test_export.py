"""Export into the repository: graph interface, records, uint8 preprocessing, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from builder import build as build_module
from builder.build import VerificationFailed, build, verify_version
from builder.checks import Check, Thresholds, cpu_session
from builder.labels import CIFAR10_CLASSES
from builder.options import BuildOptions
from builder.repository import RepositoryError
from server.repository import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_FILE,
    VERIFICATION_FILE,
    ModelConfig,
    read_labels,
    sha256_file,
)
from tests.fixtures.repos import BuildModel

CHECKS = {
    "onnx_checker",
    "shape_inference",
    "onnxruntime_vs_pytorch",
    "multiply_adds",
    "parameter_count",
}


def record_of(version_dir: Path) -> dict:
    return json.loads((version_dir / VERIFICATION_FILE).read_text())


def test_graph_interface(model_repo: Path) -> None:
    graph = onnx.load(str(model_repo / "resnet18" / "1" / MODEL_FILE)).graph
    (images,), (logits,) = graph.input, graph.output
    assert (images.name, logits.name) == ("images", "logits")
    in_dims = images.type.tensor_type.shape.dim
    out_dims = logits.type.tensor_type.shape.dim
    assert in_dims[0].dim_param == out_dims[0].dim_param == "batch"
    assert [d.dim_value for d in in_dims[1:]] == [3, 224, 224]
    assert out_dims[1].dim_value == 1000
    assert "BatchNormalization" not in {node.op_type for node in graph.node}


def test_verification_record(model_repo: Path) -> None:
    version_dir = model_repo / "resnet18" / "1"
    record = record_of(version_dir)
    assert record["passed"] is True
    assert record["sha256"] == sha256_file(version_dir / MODEL_FILE)
    assert record["scope"] == "full" and record["seed"] == 0
    assert set(record["seconds"]) == {"model", "export", "checks"}
    recipe = record["recipe"]
    assert recipe["arch"] == "resnet18" and recipe["seed"] == 0 and recipe["weights"] is None
    assert recipe["num_classes"] == 1000 and recipe["layout"] == "torchvision"
    checks = {check["name"]: check for check in record["checks"]}
    assert set(checks) == CHECKS
    assert all(check["passed"] for check in checks.values())
    runtime = checks["onnxruntime_vs_pytorch"]
    assert sorted(runtime["figures"]["batches"], key=int) == ["1", "4", "7"]
    assert runtime["thresholds"]["max_abs_error"] == record["thresholds"]["max_abs_error"]
    macs = checks["multiply_adds"]["figures"]
    assert macs["reference"] == pytest.approx(1.8e9)
    assert abs(macs["counted"] - 1.8e9) / 1.8e9 < 0.03
    assert checks["parameter_count"]["figures"]["counted"] == 11_689_512


def test_config_and_labels(model_repo: Path) -> None:
    imagenet = ModelConfig.load(model_repo / "resnet18")
    assert (imagenet.preprocessing.resize, imagenet.preprocessing.crop) == (256, 224)
    assert imagenet.preprocessing.mean == IMAGENET_MEAN
    assert imagenet.preprocessing.std == IMAGENET_STD
    labels = read_labels(model_repo / "resnet18", imagenet)
    assert (labels[0], labels[281]) == ("tench", "tabby")
    cifar = ModelConfig.load(model_repo / "cifar")
    assert (cifar.preprocessing.resize, cifar.preprocessing.crop, cifar.input.size) == (32, 32, 32)
    assert (cifar.preprocessing.mean, cifar.preprocessing.std) == (CIFAR_MEAN, CIFAR_STD)
    assert read_labels(model_repo / "cifar", cifar) == list(CIFAR10_CLASSES)
    u8 = ModelConfig.load(model_repo / "resnet18_u8")
    assert (u8.input.dtype, u8.input.layout) == ("uint8", "NHWC")


def test_uint8_graph_matches_numpy_preprocessing(model_repo: Path) -> None:
    config = ModelConfig.load(model_repo / "resnet18")
    pixels = np.random.default_rng(7).integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    mean = np.array(config.preprocessing.mean, np.float32)
    std = np.array(config.preprocessing.std, np.float32)
    normalized = ((pixels.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    (from_float,) = cpu_session(model_repo / "resnet18" / "1" / MODEL_FILE).run(
        None, {"images": np.ascontiguousarray(normalized)}
    )
    (from_pixels,) = cpu_session(model_repo / "resnet18_u8" / "1" / MODEL_FILE).run(
        None, {"images": pixels}
    )
    assert from_pixels.dtype == np.float32 and from_pixels.shape == (3, 1000)
    np.testing.assert_allclose(from_pixels, from_float, rtol=0, atol=1e-4)
    assert np.abs(from_float).max() > 0.1  # a real comparison, not of two zero outputs


def test_export_is_deterministic(tmp_path: Path, build_model: BuildModel, model_repo: Path) -> None:
    again = build_model("resnet20", tmp_path, name="cifar")
    assert sha256_file(again / MODEL_FILE) == sha256_file(model_repo / "cifar" / "1" / MODEL_FILE)


def test_other_heads_seeds_and_opsets(tmp_path: Path, build_model: BuildModel) -> None:
    version_dir = build_model("resnet20", tmp_path, num_classes=5, seed=4, opset=17)
    config = ModelConfig.load(version_dir.parent)
    assert config.num_classes == 5
    assert read_labels(version_dir.parent, config) == [f"class_{i}" for i in range(5)]
    (logits,) = cpu_session(version_dir / MODEL_FILE).run(
        None, {"images": np.zeros((2, 3, 32, 32), np.float32)}
    )
    assert logits.shape == (2, 5)
    recipe = record_of(version_dir)["recipe"]
    assert (recipe["seed"], recipe["opset"], recipe["num_classes"]) == (4, 17, 5)
    opsets = {o.domain: o.version for o in onnx.load(str(version_dir / MODEL_FILE)).opset_import}
    assert opsets[""] == 17


def test_versions_count_up_and_are_never_overwritten(
    model_repo_copy: Path, build_model: BuildModel
) -> None:
    second = build_model("resnet20", model_repo_copy, name="cifar", seed=1)
    assert second == model_repo_copy / "cifar" / "2"
    with pytest.raises(RepositoryError, match="never overwritten"):
        build_model("resnet20", model_repo_copy, name="cifar", version=1)


def test_a_conflicting_config_is_refused(model_repo_copy: Path) -> None:
    request = BuildOptions(arch="resnet20", repo=model_repo_copy, name="cifar", num_classes=100)
    with pytest.raises(RepositoryError, match="num_classes"):
        build(request)
    assert sorted(p.name for p in (model_repo_copy / "cifar").iterdir()) == [
        "1",
        "config.json",
        "labels.txt",
    ]


@pytest.mark.parametrize("repo_exists", [True, False])
def test_a_failed_check_leaves_nothing_behind(tmp_path: Path, repo_exists: bool) -> None:
    strict = Thresholds(max_abs_error=0.0, max_rel_error=0.0, batch_sizes=(2,))
    repo = tmp_path / "repo" if repo_exists else tmp_path / "new" / "repo"
    if repo_exists:
        repo.mkdir()
    with pytest.raises(VerificationFailed) as info:
        build(BuildOptions(arch="resnet20", repo=repo), thresholds=strict)
    message = str(info.value)
    assert "onnxruntime_vs_pytorch" in message and "max_abs_error" in message and "> 0" in message
    assert [c.name for c in info.value.report.failures()] == ["onnxruntime_vs_pytorch"]
    assert list(tmp_path.rglob("*")) == ([repo] if repo_exists else [])


def test_a_failed_check_keeps_existing_versions_intact(
    model_repo_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_params(counted: int, *_: object) -> Check:
        return Check("parameter_count", False, {"counted": counted}, detail=f"{counted:,} wrong")

    monkeypatch.setattr(build_module, "check_parameters", failing_params)
    before = sorted(str(p.relative_to(model_repo_copy)) for p in model_repo_copy.rglob("*"))
    with pytest.raises(VerificationFailed, match="parameter_count: 269,722 wrong"):
        build(BuildOptions(arch="resnet20", repo=model_repo_copy, name="cifar"))
    after = sorted(str(p.relative_to(model_repo_copy)) for p in model_repo_copy.rglob("*"))
    assert after == before


def test_verify_rebuilds_and_passes(model_repo: Path) -> None:
    report = verify_version(model_repo / "resnet18_u8" / "1")
    assert report.passed and report.scope == "full"
    assert report.checks[0].name == "sha256"
    assert {c.name for c in report.checks} == CHECKS | {"sha256"}


def test_verify_notices_a_modified_model(model_repo_copy: Path) -> None:
    version_dir = model_repo_copy / "cifar" / "1"
    model = onnx.load(str(version_dir / MODEL_FILE))
    model.producer_version = "edited"
    onnx.save(model, str(version_dir / MODEL_FILE))
    report = verify_version(version_dir)
    assert not report.passed
    assert [c.name for c in report.failures()] == ["sha256"]


def test_verify_without_the_weights_checks_the_onnx_alone(
    tmp_path: Path, build_model: BuildModel
) -> None:
    import torch

    from builder.options import ModelOptions
    from builder.resnet import create_model

    weights = tmp_path / "cifar.pth"
    torch.save(create_model("resnet20", ModelOptions(seed=5)).state_dict(), weights)
    version_dir = build_model("resnet20", tmp_path / "repo", weights=weights)
    recipe = record_of(version_dir)["recipe"]
    assert recipe["weights"] == str(weights.resolve())
    assert recipe["weights_sha256"] == sha256_file(weights)
    assert recipe["bn_statistics"] is None
    weights.unlink()
    report = verify_version(version_dir)
    assert report.passed
    assert report.scope == f"onnx-only: weights {weights.resolve()} not found"
    names = [c.name for c in report.checks]
    assert "onnxruntime_runs" in names and "parameter_count" not in names
