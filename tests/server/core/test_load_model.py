"""``--load-model`` with ``--model-control-mode explicit``, as in Triton: only the models
named load at start (``*``: all of them), the others are listed UNAVAILABLE, "unloaded",
until a load request; the server is ready with nothing loaded; a name not in the repository
or a named model that cannot be loaded refuses the start; the other modes refuse the flag.

Real servers over a repository of two copies of the small CIFAR model, ``a`` and ``b``:
in process (`tests.fixtures.servers.InProcessServer`), and as ``resnet-serve serve`` with
front ends (``--frontends 2``) where readiness crosses from the engine to the front ends.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from bench import serving
from server import app, config
from server.core.manager import NOT_NAMED
from server.repository import MODEL_FILE
from tests.fixtures.servers import InProcessServer, settings
from tests.server.core.test_manager import add_model
from tests.server.core.test_model_control import corrupt

EXPLICIT = ("--model-control-mode", "explicit")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def two_models(model_repo: Path, tmp_path: Path) -> Path:
    """A repository of ``a`` and ``b``, each the CIFAR model (version 1)."""
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        add_model(repo, model_repo / "cifar", name)
    return repo


def triton(server: serving.Endpoints) -> httpclient.InferenceServerClient:
    assert server.http_url is not None
    return httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))


def index(server: serving.Endpoints) -> dict[str, tuple[str, str]]:
    """The repository index: each model's (state, reason), as Triton's client reads it."""
    models = triton(server).get_model_repository_index()
    return {m["name"]: (m["state"], m["reason"]) for m in models}


def infer(server: serving.Endpoints, model: str) -> np.ndarray:
    client = triton(server)
    images = httpclient.InferInput("images", [1, 3, 32, 32], "FP32")
    images.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    result = client.infer(model, [images]).as_numpy("logits")
    assert result is not None
    return result


UNLOADED = ("UNAVAILABLE", NOT_NAMED)
READY = ("READY", "")


def test_explicit_without_load_model_loads_nothing_and_is_ready(
    two_models: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    server = inprocess_factory(two_models, *EXPLICIT)  # returns once ready
    client = triton(server)
    assert server.running.ready()
    assert client.is_server_live() and client.is_server_ready()
    assert server.health() == SERVING
    assert index(server) == {"a": UNLOADED, "b": UNLOADED}
    assert not client.is_model_ready("a") and server.health("a") == NOT_SERVING
    assert "no model loaded (explicit model control, no --load-model); ready" in server.log()
    client.load_model("a")
    assert client.is_model_ready("a") and server.health("a") == SERVING
    assert infer(server, "a").shape == (1, 10)
    assert index(server) == {"a": READY, "b": UNLOADED}
    client.unload_model("a")  # the operator's call: the server stays ready
    assert not client.is_model_ready("a") and client.is_server_ready()
    assert server.health() == SERVING


def test_load_model_a_loads_only_a(
    two_models: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    server = inprocess_factory(two_models, *EXPLICIT, "--load-model", "a")
    assert index(server) == {"a": READY, "b": UNLOADED}
    assert triton(server).is_server_ready() and triton(server).is_model_ready("a")
    assert infer(server, "a").shape == (1, 10)
    assert (server.health("a"), server.health("b")) == (SERVING, NOT_SERVING)


def test_load_model_star_loads_every_model(
    two_models: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    server = inprocess_factory(two_models, *EXPLICIT, "--load-model", "*")
    assert index(server) == {"a": READY, "b": READY}
    assert (server.health("a"), server.health("b")) == (SERVING, SERVING)


def test_a_name_not_in_the_repository_refuses_the_start(two_models: Path) -> None:
    with pytest.raises(app.StartupError) as refused:
        InProcessServer(settings(two_models, *EXPLICIT, "--load-model", "a",
                                 "--load-model", "nope"))  # fmt: skip
    assert str(refused.value) == (
        f"--load-model names 'nope', not a model of the repository {two_models} (its models: "
        "a, b)"
    )


def test_a_named_model_that_cannot_load_refuses_the_start(two_models: Path) -> None:
    version = two_models / "b" / "1"
    (version / MODEL_FILE).unlink()  # a hard link to the session's file: replaced, not changed
    corrupt(version)
    with pytest.raises(serving.StartError):  # not ready: loading raised
        InProcessServer(settings(two_models, *EXPLICIT, "--load-model", "a", "--load-model", "b"))
    completed = subprocess.run(
        [*serving.SERVE, "--repo", str(two_models), "--port", "0", "--http-port", "0",
         "--metrics-port", "0", "--device", "cpu", *EXPLICIT, "--load-model", "b"],
        capture_output=True, text=True, timeout=serving.START_TIMEOUT,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "--load-model: model b: version 1 not loaded" in completed.stdout + completed.stderr


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_other_modes_refuse_load_model(two_models: Path, mode: str) -> None:
    completed = subprocess.run(
        [*serving.SERVE, "--repo", str(two_models), "--model-control-mode", mode,
         "--load-model", "a"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr
    assert (f"load_model (a) needs model_control_mode explicit, not {mode}: the {mode} mode "
            "loads every model of the repository at start") in completed.stderr  # fmt: skip


def test_star_goes_alone() -> None:
    with pytest.raises(ValidationError, match=r"load_model \* \(every model\) goes alone"):
        config.Settings(model_control_mode="explicit", load_model=["*", "a"])


def test_flag_repeats_and_env_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args([*EXPLICIT, "--load-model", "a", "--load-model", "b"])
    assert config.from_arguments(args).load_model == ["a", "b"]
    monkeypatch.setenv("RESNET_SERVE_LOAD_MODEL", "a, b,")
    monkeypatch.setenv("RESNET_SERVE_MODEL_CONTROL_MODE", "explicit")
    assert config.Settings().load_model == ["a", "b"]
    assert config.from_arguments(parser.parse_args(["--load-model", "c"])).load_model == ["c"]
    monkeypatch.delenv("RESNET_SERVE_LOAD_MODEL")
    assert config.Settings().load_model == []


def test_front_ends_mirror_ready_with_nothing_loaded(
    two_models: Path, server_factory: Callable[..., serving.Server]
) -> None:
    """``--frontends 2``: the engine loads nothing, every front end says ready (start waits
    for SERVING on ""), a load through one front end serves through every one."""
    server = server_factory(two_models, "--frontends", "2", "--device", "cpu", *EXPLICIT)
    client = triton(server)
    for _ in range(8):  # connections spread over the front ends
        assert triton(server).is_server_ready()
        assert index(server) == {"a": UNLOADED, "b": UNLOADED}
    client.load_model("b")
    for _ in range(8):
        assert triton(server).is_model_ready("b")
        assert infer(server, "b").shape == (1, 10)
