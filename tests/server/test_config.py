"""Settings: defaults, env vars, flags over env, invalid values refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from server import config
from server.config import Settings


def _parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_arguments(parser.parse_args(list(argv)))


def test_defaults() -> None:
    settings = Settings()
    assert (settings.port, settings.metrics_port, settings.device) == (8001, 8002, "auto")
    assert settings.grace_period == 30.0 and settings.reflection is True


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_PORT", "9001")
    monkeypatch.setenv("RESNET_SERVE_METRICS_PORT", "9002")
    monkeypatch.setenv("RESNET_SERVE_REFLECTION", "false")
    monkeypatch.setenv("RESNET_SERVE_REPO", "/srv/models")
    settings = _parse("--metrics-port", "9102", "--device", "cpu", "--intra-op-threads", "1")
    assert settings.port == 9001
    assert settings.metrics_port == 9102
    assert settings.reflection is False
    assert settings.repo == Path("/srv/models")
    assert (settings.device, settings.intra_op_threads) == ("cpu", 1)
    assert _parse("--reflection").reflection is True


@pytest.mark.parametrize(
    "argv",
    [["--port", "70000"], ["--max-image-bytes", "0"], ["--instances", "0"],
     ["--max-decode-backlog", "32"]],  # below max_images_per_request (64)
)
def test_invalid_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(ValidationError):
        _parse(*argv)


def test_choices_come_from_the_literals() -> None:
    with pytest.raises(SystemExit):
        _parse("--device", "tpu")
