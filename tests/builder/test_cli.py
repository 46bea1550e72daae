"""``build``, ``verify`` and ``models`` as a user runs them (in process, except where the
absence of torch has to be real)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from builder import build as build_module
from builder.__main__ import main
from builder.checks import Check
from server.repository import (
    MODEL_FILE,
    VERIFICATION_FILE,
    CudaOptions,
    ModelConfig,
    Optimization,
    TensorRT,
)

ROOT = Path(__file__).resolve().parents[2]


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where ``import torch`` fails, as in the runtime image."""
    prelude = "import sys; sys.modules['torch'] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_cli_module_does_not_import_torch() -> None:
    result = run_without_torch(
        "import argparse\n"
        "from builder import cli\n"
        "cli.register(argparse.ArgumentParser().add_subparsers())\n"
        "print('ok')"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_build_without_torch_says_what_to_install(tmp_path: Path) -> None:
    result = run_without_torch(
        "from builder.__main__ import main\n"
        f"sys.exit(main(['build', 'resnet20', '--repo', {str(tmp_path)!r}]))"
    )
    assert result.returncode == 2
    assert "torch is not installed" in result.stderr
    assert "pip install 'resnet-serve[builder,cpu]'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_models_lists_versions_without_torch(model_repo: Path) -> None:
    result = run_without_torch(
        "from builder.__main__ import main\n"
        f"sys.exit(main(['models', '--repo', {str(model_repo)!r}]))"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "model", "arch", "input", "classes", "instances", "version", "precision", "weights",
        "status", "serves",
    ]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[2:]}
    assert sorted(rows) == ["cifar", "resnet18", "resnet18_u8"]
    assert "uint8 NHWC 224" in rows["resnet18_u8"]
    assert all("verified" in row for row in rows.values())
    assert all(row.split()[8] == "fp32" for row in rows.values())
    assert all(row.split()[6] == "1" for row in rows.values()), "config.json's instance count"
    assert all(row.endswith(" yes") for row in rows.values())
    # the fixture's models have seeded random weights, and the listing says so
    assert all("random (seed 0), untrained" in row for row in rows.values())


def test_models_shows_failed_and_modified_versions(
    model_repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modified = model_repo_copy / "resnet18" / "1" / MODEL_FILE
    model = onnx.load(str(modified))
    model.producer_version = "edited"
    onnx.save(model, str(modified))
    record_path = model_repo_copy / "cifar" / "1" / VERIFICATION_FILE
    record = json.loads(record_path.read_text())
    record["passed"] = False
    record["checks"][0]["passed"] = False
    record_path.write_text(json.dumps(record))
    broken = model_repo_copy / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"name": "broken"}')
    assert main(["models", "--repo", str(model_repo_copy)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "modified" in rows["resnet18"]
    assert "FAILED (onnx_checker)" in rows["cifar"]
    assert "verified" in rows["resnet18_u8"]
    assert "invalid config.json: 2 validation errors for ModelConfig" in rows["broken"]


def test_models_shows_the_gpu_options_config_json_asks_for(
    model_repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = model_repo_copy / "resnet18"
    config = ModelConfig.load(model_dir)
    optimization = Optimization(
        cuda=CudaOptions(batch_buckets=(8,), graphs=True), tensorrt=TensorRT(precision="fp16")
    )
    config.model_copy(update={"optimization": optimization}).dump(model_dir)
    assert main(["models", "--repo", str(model_repo_copy)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "1 (tensorrt fp16; cuda graphs; buckets 8,32)" in rows["resnet18"]


def test_build_prints_the_checks_and_counts_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build", "resnet20", "--repo", str(tmp_path), "--name", "tiny"]) == 0
    out = capsys.readouterr().out
    for name in ("onnx_checker", "shape_inference", "onnxruntime_vs_pytorch", "parameter_count"):
        assert name in out
    assert "multiply_adds           pass    40.6 M vs 41.0 M" in out
    assert f"built {tmp_path / 'tiny' / '1'} (model " in out
    assert (
        main(["build", "resnet20", "--repo", str(tmp_path), "--name", "tiny", "--seed", "2"]) == 0
    )
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [
        "1",
        "2",
        "config.json",
        "labels.txt",
    ]


def test_build_failure_names_the_check_and_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def off_by_half(*_: object) -> Check:
        return Check("multiply_adds", False, {"counted": 20e6}, detail="20.0 M vs 41.0 M (-51.2%)")

    monkeypatch.setattr(build_module, "check_macs", off_by_half)
    assert main(["build", "resnet20", "--repo", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "multiply_adds           FAIL    20.0 M vs 41.0 M" in captured.out
    assert "verification failed: multiply_adds: 20.0 M vs 41.0 M (-51.2%)" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_unknown_architecture_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["build", "resnet99"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'resnet99'" in err and "wide_resnet101_2" in err


def test_verify_passes_and_fails(model_repo_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    version_dir = model_repo_copy / "cifar" / "1"
    assert main(["verify", str(version_dir)]) == 0
    assert f"verified {version_dir}" in capsys.readouterr().out
    (version_dir / MODEL_FILE).write_bytes((version_dir / MODEL_FILE).read_bytes() + b"\0")
    assert main(["verify", str(version_dir)]) == 1
    assert "sha256: model.onnx was modified" in capsys.readouterr().err


def test_verify_refuses_a_directory_that_is_not_a_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert "is not a model version" in capsys.readouterr().err
