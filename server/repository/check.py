"""The one answer to "can this version be served?", for the server, the builder and the bench.

A version is served only if ``model.onnx`` and ``verification.json`` are there, the record
reads, its ``sha256`` is the hash of ``model.onnx``, and it says ``"passed": true``::

    check = check_version(repo / "resnet50" / "1")
    if not check.servable:
        print(check.status, check.reason)   # e.g. "modified", "model.onnx does not match ..."
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import ValidationError

from server.repository.layout import MODEL_FILE, VERIFICATION_FILE, is_version_name
from server.repository.verification import Verification, sha256_file


class Status(StrEnum):
    VERIFIED = "verified"
    FAILED = "FAILED"  # the record says a check failed
    UNVERIFIED = "unverified"  # no record, or one that does not read
    MODIFIED = "modified"  # model.onnx is not the file that was checked
    MISSING_MODEL = "missing model"


@dataclass(frozen=True)
class VersionCheck:
    version: int
    status: Status
    reason: str = ""  # one line saying why the version cannot be served; empty when it can
    precision: str = "-"  # fp32, fp16 or int8 as recorded by the build; "-" without a record
    record: Verification | None = None

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


def check_version(version_dir: Path) -> VersionCheck:
    """Decide whether the version in `version_dir` (named by its number) can be served."""
    version_dir = Path(version_dir)
    if not is_version_name(version_dir.name):
        raise ValueError(f"{version_dir} is not a version directory (a positive integer)")
    version = int(version_dir.name)
    model_path = version_dir / MODEL_FILE
    if not model_path.is_file():
        return VersionCheck(version, Status.MISSING_MODEL, f"{MODEL_FILE} is missing")
    if not (version_dir / VERIFICATION_FILE).is_file():
        why = f"{VERIFICATION_FILE} is missing; build or verify the model first"
        return VersionCheck(version, Status.UNVERIFIED, why)
    try:
        record = Verification.load(version_dir)
    except json.JSONDecodeError as exc:
        why = f"{VERIFICATION_FILE} is not valid JSON ({exc})"
        return VersionCheck(version, Status.UNVERIFIED, why)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "record"
        why = f"{VERIFICATION_FILE} is not a verification record ({where}: {first['msg']})"
        return VersionCheck(version, Status.UNVERIFIED, why)
    except (OSError, UnicodeDecodeError) as exc:
        why = f"{VERIFICATION_FILE} cannot be read ({type(exc).__name__})"
        return VersionCheck(version, Status.UNVERIFIED, why)
    if record.sha256 != sha256_file(model_path):
        why = f"{MODEL_FILE} does not match the sha256 in {VERIFICATION_FILE}"
        return VersionCheck(version, Status.MODIFIED, why, record.precision, record)
    if not record.passed:
        failed = record.failed_checks()
        why = f"{VERIFICATION_FILE} does not say passed: true"
        if failed:
            why += f" (failed: {', '.join(failed)})"
        return VersionCheck(version, Status.FAILED, why, record.precision, record)
    return VersionCheck(version, Status.VERIFIED, "", record.precision, record)
