"""docs/deploy.md: the order it promises, and the nginx configuration it shows."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import nginx, sizing
from tests.deploy.dockerfile import ROOT

DOC = ROOT / "docs" / "deploy.md"


def test_build_run_scale_observe_in_that_order() -> None:
    headings = re.findall(r"^## \d+\. (\w+)", DOC.read_text(), flags=re.MULTILINE)
    assert headings == ["Build", "Run", "Scale", "Observe"]


def _nginx_snippet() -> str:
    (snippet,) = re.findall(r"```nginx\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return snippet


def test_nginx_snippet_has_the_tested_directives() -> None:
    snippet = _nginx_snippet()
    for directive in ("grpc_pass", "grpc_next_upstream", "grpc_next_upstream_tries", "keepalive"):
        shown = re.search(rf"^\s*{directive}\s+([^;]*);", snippet, flags=re.MULTILINE)
        tested = re.search(rf"^\s*{directive}\s+([^;]*);", nginx.CONFIG, flags=re.MULTILINE)
        assert shown and tested, directive
        assert shown[1] == tested[1], f"{directive}: docs {shown[1]!r}, test {tested[1]!r}"


@pytest.mark.skipif(nginx.find() is None, reason="nginx is not installed")
def test_nginx_snippet_is_valid_nginx(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{\naccess_log off;\n{_nginx_snippet()}\n}}\n"
    )
    result = subprocess.run(
        [nginx.find(), "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def _table(header: str) -> list[list[str]]:
    """The rows of the docs' table whose header row starts with `header`, cells stripped."""
    text = DOC.read_text()
    start = text.index(header)
    lines = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_alerts_table_matches_the_rules() -> None:
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())["groups"]
    alerts = {r["alert"]: r["labels"]["severity"] for g in groups for r in g["rules"]
              if "alert" in r}  # fmt: skip
    shown = {row[0].strip("`"): row[1] for row in _table("| alert | severity |")}
    assert shown == alerts


def test_keda_table_matches_the_scaledobject() -> None:
    scaled = yaml.safe_load((ROOT / "deploy" / "k8s" / "keda" / "scaledobject.yaml").read_text())
    triggers = {
        t["name"]: (re.search(r"resnet_serve_\w+", t["metadata"]["query"])[0],
                    t["metadata"]["threshold"])
        for t in scaled["spec"]["triggers"]
    }  # fmt: skip
    shown = {row[0].strip("`"): (re.search(r"resnet_serve_\w+", row[1])[0], row[2])
             for row in _table("| trigger | query")}  # fmt: skip
    assert shown == triggers


def test_sizing_table_follows_the_formula() -> None:
    """Each row of *Processes in a pod*'s table is tests/deploy/sizing.py's rule."""
    rows = _table("| F | S | requests.cpu |")
    assert rows, "the sizing table"
    for count, segment, cpu, shm, memory in rows:
        f, s = int(count), int(segment.removesuffix(" MiB")) << 20
        assert int(cpu) == sizing.cpus(f), count
        assert int(shm.removesuffix(" MiB")) << 20 == sizing.shm_bytes(f, s), count
        assert int(memory.split(" MiB")[0]) << 20 == sizing.memory(f, s), count
    assert "(F + 1) x S" in DOC.read_text()
