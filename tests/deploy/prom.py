"""Debian's Prometheus and promtool for the deploy tests: found on PATH, a server on loopback.

`start(directory, targets)` runs ``prometheus`` with a configuration written into
`directory`: one job, ``resnet-serve``, scraping `targets` every second, the rules
of deploy/prometheus/rules.yml evaluated every second, its data in `directory`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from bench import serving
from tests.deploy import procs
from tests.deploy.dockerfile import ROOT

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yml"
JOB = "resnet-serve"
MISSING = "Debian's prometheus package is not installed (`make deps-system` installs it as root)"


def find(program: str) -> str | None:
    """`program` (prometheus, promtool) on PATH or in /usr/bin, where Debian puts them."""
    return shutil.which(program) or shutil.which(program, path="/usr/bin")


def absent(*programs: str) -> bool:
    """True where one of `programs` is missing and this is not CI (CI must have them)."""
    return any(find(p) is None for p in programs) and not os.environ.get("CI")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = find("promtool")
    assert exe is not None, MISSING
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/`path`: its `data`, once Prometheus says success."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [time, "text"]}, ...]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def wait_for(self, what: str, check: Callable[[], Any], limit: float = 60.0) -> Any:
        """Call `check` until it returns something true (its answer), for `limit` seconds."""
        deadline = time.monotonic() + limit
        while True:
            found = check()
            if found:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {limit:.0f} s\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def stop(self) -> int:
        return procs.stop(self.process, limit=30)


def config(targets: Sequence[str], rule_files: Sequence[Path] = (RULES,)) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": JOB, "metrics_path": "/metrics",
             "static_configs": [{"targets": list(targets)}]},
        ],
    }  # fmt: skip


def start(directory: Path, targets: Sequence[str], attempts: int = 3) -> Prometheus:
    """Prometheus on a free loopback port, scraping `targets` (host:port), ready."""
    exe = find("prometheus")
    assert exe is not None, MISSING
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config(targets), sort_keys=False))
    log_path = directory / "prometheus.log"
    for attempt in range(attempts):
        address = f"127.0.0.1:{serving.free_port()}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [exe, f"--config.file={config_path}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address={address}", "--log.level=info"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        server = Prometheus(process=process, url=f"http://{address}", log_path=log_path)
        try:
            procs.wait_until(partial(_ready, server.url), process, "prometheus ready", limit=60)
            return server
        except AssertionError:
            server.stop()
            if attempt == attempts - 1 or "address already in use" not in server.log():
                raise AssertionError(f"prometheus did not start:\n{server.log()}") from None
    raise AssertionError("unreachable")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False
