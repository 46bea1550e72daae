"""Staging directories: locked while a build uses them, removed once their build is gone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from builder.repository import LOCK_SUFFIX, TMP_PREFIX, remove_abandoned_staging, staging_dir


def test_a_staging_directory_in_use_is_kept(tmp_path: Path) -> None:
    with staging_dir(tmp_path / "m") as staged:
        (staged / "model.onnx").write_bytes(b"half")
        assert remove_abandoned_staging(tmp_path / "m") == []
        assert (staged / "model.onnx").is_file()
    assert not (tmp_path / "m").exists()  # removed on exit, with the directory made for it


def test_the_staging_of_a_dead_build_is_removed(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    # Another process stages and dies without cleaning up (os._exit skips the finally).
    script = (
        "import os, sys; from pathlib import Path; from builder.repository import staging_dir\n"
        "with staging_dir(Path(sys.argv[1])) as s:\n"
        "    (s / 'model.onnx').write_bytes(b'half'); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(model_dir)], check=True, timeout=60)
    (left,) = [p for p in model_dir.iterdir() if p.is_dir()]
    assert (model_dir / (left.name + LOCK_SUFFIX)).is_file()
    (model_dir / "1").mkdir()  # a published version is never touched

    assert remove_abandoned_staging(model_dir) == [left]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_a_staging_directory_without_a_lock_is_abandoned(tmp_path: Path) -> None:
    old = tmp_path / f"{TMP_PREFIX}abc"
    old.mkdir()
    (old / "model.onnx").write_bytes(b"half")
    assert remove_abandoned_staging(tmp_path) == [old]
    assert not old.exists()
    assert remove_abandoned_staging(tmp_path / "missing") == []
