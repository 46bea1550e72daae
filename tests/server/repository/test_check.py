"""`check_version`, the one rule for "can this version be served?", and the version layout.

Versions here are a few bytes standing in for model.onnx: the check looks at files and
records, never inside the graph.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from server.repository import (
    CONFIG_FILE,
    LABELS_FILE,
    MODEL_FILE,
    VERIFICATION_FILE,
    Status,
    Verification,
    check_version,
    is_version_name,
    latest_version,
    version_dirs,
    versions,
)

GRAPH = b"stands in for an ONNX graph"
CHECKS = [
    {"name": "onnx_checker", "passed": True, "detail": "full check passed"},
    {"name": "multiply_adds", "passed": False, "figures": {"counted": 1}, "detail": "off"},
]


def add_version(model_dir: Path, name: str, record: dict[str, Any] | None = None) -> Path:
    """A version directory holding GRAPH and, unless None, `record` as its verification.json
    (default: a passing record with GRAPH's hash, as an old build wrote it: no precision)."""
    version_dir = model_dir / name
    version_dir.mkdir(parents=True)
    (version_dir / MODEL_FILE).write_bytes(GRAPH)
    if record is None:
        record = {"passed": True, "sha256": hashlib.sha256(GRAPH).hexdigest(), "scope": "full"}
    (version_dir / VERIFICATION_FILE).write_text(json.dumps(record))
    return version_dir


def test_a_passing_record_from_before_precisions_is_verified_fp32(tmp_path: Path) -> None:
    check = check_version(add_version(tmp_path, "1"))
    assert (check.version, check.status, check.reason) == (1, Status.VERIFIED, "")
    assert check.servable and check.precision == "fp32" and check.detail == "full"
    assert check.record is not None and check.record.passed


def test_a_modified_graph_is_refused(tmp_path: Path) -> None:
    version_dir = add_version(tmp_path, "2")
    (version_dir / MODEL_FILE).write_bytes(GRAPH + b"\0")
    check = check_version(version_dir)
    assert check.status is Status.MODIFIED and not check.servable
    assert check.reason == "model.onnx does not match the sha256 in verification.json"


def test_a_failed_record_names_its_failed_checks(tmp_path: Path) -> None:
    digest = hashlib.sha256(GRAPH).hexdigest()
    record = {"passed": False, "sha256": digest, "precision": "int8", "checks": CHECKS}
    check = check_version(add_version(tmp_path, "1", record))
    assert (check.status, check.precision, check.detail) == (Status.FAILED, "int8", "multiply_adds")
    assert check.reason == "verification.json does not say passed: true (failed: multiply_adds)"


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ({"sha256": hashlib.sha256(GRAPH).hexdigest()}, "does not say passed: true"),
        ({"passed": "true", "sha256": hashlib.sha256(GRAPH).hexdigest()}, "passed"),
        ([], "is not a verification record"),
    ],
)
def test_only_a_literal_true_passes(tmp_path: Path, record: Any, why: str) -> None:
    check = check_version(add_version(tmp_path, "1", record))
    assert not check.servable and why in check.reason


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    no_model = add_version(tmp_path, "1")
    (no_model / MODEL_FILE).unlink()
    no_record = add_version(tmp_path, "2")
    (no_record / VERIFICATION_FILE).unlink()
    not_json = add_version(tmp_path, "3")
    (not_json / VERIFICATION_FILE).write_text("{passed: true")
    expected = {
        no_model: (Status.MISSING_MODEL, "model.onnx is missing"),
        no_record: (Status.UNVERIFIED, "verification.json is missing; build or verify"),
        not_json: (Status.UNVERIFIED, "verification.json is not valid JSON ("),
    }
    for version_dir, (status, why) in expected.items():
        check = check_version(version_dir)
        assert check.status is status and check.reason.startswith(why)
        assert check.precision == "-" and check.record is None


def test_only_a_positive_integer_in_ascii_digits_names_a_version(tmp_path: Path) -> None:
    assert [n for n in ("1", "2", "10", "123") if is_version_name(n)] == ["1", "2", "10", "123"]
    # "²".isdigit() and "٣".isdigit() are True, and int("²") raises
    assert not any(map(is_version_name, ("0", "00", "01", "-1", "+1", "1a", "", "²", "٣", " 1")))
    model_dir = tmp_path / "model"
    for name in ("10", "2", "0", "01", "²", "٣", ".tmp-abc"):
        add_version(model_dir, name)
    (model_dir / "3").write_text("a file, not a directory")
    assert [p.name for p in version_dirs(model_dir)] == ["2", "10"]
    assert versions(model_dir) == [2, 10]
    assert latest_version(model_dir) == model_dir / "10"
    with pytest.raises(ValueError, match="not a version directory"):
        check_version(model_dir / "0")
    with pytest.raises(ValueError, match="not a version directory"):
        check_version(model_dir / "²")


