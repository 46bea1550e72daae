"""config.json's labels path, labels.txt and version policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.repository import (
    SERVE_ALL,
    LatestVersions,
    ModelConfig,
    SpecificVersions,
    VersionPolicy,
    labels_text,
    read_labels,
)


@pytest.mark.parametrize("labels", ["../labels.txt", "/etc/passwd", "a/../../b", "..\\x", ""])
def test_labels_stay_inside_the_model_directory(labels: str) -> None:
    with pytest.raises(ValidationError, match="must be a file inside the model directory"):
        ModelConfig(name="m", arch="resnet18", num_classes=2, labels=labels)


def test_labels_read_back_one_per_class(tmp_path: Path) -> None:
    config = ModelConfig(name="m", arch="resnet18", num_classes=3, labels="names/classes.txt")
    (tmp_path / "names").mkdir()
    (tmp_path / "names" / "classes.txt").write_text(labels_text(["cat", "", "dog"]))
    assert read_labels(tmp_path, config) == ["cat", "", "dog"]
    with pytest.raises(ValueError, match="has 3 labels, the model 2 classes"):
        read_labels(tmp_path, config.model_copy(update={"num_classes": 2}))


@pytest.mark.parametrize("label", ["two\nlines", "trailing\n", "carriage\rreturn"])
def test_a_label_is_one_line(label: str) -> None:
    with pytest.raises(ValueError, match=r"label 1 .* must be one line"):
        labels_text(["fine", label])


def _config(**fields: object) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "arch": "resnet18", "num_classes": 2, **fields})


def test_version_policy_reads_triton_s_three_forms_and_defaults_to_all() -> None:
    assert _config().version_policy == SERVE_ALL
    latest = _config(version_policy={"latest": {"num_versions": 2}}).version_policy
    specific = _config(version_policy={"specific": {"versions": [3, 1, 3]}}).version_policy
    assert (latest.describe(), specific.describe(), SERVE_ALL.describe()) == (
        "latest 2", "specific 1, 3", "all"
    )  # fmt: skip
    assert _config(version_policy={"latest": {}}).version_policy.describe() == "latest 1"
    assert latest.excluded() == "not in the version policy (latest 2)"
    # written back as it was given: only the one form, as Triton's version_policy
    dumped = _config(version_policy={"latest": {"num_versions": 2}}).model_dump(mode="json")
    assert dumped["version_policy"] == {"latest": {"num_versions": 2}}
    assert _config().model_dump(mode="json")["version_policy"] == {"all": {}}


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({}, "exactly one of latest, all, specific; got none"),
        ({"all": {}, "latest": {}}, "exactly one of latest, all, specific; got ['latest', 'all']"),
        ({"latest": {"num_versions": 0}}, "greater than or equal to 1"),
        ({"specific": {"versions": []}}, "at least 1 item"),
        ({"specific": {"versions": [0]}}, "each must be a positive integer"),
        ({"newest": {}}, "Extra inputs are not permitted"),
    ],
)
def test_a_version_policy_that_does_not_read_says_why(policy: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        _config(version_policy=policy)


def test_version_policy_selects_by_version_number() -> None:
    on_disk = [1, 2, 3, 10]
    refused = {10}
    asked: list[int] = []

    def servable(version: int) -> bool:
        asked.append(version)
        return version not in refused

    latest = VersionPolicy(latest=LatestVersions(num_versions=2))
    # a refused version does not take a place; the rest are never checked
    assert latest.select(on_disk, servable) == [2, 3]
    assert asked == [10, 3, 2]
    asked.clear()
    assert SERVE_ALL.select(on_disk, servable) == on_disk
    specific = VersionPolicy(specific=SpecificVersions(versions=(2, 10, 7)))
    assert specific.select(on_disk, servable) == [2, 10]
    assert asked == []  # only `latest` needs to know which versions pass the check
    assert latest.select([], servable) == []
