"""Bearer tokens on a plaintext port: from an env var and a file, on every service but probes.

One server takes ``ENV_TOKEN`` from ``RESNET_SERVE_AUTH_TOKEN`` and two more
from ``--auth-token-file``. Every accepted token works through the SDK (sent
as metadata), tritonclient (``headers``) and the CLI (``RESNET_SERVE_TOKEN``);
a missing or wrong one is UNAUTHENTICATED on Classify, ClassifyStream,
ListModels, v2 ModelInfer and reflection; grpc.health.v1 and the v2 probes
(ServerLive, ServerReady, ModelReady) answer without one. No token reaches
the log. The HTTP port takes the same tokens (401 without one, probes open).
Token-over-TLS is in test_tls.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from resnet_serve_client import ChannelOptions, Client, HealthStatus, Unauthenticated
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from bench import serving
from server.auth import TokenCheck, TokenError, load_tokens
from server.config import Settings
from server.metrics import Metrics
from tests.reliability import images

ENV_TOKEN = "env-token-7c1e"
FILE_TOKENS = ["file-token-a90b", "file-token-55d2"]
CLI = str(Path(sys.executable).with_name("resnet-serve-client"))


@pytest.fixture(scope="module")
def server(cifar_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.Server]:
    directory = tmp_path_factory.mktemp("auth")
    tokens = directory / "tokens"
    tokens.write_text("# one token per line\n" + "\n".join(FILE_TOKENS) + "\n\n")
    running = serving.start(
        cifar_repo, directory / "logs" / "server.log", ["--auth-token-file", str(tokens)],
        env={"RESNET_SERVE_AUTH_TOKEN": ENV_TOKEN},
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


def sdk(server: serving.Server, token: str | None) -> Client:
    return Client(server.address, model="cifar", timeout=30,
                  options=ChannelOptions(token=token, retry=None))  # fmt: skip


def headers(token: str | None) -> dict[str, str]:
    return {} if token is None else {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize("token", [ENV_TOKEN, *FILE_TOKENS])
def test_every_accepted_token_gets_in(server: serving.Server, token: str) -> None:
    with sdk(server, token) as client:
        (result,) = client.classify(images.jpeg(images.photo()))
        assert len(result.classes) == 5
        assert [m.name for m in client.list_models()] == ["cifar"]
    with grpcclient.InferenceServerClient(server.address) as triton:
        tensor = grpcclient.InferInput("images", [1, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        answer = triton.infer("cifar", [tensor], headers=headers(token))
        assert answer.as_numpy("logits").shape == (1, 10)


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "missing bearer token"), ("wrong", "bearer token is not accepted"),
     (ENV_TOKEN[:-1], "bearer token is not accepted"),
     (ENV_TOKEN + "0", "bearer token is not accepted")],
    ids=["missing", "wrong", "prefix", "longer"],
)  # fmt: skip
def test_missing_or_wrong_tokens_are_unauthenticated(
    server: serving.Server, token: str | None, message: str
) -> None:
    with sdk(server, token) as client, pytest.raises(Unauthenticated, match=message):
        client.classify(images.one_pixel())


def test_every_service_but_the_probes_needs_a_token(server: serving.Server) -> None:
    photo = images.one_pixel()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        calls = {
            "Classify": lambda: stub.Classify(
                pb.ClassifyRequest(model="cifar", images=[pb.Image(encoded=photo)]), timeout=30
            ),
            "ClassifyStream": lambda: list(stub.ClassifyStream(iter([]), timeout=30)),
            "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30),
            "reflection": lambda: ProtoReflectionDescriptorDatabase(channel).get_services(),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED, name
    with grpcclient.InferenceServerClient(server.address) as triton:
        assert triton.is_server_live() and triton.is_server_ready()
        assert triton.is_model_ready("cifar")
        with pytest.raises(InferenceServerException) as refused:
            triton.get_model_metadata("cifar")
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    with sdk(server, None) as client:
        assert client.health() is HealthStatus.SERVING
        assert client.health("cifar") is HealthStatus.SERVING


def test_cli_reads_the_token_from_its_env_var(server: serving.Server, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(images.png(images.photo()))
    env = {**os.environ, "RESNET_SERVE_TOKEN": FILE_TOKENS[1]}
    command = [CLI, "--server", server.address, "classify", str(photo), "--no-progress"]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode == 0, ran.stderr
    env["RESNET_SERVE_TOKEN"] = "wrong"
    ran = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert ran.returncode != 0 and "UNAUTHENTICATED" in ran.stdout + ran.stderr


def test_no_token_reaches_the_log(server: serving.Server) -> None:
    log = server.log()
    assert "bearer tokens required (3 accepted)" in log
    for token in (ENV_TOKEN, *FILE_TOKENS):
        assert token not in log


@pytest.mark.parametrize(
    ("fields", "content", "message"),
    [({}, "# only a comment\n\n", "holds no token"), ({}, None, "cannot read auth_token_file"),
     ({"auth_token": "  "}, "one\n", "auth_token is empty")],
    ids=["file-without-tokens", "missing-file", "blank-env-token"],
)  # fmt: skip
def test_unusable_token_settings_are_named(
    tmp_path: Path, fields: dict[str, str], content: str | None, message: str
) -> None:
    tokens = tmp_path / "tokens"
    if content is not None:
        tokens.write_text(content)
    with pytest.raises(TokenError, match=message):
        load_tokens(Settings(auth_token_file=tokens, **fields))


def test_tokens_from_both_places(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("  a  \n# b\nc\n")
    assert load_tokens(Settings(auth_token="env", auth_token_file=tokens)) == ("env", "a", "c")
    assert load_tokens(Settings()) == ()


@pytest.mark.parametrize(
    ("metadata", "accepted"),
    [
        ((("authorization", "Bearer one"),), True),
        ((("authorization", "bearer two"),), True),
        ((("authorization", "Bearer  one "),), True),
        ((("authorization", "Basic b25lOg=="),), False),
        ((("authorization", "Bearer one"), ("authorization", "Bearer two")), False),
        ((("authorization", "Bearer"),), False),
        ((("x-token", "one"),), False),
        ((), False),
    ],
    ids=["bearer", "scheme-case", "spaces", "basic", "two-headers", "no-token", "other-header",
         "none"],
)  # fmt: skip
def test_the_check_reads_one_bearer_header(
    metadata: tuple[tuple[str, str], ...], accepted: bool
) -> None:
    check = TokenCheck(["one", "two"], Metrics())
    assert (check.accepts(metadata) is None) is accepted


def test_a_flood_of_refused_calls_is_counted_and_logged_rate_limited(
    server: serving.Server,
) -> None:
    def refused() -> float:
        found = re.search(r"^resnet_serve_auth_failures_total (\S+)$", server.metrics(), re.M)
        assert found, "no resnet_serve_auth_failures_total"
        return float(found.group(1))

    before, lines_before = refused(), server.log().count("refused UNAUTHENTICATED")
    flood = 200
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for _ in range(flood):
            with pytest.raises(grpc.RpcError) as error:
                stub.ListModels(pb.ListModelsRequest(), timeout=30)
            assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert server.http_url is not None  # the HTTP port's refusals are the same rule's
    for _ in range(flood):
        request = urllib.request.Request(f"{server.http_url}/v2/models/cifar")
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=30)
        assert http_error.value.code == 401
    assert refused() - before == 2 * flood
    # at most one line per 10 s: the flood (well under a minute) writes a handful at most,
    # and no line per refused call
    log = server.log()
    lines = log.count("refused UNAUTHENTICATED") - lines_before
    assert lines <= 6, log
    assert "-> UNAUTHENTICATED" not in log and "-> 401" not in log, log
    with sdk(server, ENV_TOKEN) as client:
        assert [m.name for m in client.list_models()] == ["cifar"]
        assert client.health() is HealthStatus.SERVING


def test_the_http_port_takes_the_same_tokens(server: serving.Server) -> None:
    """tritonclient.http with each token gets in; without one or with a wrong one, 401 with
    the reason; the probes (health, model ready) stay open for load balancers."""
    assert server.http_url is not None
    triton = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        assert triton.is_server_live() and triton.is_server_ready()
        assert triton.is_model_ready("cifar")
        tensor = httpclient.InferInput("images", [1, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        for token in (ENV_TOKEN, *FILE_TOKENS):
            answer = triton.infer("cifar", [tensor], headers=headers(token))
            assert answer.as_numpy("logits").shape == (1, 10)
        for token, message in ((None, "missing bearer token"), ("wrong", "not accepted")):
            with pytest.raises(InferenceServerException) as refused:
                triton.infer("cifar", [tensor], headers=headers(token))
            assert refused.value.status() == "401" and message in refused.value.message()
            with pytest.raises(InferenceServerException) as refused:
                triton.get_model_metadata("cifar", headers=headers(token))
            assert refused.value.status() == "401"
    finally:
        triton.close()
    request = urllib.request.Request(f"{server.http_url}/v2/models/cifar/classify", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as refused_curl:
        urllib.request.urlopen(request, timeout=30)
    assert refused_curl.value.code == 401
    assert refused_curl.value.headers["WWW-Authenticate"] == "Bearer"