def test_no_versions(tmp_path: Path) -> None:
    assert version_dirs(tmp_path / "absent") == [] and versions(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="has no version directory"):
        latest_version(tmp_path)


def test_the_record_round_trips_and_ignores_fields_it_does_not_know(tmp_path: Path) -> None:
    record = Verification(passed=True, sha256="ab" * 32, precision="fp16", checks=CHECKS)
    record.write(tmp_path)
    assert Verification.load(tmp_path) == record
    text = json.loads((tmp_path / VERIFICATION_FILE).read_text())
    (tmp_path / VERIFICATION_FILE).write_text(json.dumps(text | {"written_by": "a newer builder"}))
    assert Verification.load(tmp_path) == record
    assert record.failed_checks() == ["multiply_adds"]


def served_repo(root: Path) -> Path:
    """``root/repo/net``: a model directory with config.json, labels.txt and version 1."""
    model_dir = root / "repo" / "net"
    add_version(model_dir, "1")
    (model_dir / CONFIG_FILE).write_text("{}")
    (model_dir / LABELS_FILE).write_text("a\n")
    return model_dir


@pytest.mark.parametrize(
    ("linked", "named"),
    [
        ("1/model.onnx", "1/model.onnx"),
        ("1/verification.json", "1/verification.json"),
        ("config.json", "config.json"),
        ("labels.txt", "labels.txt"),
        ("1", "version directory 1"),
    ],
)
def test_a_link_out_of_the_repository_is_refused(tmp_path: Path, linked: str, named: str) -> None:
    model_dir = served_repo(tmp_path)
    outside = tmp_path / "elsewhere" / linked
    outside.parent.mkdir(parents=True)
    (model_dir / linked).rename(outside)  # the very file the hash and record are for
    (model_dir / linked).symlink_to(outside, target_is_directory=outside.is_dir())
    check = check_version(model_dir / "1")
    assert (check.status, check.servable, check.record) == (Status.OUTSIDE, False, None)
    assert check.reason == (
        f"{named} leads outside the model repository (a symbolic link); not served"
    )
    assert str(tmp_path) not in check.reason  # callers see it: no path of the machine


def test_the_labels_file_config_json_names_is_checked(tmp_path: Path) -> None:
    model_dir = served_repo(tmp_path)
    (model_dir / "names.txt").symlink_to("/etc/hostname")
    assert check_version(model_dir / "1").servable  # labels.txt is what it looks at by default
    check = check_version(model_dir / "1", labels="names.txt")
    assert check.status is Status.OUTSIDE and check.reason.startswith("names.txt leads outside")


def test_a_model_directory_linked_from_outside_and_a_dangling_link_are_refused(
    tmp_path: Path,
) -> None:
    model_dir = served_repo(tmp_path / "source")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "net").symlink_to(model_dir, target_is_directory=True)
    check = check_version(repo / "net" / "1")
    assert check.status is Status.OUTSIDE
    assert check.reason.startswith("model directory net leads outside")
    (model_dir / "1" / MODEL_FILE).unlink()
    (model_dir / "1" / MODEL_FILE).symlink_to(tmp_path / "gone.onnx")
    assert check_version(model_dir / "1").status is Status.OUTSIDE


def test_links_inside_the_repository_are_followed(tmp_path: Path) -> None:
    model_dir = served_repo(tmp_path)
    repo = model_dir.parent
    # a model directory as an alias of another, files shared between versions
    (repo / "latest").symlink_to("net", target_is_directory=True)
    assert check_version(repo / "latest" / "1").servable
    version = add_version(model_dir, "2")
    (version / MODEL_FILE).unlink()
    (version / MODEL_FILE).symlink_to("../1/model.onnx")
    assert check_version(version).servable
    # the repository reached through a link of its own is still the repository
    (tmp_path / "alias").symlink_to(repo, target_is_directory=True)
    assert check_version(tmp_path / "alias" / "net" / "2").servable


def test_keep_model_hands_back_the_very_bytes_it_hashed(tmp_path: Path) -> None:
    version_dir = add_version(tmp_path, "1")
    check = check_version(version_dir, keep_model=True)
    assert check.servable and check.model == GRAPH
    assert check_version(version_dir).model is None  # not kept unless asked
    (version_dir / MODEL_FILE).write_bytes(GRAPH + b"\0")
    check = check_version(version_dir, keep_model=True)
    assert check.status is Status.MODIFIED and check.model is None
