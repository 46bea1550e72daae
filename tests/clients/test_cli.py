"""`resnet-serve-client` against a real server on loopback."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from resnet_serve_client.cli import main

from tests.fixtures.servers import InProcessServer

CLI = str(Path(sys.executable).with_name("resnet-serve-client"))


@pytest.fixture(scope="module")
def server(model_server: InProcessServer) -> str:
    return model_server.address


def test_classify_a_folder_with_the_installed_command(server: str, photos: Path) -> None:
    done = subprocess.run([CLI, "classify", str(photos), "--server", server, "--model",
                           "resnet18", "--top-k", "2"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["PATH", "SCORE", "CLASS"]
    assert [row.split()[0] for row in rows] == [str(p) for p in sorted(photos.iterdir())]
    assert "classified 10 of 10 images with resnet18" in done.stderr
    # the fixture's models are untrained, and the command says so
    assert "note: resnet18 version 1 has random (seed 0) weights: an untrained model" in (
        done.stderr
    )


def test_classify_reports_each_failure_and_exits_non_zero(
    server: str, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really")
    (tmp_path / "notes.txt").write_text("not an image, and not picked up from a folder")
    missing = tmp_path / "missing.png"
    code = main(["classify", str(photos / "coffee.jpg"), str(tmp_path), str(missing),
                 "--server", server, "--model", "resnet18", "--json", "--top-k", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert [Path(line["path"]).name for line in lines] == ["coffee.jpg", "broken.jpg",
                                                            "missing.png"]
    good, broken, absent = lines
    assert (good["model"], len(good["classes"])) == ("resnet18", 3)
    assert broken["error"]["code"] == "INVALID_ARGUMENT"
    assert broken["error"]["message"].startswith("image 0: ")
    assert absent["error"]["code"] == "FileNotFoundError"
    assert "classified 1 of 3 images" in err and "2 failed" in err


def test_classify_needs_a_model_when_the_server_has_several(
    server: str, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["classify", str(photos), "--server", server]) == 2
    assert "choose one with --model" in capsys.readouterr().err


def test_classify_with_client_side_resize(
    server: str, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["classify", str(photos), "--server", server, "--model", "resnet18_u8",
                 "--resize", "uint8", "--json"])
    assert code == 0
    assert len(capsys.readouterr().out.splitlines()) == 10


def test_health_and_models(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--server", server]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--server", server, "--service", "cifar"]) == 0
    capsys.readouterr()
    assert main(["models", "--server", server, "--json"]) == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(models) == {"resnet18", "resnet18_u8", "cifar"}
    assert models["cifar"]["input"]["shape"] == [-1, 3, 32, 32]
    assert main(["models", "--server", server]) == 0
    assert "resnet18_u8" in capsys.readouterr().out


def test_health_of_nothing_listening_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--server", "127.0.0.1:1"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_bench_closed_loop_levels_as_json(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--server", server, "--model", "cifar", "--concurrency", "1,2",
                 "--requests", "20", "--warmup", "0", "--input", "jpeg", "--size", "32",
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["api"] == "classify"
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert (level["ok"], level["errors"]) == (20, {})
        assert level["p50_ms"] <= level["p99_ms"] <= level["max_ms"]
        assert level["client_cpu_s"] >= 0


@pytest.mark.parametrize("kind", ["float", "files"])
def test_bench_v2_open_loop_as_csv(
    server: str, photos: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    files = ["--files", str(photos)] if kind == "files" else []
    code = main(["bench", "--server", server, "--model", "resnet18", "--api", "v2", "--rate",
                 "50", "--concurrency", "4", "--requests", "12", "--warmup", "0",
                 "--input", kind, *files, "--csv"])
    assert code == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert (row["rate"], row["ok"], row["errors"]) == ("50.0", "12", "")


def test_bench_counts_errors_by_code_and_plots(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "chart.png"
    # float tensors for a uint8 model: every request is refused with INVALID_ARGUMENT.
    code = main(["bench", "--server", server, "--model", "resnet18_u8", "--input", "float",
                 "--requests", "5", "--warmup", "0", "--plot", str(chart)])
    assert code == 0
    out = capsys.readouterr().out
    assert "errors at concurrency 1: INVALID_ARGUMENT 5" in out
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_connection_flags_go_before_or_after_the_command() -> None:
    from resnet_serve_client.cli import parser

    assert parser().parse_args(["--server", "a:1", "health"]).server == "a:1"
    assert parser().parse_args(["health", "--server", "b:2"]).server == "b:2"
    assert parser().parse_args(["--timeout", "3", "models"]).timeout == 3.0
