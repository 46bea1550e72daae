"""The one answer to "can this version be served?", for the server, the builder and the bench.

A version is served only if

- the version directory, ``model.onnx``, ``verification.json``, the model's ``config.json``
  and its labels file all resolve inside the repository (``<repo>`` of
  ``<repo>/<model>/<version>``): a symbolic link that leads out of it is refused, whatever
  it points at;
- ``model.onnx`` and ``verification.json`` are there, the record reads, its ``sha256`` is
  the hash of ``model.onnx``, and it says ``"passed": true``::

    check = check_version(repo / "resnet50" / "1", labels=config.labels)
    if not check.servable:
        print(check.status, check.reason)   # e.g. "modified", "model.onnx does not match ..."

With ``keep_model=True`` the check reads ``model.onnx`` once, hashes those bytes and hands
them back (`VersionCheck.model`): the server creates its sessions from them, so what ONNX
Runtime runs is what was verified, even if the file changes after the check.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import ValidationError

from server.repository.layout import (
    CONFIG_FILE,
    LABELS_FILE,
    MODEL_FILE,
    VERIFICATION_FILE,
    is_version_name,
)
from server.repository.verification import Verification, sha256_file


class Status(StrEnum):
    VERIFIED = "verified"
    FAILED = "FAILED"  # the record says a check failed
    UNVERIFIED = "unverified"  # no record, or one that does not read
    MODIFIED = "modified"  # model.onnx is not the file that was checked
    MISSING_MODEL = "missing model"
    OUTSIDE = "outside repository"  # a file of the version is a link out of the repository


@dataclass(frozen=True)
class VersionCheck:
    version: int
    status: Status
    reason: str = ""  # one line saying why the version cannot be served; empty when it can
    precision: str = "-"  # fp32, fp16 or int8 as recorded by the build; "-" without a record
    record: Verification | None = None
    # the bytes of model.onnx that were hashed, when asked for (keep_model) and VERIFIED
    model: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def servable(self) -> bool:
        return self.status is Status.VERIFIED

    @property
    def weights(self) -> str:
        """Where the weights came from (`Verification.weights`); "" without a record."""
        return "" if self.record is None else self.record.weights()

    @property
    def detail(self) -> str:
        """What a listing shows beside the status: the scope, the failed checks, or why."""
        if self.record is not None and self.status is Status.VERIFIED:
            return self.record.scope
        if self.record is not None and self.status is Status.FAILED:
            return ", ".join(self.record.failed_checks())
        return self.reason


def check_version(
    version_dir: Path, *, labels: str = LABELS_FILE, keep_model: bool = False
) -> VersionCheck:
    """Decide whether the version in `version_dir` (named by its number) can be served.

    `labels` is the labels file config.json names; `keep_model`: return the verified bytes
    of model.onnx in `VersionCheck.model` (read once: the bytes hashed are the bytes kept).
    """
    version_dir = Path(version_dir)
    if not is_version_name(version_dir.name):
        raise ValueError(f"{version_dir} is not a version directory (a positive integer)")
    version = int(version_dir.name)
    outside = _leaves_repository(version_dir, labels)
    if outside:
        why = f"{outside} leads outside the model repository (a symbolic link); not served"
        return VersionCheck(version, Status.OUTSIDE, why)
    model_path = version_dir / MODEL_FILE
    if not model_path.is_file():
        return VersionCheck(version, Status.MISSING_MODEL, f"{MODEL_FILE} is missing")
    if not (version_dir / VERIFICATION_FILE).is_file():
        why = f"{VERIFICATION_FILE} is missing; build or verify the model first"
        return VersionCheck(version, Status.UNVERIFIED, why)
    record = _read_record(version_dir)
    if isinstance(record, str):
        return VersionCheck(version, Status.UNVERIFIED, record)
    model: bytes | None = None
    if keep_model:
        model = model_path.read_bytes()
        digest = hashlib.sha256(model).hexdigest()
    else:
        digest = sha256_file(model_path)
    if record.sha256 != digest:
        why = f"{MODEL_FILE} does not match the sha256 in {VERIFICATION_FILE}"
        return VersionCheck(version, Status.MODIFIED, why, record.precision, record)
    if not record.passed:
        failed = record.failed_checks()
        why = f"{VERIFICATION_FILE} does not say passed: true"
        if failed:
            why += f" (failed: {', '.join(failed)})"
        return VersionCheck(version, Status.FAILED, why, record.precision, record)
    return VersionCheck(version, Status.VERIFIED, "", record.precision, record, model)


def _read_record(version_dir: Path) -> Verification | str:
    """The version's verification record, or why it does not read."""
    try:
        return Verification.load(version_dir)
    except json.JSONDecodeError as exc:
        return f"{VERIFICATION_FILE} is not valid JSON ({exc})"
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "record"
        return f"{VERIFICATION_FILE} is not a verification record ({where}: {first['msg']})"
    except (OSError, UnicodeDecodeError) as exc:
        return f"{VERIFICATION_FILE} cannot be read ({type(exc).__name__})"


def _leaves_repository(version_dir: Path, labels: str = LABELS_FILE) -> str:
    """The first of the version's paths (the model and version directories, model.onnx,
    verification.json, config.json, the labels file) whose real path, links followed, is
    outside the repository ``<repo>`` of ``<repo>/<model>/<version>``, named relative to the
    model directory; "" if none. A path that does not exist is not outside (the other checks
    say what is missing); a dangling link is, when its target would be."""
    version_dir = Path(os.path.abspath(version_dir))
    model_dir = version_dir.parent
    root = Path(os.path.realpath(model_dir.parent))
    paths = {
        f"model directory {model_dir.name}": model_dir,
        f"version directory {version_dir.name}": version_dir,
        f"{version_dir.name}/{MODEL_FILE}": version_dir / MODEL_FILE,
        f"{version_dir.name}/{VERIFICATION_FILE}": version_dir / VERIFICATION_FILE,
        CONFIG_FILE: model_dir / CONFIG_FILE,
        labels: model_dir / labels,
    }
    for name, path in paths.items():
        if not (path.exists() or path.is_symlink()):
            continue
        if not Path(os.path.realpath(path)).is_relative_to(root):
            return name
    return ""
