"""``<version>/verification.json``: what the builder checked, and the hash of what it checked.

The builder writes it (`Verification.write`) after running its checks; the server trusts a
version only if ``passed`` is true and ``sha256`` is the hash of ``model.onnx``
(`server.repository.check.check_version`). The other fields record how the model was built
and what each check measured, for people and for ``resnet-serve verify``.

Records written before a field existed still read: a record without ``precision`` is fp32,
one without ``passed`` did not pass. Fields this version does not know are ignored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from server.repository.layout import MODEL_FILE, VERIFICATION_FILE

Precision = Literal["fp32", "fp16", "int8"]
RANDOM_WEIGHTS = "random"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CheckRecord(_Record):
    """One check the builder ran: its figures, the limits they were held to, a summary."""

    name: str
    passed: StrictBool
    figures: dict[str, Any] = Field(default_factory=dict)
    thresholds: dict[str, Any] = Field(default_factory=dict)
    detail: str = ""


class Verification(_Record):
    passed: StrictBool = False
    sha256: str = Field("", description="hex sha256 of model.onnx as it was checked")
    model_file: str = MODEL_FILE
    scope: str = Field("", description='"full", or "onnx-only: <why>" without a PyTorch model')
    seed: int | None = None
    created: str = Field("", description="ISO 8601, UTC")
    precision: Precision = "fp32"
    recipe: dict[str, Any] | None = Field(None, description="how to rebuild the PyTorch model")
    thresholds: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = Field(None, description="int8: the calibration images")
    software: dict[str, str] = Field(default_factory=dict)
    checks: list[CheckRecord] = Field(default_factory=list)
    seconds: dict[str, float] = Field(default_factory=dict, description="wall time per stage")

    @property
    def random_weights(self) -> bool:
        """The build used seeded random weights: an untrained model."""
        return self.recipe is not None and self.recipe.get("weights") is None

    def weights(self) -> str:
        """Where the weights came from, for listings and logs: ``random (seed N)``, what
        ``--weights`` named (``torchvision <url>``, a URL, a file), or "" without a recipe."""
        if self.recipe is None:
            return ""
        if self.random_weights:
            return f"{RANDOM_WEIGHTS} (seed {self.recipe.get('seed', 0)})"
        return str(self.recipe.get("weights_origin") or self.recipe.get("weights"))

    def failed_checks(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]

    @classmethod
    def load(cls, version_dir: Path) -> Verification:
        """Read a version's record; OSError, ValueError (bad JSON or not a record)."""
        return cls.model_validate(json.loads((Path(version_dir) / VERIFICATION_FILE).read_text()))

    def write(self, version_dir: Path) -> Path:
        path = Path(version_dir) / VERIFICATION_FILE
        text = json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False)
        path.write_text(text + "\n", encoding="utf-8")
        return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Agreement:
    """Top-1 of a lower-precision graph against its fp32 reference, judged as the builder
    judges precision: a flip counts against the graph only where the reference's top-1
    margin (its largest logit minus the next) exceeds twice the graph's error bound (each
    of the two logits may move by the bound). Below that the input is a near-tie: rounding
    may flip it by design, so it is counted, never failed. The argument holds only while
    the bound does, so a larger error than the bound fails too."""

    images: int
    equal: int
    near_ties: int
    decisive_flips: int
    error_bound: float
    max_abs_error: float

    @property
    def rate(self) -> float:
        return self.equal / self.images if self.images else 1.0

    @property
    def passed(self) -> bool:
        return self.decisive_flips == 0 and self.max_abs_error <= self.error_bound

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images, "top1_equal": self.equal, "agreement": self.rate,
            "near_ties": self.near_ties, "decisive_flips": self.decisive_flips,
            "error_bound": self.error_bound, "max_abs_error": self.max_abs_error,
            "passed": self.passed, "summary": self.summary(),
        }  # fmt: skip

    def summary(self) -> str:
        return (
            f"top-1 equal {self.equal}/{self.images}; {self.near_ties} near-ties "
            f"(fp32 margin <= 2 x {self.error_bound:g}), {self.decisive_flips} decisive flips; "
            f"max abs error {self.max_abs_error:.2g} (<= {self.error_bound:g})"
        )


def top1_agreement(reference: np.ndarray, logits: np.ndarray, error_bound: float) -> Agreement:
    """`Agreement` of `logits` with `reference`, both [images, classes]."""
    reference = np.asarray(reference, dtype=np.float32)
    logits = np.asarray(logits, dtype=np.float32)
    same = reference.argmax(1) == logits.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else None
    margin = top2[:, 1] - top2[:, 0] if top2 is not None else np.full(len(reference), np.inf)
    near = margin <= 2 * error_bound
    error = float(np.abs(logits - reference).max()) if reference.size else 0.0
    return Agreement(
        images=len(reference), equal=int(same.sum()), near_ties=int(near.sum()),
        decisive_flips=int((~same & ~near).sum()), error_bound=float(error_bound),
        max_abs_error=error,
    )  # fmt: skip
