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


# --- CPUs from the container's cgroup quota -------------------------------------------------


def _cgroup(tmp_path: Path, files: dict[str, str], own: str = "/") -> tuple[Path, Path]:
    """A cgroup tree under tmp_path with `files` (path → content) and a /proc/self/cgroup
    naming `own` as the process's cgroup v2."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


HOST = config.available_cores(Path("/nonexistent"), Path("/nonexistent"))


@pytest.mark.parametrize(
    ("files", "own", "limit"),
    [
        ({"cpu.max": "400000 100000"}, "/", 4.0),  # a pod with limits.cpu: 4
        ({"cpu.max": "50000 100000"}, "/", 0.5),
        ({"cpu.max": "max 100000"}, "/", None),  # no quota
        ({}, "/", None),  # no cpu controller
        ({"cpu.max": "garbage"}, "/", None),
        # the process's own cgroup and its parents: the smallest quota wins
        ({"kubepods/cpu.max": "200000 100000", "kubepods/pod/cpu.max": "max 100000"},
         "/kubepods/pod", 2.0),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, "/", 3.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
         "/", None),  # v1 without a quota
    ],
)  # fmt: skip
def test_cgroup_cpu_limit(tmp_path: Path, files: dict[str, str], own: str, limit: float) -> None:
    root, proc = _cgroup(tmp_path, files, own)
    assert config.cgroup_cpu_limit(root, proc) == limit


def test_threads_and_decode_workers_follow_the_quota(tmp_path: Path) -> None:
    """A 4-CPU pod on a bigger node: 4 intra-op threads and 4 decode workers, not one per
    host core; a half-CPU pod gets 1."""
    root, proc = _cgroup(tmp_path, {"cpu.max": "400000 100000"})
    cores = config.available_cores(root, proc)
    assert cores == min(4, HOST)
    settings = Settings()
    assert settings.threads_per_session(1, None, cores) == cores
    assert settings.threads_per_session(2, None, cores) == max(1, cores // 2)
    assert settings.decode_threads(cores) == cores
    assert Settings(decode_workers=7).decode_threads(cores) == 7  # explicit settings win
    # front ends share them out, each at least one
    assert settings.decode_threads(16, frontends=8) == 2
    assert settings.decode_threads(6, frontends=4) == settings.decode_threads(2, frontends=3) == 1
    assert Settings(decode_workers=7).decode_threads(16, frontends=8) == 7
    assert settings.threads_per_session(1, 3, cores) == 3  # and so does config.json
    (root / "cpu.max").write_text("50000 100000\n")
    assert config.available_cores(root, proc) == 1
    (root / "cpu.max").write_text("max 100000\n")
    assert config.available_cores(root, proc) == HOST


def test_the_default_message_size_fits_the_largest_request() -> None:
    """64 float32 224x224 images as one v2 tensor, the largest request the other default
    limits let through, with its framing."""
    settings = Settings()
    tensor = settings.max_images_per_request * 3 * 224 * 224 * 4
    assert tensor + (64 << 10) < settings.max_message_bytes < 64 << 20
