"""Connection options: bearer token, TLS and mutual TLS, round-robin, targets, channel args."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import resnet_serve_client as rsc
from resnet_serve_client.options.channel import normalize_target

from tests.fixtures.fake_classifier import MODEL, FakeServer, FakeTLS


def test_token_travels_as_bearer_metadata_in_plaintext(fake: FakeServer) -> None:
    options = rsc.ChannelOptions(token="s3cret", metadata=(("x-tenant", "blue"),))
    with rsc.Client(fake.target, model=MODEL, options=options) as client:
        client.classify(b"x")
    assert fake.script.metadata[0]["authorization"] == "Bearer s3cret"
    assert fake.script.metadata[0]["x-tenant"] == "blue"
    assert fake.script.metadata[0]["user-agent"].startswith("resnet-serve-client/")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name, extension in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                            ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text(extension + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return d


def _tls_fake(pki: Path, require_client_auth: bool) -> FakeServer:
    return FakeServer(FakeTLS(
        key=(pki / "server.key").read_bytes(), certificate=(pki / "server.pem").read_bytes(),
        client_ca=(pki / "ca.pem").read_bytes(), require_client_auth=require_client_auth,
    ))  # fmt: skip


def test_tls_with_token_as_call_metadata(
    pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token rides as static metadata: grpcio's metadata plugins (which
    access_token_call_credentials is) can deadlock a channel's or server's shutdown."""
    for plugin in ("access_token_call_credentials", "metadata_call_credentials"):
        monkeypatch.setattr(grpc, plugin, _no_plugin)
    server = _tls_fake(pki, require_client_auth=False)
    try:
        tls = rsc.TLS(root_certificates=pki / "ca.pem")
        options = rsc.ChannelOptions(tls=tls, token="s3cret")
        with rsc.Client(f"localhost:{server.port}", model=MODEL, options=options) as client:
            assert client.classify(b"abc")[0].top.index == 3
        assert server.script.metadata[0]["authorization"] == "Bearer s3cret"
    finally:
        server.stop()


def _no_plugin(*args: object, **kwargs: object) -> None:
    raise AssertionError("the SDK built a gRPC metadata plugin")


def test_mutual_tls_needs_the_client_certificate(pki: Path) -> None:
    server = _tls_fake(pki, require_client_auth=True)
    try:
        target = f"127.0.0.1:{server.port}"
        mtls = rsc.TLS(root_certificates=(pki / "ca.pem").read_bytes(),
                       certificate_chain=pki / "client.pem", private_key=pki / "client.key")
        with rsc.Client(target, model=MODEL, options=rsc.ChannelOptions(tls=mtls)) as client:
            assert client.health() is rsc.HealthStatus.SERVING
        anonymous = rsc.ChannelOptions(tls=rsc.TLS(root_certificates=pki / "ca.pem"), retry=None)
        with rsc.Client(target, model=MODEL, options=anonymous) as client, \
                pytest.raises(rsc.Unavailable):
            client.classify(b"x", timeout=5)
    finally:
        server.stop()


def test_tls_needs_both_halves_of_a_client_certificate(pki: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        rsc.TLS(certificate_chain=pki / "client.pem")


def test_round_robin_spreads_calls_over_every_address() -> None:
    first, second = FakeServer(), FakeServer()
    try:
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        with rsc.Client(target, model=MODEL) as client:
            for _ in range(40):
                client.classify(b"x")
        # Calls made before both connections are up go to the first one ready.
        assert first.script.calls >= 10 and second.script.calls >= 10
    finally:
        first.stop()
        second.stop()


def test_dns_target_resolves_and_balances(fake: FakeServer) -> None:
    with rsc.Client(f"dns:///localhost:{fake.port}", model=MODEL) as client:
        assert client.classify(b"ab")[0].top.index == 2


def test_service_config_and_channel_arguments() -> None:
    options = rsc.ChannelOptions(keepalive=rsc.Keepalive(time=30, timeout=5),
                                 tls=rsc.TLS(server_name="resnet.internal"))
    args = dict(options.channel_arguments())
    config = json.loads(args["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert {"service": "resnet_serve.v1.Classifier"} in method["name"]
    assert {"service": "grpc.health.v1.Health"} not in method["name"]
    assert method["retryPolicy"]["maxAttempts"] == 5
    assert args["grpc.keepalive_time_ms"] == 30000
    # a ping unanswered for `timeout` ends the connection (gRPC's ping timeout is separate)
    assert args["grpc.keepalive_timeout_ms"] == args["grpc.http2.ping_timeout_ms"] == 5000
    assert args["grpc.ssl_target_name_override"] == "resnet.internal"
    no_retry = dict(rsc.ChannelOptions(retry=None).channel_arguments())
    assert "methodConfig" not in json.loads(no_retry["grpc.service_config"])
    assert no_retry["grpc.enable_retries"] == 0


def test_channel_args_replace_the_defaults_of_the_same_name() -> None:
    mine = json.dumps({"loadBalancingConfig": [{"pick_first": {}}]})
    options = rsc.ChannelOptions(channel_args=(("grpc.service_config", mine),))
    args = options.channel_arguments()
    assert [value for name, value in args if name == "grpc.service_config"] == [mine]


def test_retry_also_on_extra_codes() -> None:
    retry = rsc.Retry(also_on=(grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE))
    assert retry.codes == (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    )
    codes = retry.policy()["retryableStatusCodes"]
    assert codes == ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("localhost", "localhost:8001"),
        ("10.0.0.7:9000", "10.0.0.7:9000"),
        ("[::1]", "[::1]:8001"),
        ("[::1]:9000", "[::1]:9000"),
        ("dns:///resnet.svc:8001", "dns:///resnet.svc:8001"),
        ("unix:/run/resnet.sock", "unix:/run/resnet.sock"),
    ],
)
def test_targets_get_the_default_port(given: str, expected: str) -> None:
    assert normalize_target(given) == expected
