"""Export + verification of every architecture and layout (marker ``full_family``).

Slow (resnet1202 and wide_resnet101_2 alone take minutes on two cores), so the default
run leaves it out; run it with ``pytest -m full_family tests/builder``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.architectures import Layout
from builder.build import build
from builder.options import BuildOptions
from builder.registry import REGISTRY

CASES = [(spec.name, Layout.TORCHVISION) for spec in REGISTRY] + [
    (spec.name, Layout.ORIGINAL)
    for spec in REGISTRY
    if spec.has_layouts and spec.macs_for(Layout.ORIGINAL, spec.default_num_classes)
]


@pytest.mark.full_family
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("arch", "layout"), CASES, ids=[f"{a}-{lay}" for a, lay in CASES])
def test_builds_and_verifies(arch: str, layout: Layout, tmp_path: Path) -> None:
    result = build(BuildOptions(arch=arch, repo=tmp_path, layout=layout))
    spec = REGISTRY.get(arch)
    try:
        checks = {check.name: check for check in result.report.checks}
        assert result.report.passed, result.report.failure_summary()
        macs = checks["multiply_adds"].figures
        if spec.macs_for(layout, spec.default_num_classes) is not None:
            assert abs(macs["rel_difference"]) <= 0.03
        if spec.reference_params is not None:
            assert checks["parameter_count"].figures["counted"] == pytest.approx(
                spec.reference_params, abs=spec.reference_params_tolerance
            )
    finally:
        shutil.rmtree(tmp_path / arch, ignore_errors=True)  # up to 0.5 GB per model
