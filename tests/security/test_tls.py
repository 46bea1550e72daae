"""TLS and mutual TLS on the gRPC and HTTP ports, through the real SDK, CLI and urllib,
certificates made here.

Two servers over the one-model ``cifar`` repository:

- ``tls``: ``--tls-cert/--tls-key`` and a bearer token (env var), so the
  SDK's token travels as call metadata over TLS;
- ``mtls``: adds ``--tls-client-ca``: only clients with a certificate from
  that CA get in.

Plaintext clients, clients that do not trust the server's CA, and clients
without (or with a stranger's) certificate are refused at the handshake
(UNAVAILABLE); inconsistent settings and unreadable TLS files are named, and
stop the server at start with one line.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from resnet_serve_client import (
    TLS,
    ChannelOptions,
    Client,
    HealthStatus,
    Unauthenticated,
    Unavailable,
)

from bench import serving
from server.config import Settings
from server.tls import TLSError, server_credentials
from tests.reliability import images
from tests.security.certs import PKI

TOKEN = "tls-test-token-3f9a"
CLI = str(Path(sys.executable).with_name("resnet-serve-client"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "photo.jpg"
    path.write_bytes(images.jpeg(images.photo()))
    return path


@pytest.fixture(scope="module")
def tls_server(
    cifar_repo: Path, pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[serving.Server]:
    running = serving.start(
        cifar_repo, tmp_path_factory.mktemp("tls-logs") / "server.log",
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)],
        credentials=grpc.ssl_channel_credentials(pki.ca.read_bytes()),
        env={"RESNET_SERVE_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def mtls_server(
    cifar_repo: Path, pki: PKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[serving.Server]:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    running = serving.start(
        cifar_repo, tmp_path_factory.mktemp("mtls-logs") / "server.log",
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
         "--tls-client-ca", str(pki.ca)],
        credentials=credentials,
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


def client(server: serving.Server, tls: TLS | None, token: str | None = None) -> Client:
    options = ChannelOptions(tls=tls, token=token, retry=None)
    return Client(server.address, model="cifar", options=options, timeout=30)


def cli(server: serving.Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RESNET_SERVE_TOKEN"}
    return subprocess.run(
        [CLI, "--server", server.address, *args], capture_output=True, text=True, timeout=120,
        env=env,
    )  # fmt: skip


def test_sdk_over_tls_with_a_token(tls_server: serving.Server, pki: PKI, photo: Path) -> None:
    with client(tls_server, TLS(root_certificates=pki.ca), TOKEN) as sdk:
        (result,) = sdk.classify(photo)
        assert len(result.classes) == 5
        assert sdk.health() is HealthStatus.SERVING
    assert "gRPC and HTTP ports: TLS, bearer tokens required (1 accepted)" in tls_server.log()


def test_tls_port_refuses_plaintext_and_unknown_servers(
    tls_server: serving.Server, pki: PKI, photo: Path
) -> None:
    for tls in (None, TLS(root_certificates=pki.rogue_ca)):
        with client(tls_server, tls, TOKEN) as sdk, pytest.raises(Unavailable):
            sdk.classify(photo)


def test_token_over_tls_is_checked_and_health_stays_open(
    tls_server: serving.Server, pki: PKI, photo: Path
) -> None:
    tls = TLS(root_certificates=pki.ca)
    for token in (None, "wrong"):
        with client(tls_server, tls, token) as sdk:
            with pytest.raises(Unauthenticated):
                sdk.classify(photo)
            assert sdk.health() is HealthStatus.SERVING


def https_context(pki: PKI) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.ca)


def https(
    server: serving.Server,
    path: str,
    context: ssl.SSLContext,
    body: bytes | None = None,
    token: str | None = None,
) -> tuple[int, bytes]:
    assert server.http_url is not None and server.http_url.startswith("https://")
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(server.http_url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_http_port_speaks_tls_with_the_same_token(
    tls_server: serving.Server, pki: PKI, photo: Path
) -> None:
    context = https_context(pki)
    assert https(tls_server, "/v2/health/ready", context) == (200, b'{"ready":true}')
    status, body = https(tls_server, "/v2/models/cifar/classify", context, photo.read_bytes())
    assert status == 401 and b"missing bearer token" in body
    route = "/v2/models/cifar/classify"
    status, body = https(tls_server, route, context, photo.read_bytes(), TOKEN)
    assert status == 200 and b'"classes"' in body
    assert tls_server.http_url is not None
    plaintext = tls_server.http_url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(plaintext + "/v2/health/ready", timeout=30)
    rogue = ssl.create_default_context(cafile=pki.rogue_ca)
    with pytest.raises(urllib.error.URLError):
        https(tls_server, "/v2/health/ready", rogue)


def test_cli_over_tls(tls_server: serving.Server, pki: PKI, photo: Path) -> None:
    ran = cli(tls_server, "--ca", str(pki.ca), "--token", TOKEN, "classify", str(photo),
              "--model", "cifar", "--no-progress")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert photo.name in ran.stdout
    ran = cli(tls_server, "--ca", str(pki.ca), "health")
    assert (ran.returncode, ran.stdout.strip()) == (0, "SERVING"), ran.stderr
    ran = cli(tls_server, "--ca", str(pki.ca), "models")
    assert ran.returncode != 0 and "UNAUTHENTICATED" in ran.stdout + ran.stderr


def test_sdk_with_a_client_certificate(mtls_server: serving.Server, pki: PKI, photo: Path) -> None:
    tls = TLS(root_certificates=pki.ca, certificate_chain=pki.client_cert,
              private_key=pki.client_key)  # fmt: skip
    with client(mtls_server, tls) as sdk:
        (result,) = sdk.classify(photo)
        assert len(result.classes) == 5
    context = https_context(pki)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    status, _ = https(mtls_server, "/v2/models/cifar/classify", context, photo.read_bytes())
    assert status == 200
    assert "gRPC and HTTP ports: mutual TLS, no authentication" in mtls_server.log()


def test_mtls_refuses_clients_without_a_trusted_certificate(
    mtls_server: serving.Server, pki: PKI, photo: Path
) -> None:
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        https(mtls_server, "/v2/health/ready", https_context(pki))
    for tls in (
        TLS(root_certificates=pki.ca),
        TLS(root_certificates=pki.ca, certificate_chain=pki.rogue_cert, private_key=pki.rogue_key),
    ):
        with client(mtls_server, tls) as sdk, pytest.raises(Unavailable):
            sdk.classify(photo)


def test_cli_with_a_client_certificate(mtls_server: serving.Server, pki: PKI, photo: Path) -> None:
    certificate = ("--ca", str(pki.ca), "--cert", str(pki.client_cert),
                   "--key", str(pki.client_key))  # fmt: skip
    ran = cli(mtls_server, *certificate, "classify", str(photo), "--no-progress")
    assert ran.returncode == 0, ran.stderr
    assert photo.name in ran.stdout
    ran = cli(mtls_server, "--ca", str(pki.ca), "health")
    assert ran.returncode != 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert": "cert"}, "tls_cert and tls_key go together"),
        ({"tls_key": "key"}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca"}, "tls_client_ca (mutual TLS) needs tls_cert and tls_key"),
    ],
    ids=["cert-without-key", "key-without-cert", "client-ca-without-cert"],
)
def test_tls_settings_that_cannot_work_are_refused(
    pki: PKI, fields: dict[str, str], message: str
) -> None:
    paths = {"cert": pki.server_cert, "key": pki.server_key, "ca": pki.ca}
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(**{name: paths[kind] for name, kind in fields.items()})


@pytest.mark.parametrize(
    ("setting", "content", "message"),
    [("tls_cert", None, "cannot read tls_cert"), ("tls_key", "just text\n", "holds no PEM block"),
     ("tls_client_ca", b"\x00\x01", "holds no PEM block")],
    ids=["missing-cert", "key-not-pem", "client-ca-not-pem"],
)  # fmt: skip
def test_unusable_tls_files_are_named(
    pki: PKI, tmp_path: Path, setting: str, content: str | bytes | None, message: str
) -> None:
    bad = tmp_path / "bad.pem"
    if isinstance(content, str):
        bad.write_text(content)
    elif content is not None:
        bad.write_bytes(content)
    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    with pytest.raises(TLSError, match=re.escape(message)) as error:
        server_credentials(Settings(**{**files, setting: bad}))
    assert f"{setting} {bad}" in str(error.value)


def test_an_unusable_tls_file_stops_the_server_with_one_line(
    cifar_repo: Path, pki: PKI, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    command = [*serving.SERVE, "--repo", str(cifar_repo), "--host", "127.0.0.1", "--port", "0",
               "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--http-port", "0",
               "--tls-cert", str(missing), "--tls-key", str(pki.server_key)]  # fmt: skip
    ran = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stderr
    (line,) = ran.stderr.splitlines()
    assert f"cannot read tls_cert {missing}" in line
