"""Every script of examples/ runs against a real in-process server, as its docstring shows.

Each example's ``main(argv)`` is called with the server's address (``--server`` or
``--url``) and photos; it must exit 0 and print, for every photo, the classes the server
gives it: the same top-1 label as the SDK's own ``Classify`` of that photo (the examples
that send the encoded file), or labels of the model (Triton's image client, which scales
pixels itself).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from resnet_serve_client import Client

from tests.fixtures.servers import InProcessServer
from tests.shared_data import PHOTOS

ROOT = Path(__file__).resolve().parents[2]
MODEL = "resnet18"
TOP_K = 3
PHOTO_FILES = [PHOTOS / "coffee.jpg", PHOTOS / "chelsea.png"]
LINE = re.compile(r"^(?P<photo>.+): (?P<label>.+) \((?P<index>\d+)\) (?P<score>-?\d+\.\d+)$")
TRITON_LINE = re.compile(r"^    (-?\d+\.\d{6}) \((\d+)\) = (.+)$")


def _host_port(url: str | None) -> str:
    assert url is not None, "the server has no HTTP port"
    return url.removeprefix("http://")


# each example: the arguments it is run with, against the server
ARGUMENTS: dict[str, Callable[[InProcessServer], list[str]]] = {
    "classify": lambda s: ["--server", s.address, "--model", MODEL, "--top-k", str(TOP_K)],
    "classify_async": lambda s: ["--server", s.address, "--model", MODEL, "--top-k", str(TOP_K)],
    "classify_grpc": lambda s: ["--server", s.address, "--model", MODEL, "--top-k", str(TOP_K)],
    "http_classify": lambda s: ["--url", str(s.http_url), "--model", MODEL, "--top-k", str(TOP_K)],
    "v2_infer": lambda s: ["--url", s.address, "--model", MODEL, "--classes", str(TOP_K)],
    "v2_infer_http": lambda s: [
        *("--url", _host_port(s.http_url), "--protocol", "http"),
        *("--model", MODEL, "--classes", str(TOP_K)),
    ],
}
MODULE = {"v2_infer_http": "v2_infer"}


def test_every_example_is_run_here() -> None:
    scripts = {path.stem for path in (ROOT / "examples").glob("*.py")}
    run = {MODULE.get(name, name) for name in ARGUMENTS} | {"image_client"}
    assert scripts == run


@pytest.fixture(scope="module")
def expected(model_server: InProcessServer) -> dict[str, str]:
    """Each photo's top-1 label by the SDK's Classify."""
    with Client(model_server.address, model=MODEL) as client:
        results = client.classify(PHOTO_FILES, top_k=1)
    return {
        str(photo): result.top.label for photo, result in zip(PHOTO_FILES, results, strict=True)
    }


def _run(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    module = importlib.import_module(f"examples.{MODULE.get(name, name)}")
    code = module.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return out.splitlines()


@pytest.mark.parametrize("name", sorted(ARGUMENTS))
def test_example_classifies_the_photos(
    name: str,
    model_server: InProcessServer,
    model_repo: Path,
    expected: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    labels = (model_repo / MODEL / "labels.txt").read_text().splitlines()
    argv = [*ARGUMENTS[name](model_server), *map(str, PHOTO_FILES)]
    lines = _run(name, argv, capsys)
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    by_photo: dict[str, list[re.Match[str]]] = {}
    for match in matches:
        assert match is not None
        assert labels[int(match["index"])] == match["label"]
        by_photo.setdefault(match["photo"], []).append(match)
    assert list(by_photo) == list(expected)
    for photo, classes in by_photo.items():
        assert len(classes) == TOP_K
        scores = [float(m["score"]) for m in classes]
        assert scores == sorted(scores, reverse=True)
        assert classes[0]["label"] == expected[photo], (photo, lines)


def test_triton_image_client(
    model_server: InProcessServer, model_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = (model_repo / MODEL / "labels.txt").read_text().splitlines()
    argv = ["-u", model_server.address, "-m", MODEL, "-c", str(TOP_K), "-s", "INCEPTION",
            str(PHOTO_FILES[0])]  # fmt: skip
    lines = _run("image_client", argv, capsys)
    assert lines[0] == "Request 1, batch size 1" and lines[-1] == "PASS", lines
    classes = [TRITON_LINE.match(line) for line in lines[1:-1]]
    assert len(classes) == TOP_K and all(classes), lines
    for match in classes:
        assert match is not None and labels[int(match[2])] == match[3]


def test_an_unknown_model_fails_with_the_servers_message(
    model_server: InProcessServer, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module("examples.classify")
    code = module.main(["--server", model_server.address, "--model", "nope", str(PHOTO_FILES[0])])
    assert code == 1
    assert "NOT_FOUND" in capsys.readouterr().err
