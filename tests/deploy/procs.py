"""Processes for the deploy tests: servers started as the image starts
them, waiting on the gRPC health protocol, and a scrape of /metrics."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent
# Generous bound on a server coming up (load + warm-up) on a busy 2-core machine.
STARTUP_LIMIT = 300.0


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment less any RESNET_SERVE_* of the caller, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(overrides)
    return env


def image_env(env: dict[str, str], **image: str) -> dict[str, str]:
    """`env` with an image's ENV values laid over it, `$PATH` in them expanded against
    env's own PATH (as Docker expands it against the base image's)."""
    out = dict(env)
    for key, value in image.items():
        out[key] = value.replace("${PATH}", env["PATH"]).replace("$PATH", env["PATH"])
    return out


def wait_until(check: Callable[[], bool], proc: subprocess.Popen | None, what: str,
               limit: float = STARTUP_LIMIT, every: float = 0.5) -> None:  # fmt: skip
    """Poll `check` until true; fail early if `proc` exits, or after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode} first")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit:.0f} s")
        time.sleep(every)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, limit: float = 120.0) -> int:
    """Send `sig` and wait for the exit code (kill after `limit` seconds)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def jpeg(size: int = 64, seed: int = 0) -> bytes:
    """A small, deterministic colour JPEG."""
    image = Image.new("RGB", (size, size))
    image.putdata([((x * 4 + seed) % 256, (y * 4) % 256, (x + y + seed) % 256)
                   for y in range(size) for x in range(size)])  # fmt: skip
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def scrape(port: int) -> dict[str, float]:
    """The /metrics samples of a server as {'name{label="v",...}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def requests_total(port: int, code: str | None = None) -> float:
    """Sum of resnet_serve_requests_total on one server (optionally for one status code)."""
    want = f'code="{code}"' if code else ""
    return sum(
        value for key, value in scrape(port).items()
        if key.startswith("resnet_serve_requests_total{") and want in key
    )  # fmt: skip
