"""What the kubelet puts in the server's environment, rendered for every pod in deploy/.

For every Service in the pod's namespace with a cluster IP, the kubelet injects
docker-link style variables into each container (unless the pod says
``enableServiceLinks: false``): a Service named ``resnet-serve`` gives
``RESNET_SERVE_SERVICE_HOST``, ``RESNET_SERVE_SERVICE_PORT``,
``RESNET_SERVE_PORT=tcp://<ip>:8001``, ``RESNET_SERVE_PORT_8001_TCP_ADDR``, …
(kubernetes pkg/kubelet/envvars/envvars.go). ``RESNET_SERVE_PORT`` is also the
server's port setting. The container's own ``env`` wins over injected names, and
both win over the image's ``ENV``. Here that environment is rendered for each pod
of the manifests — the Deployment's and the KServe predictor's — and the server's
`Settings` are built from it: with the manifests as written, and with service
links switched on, as a cluster that ignored the flag would do.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from tests.deploy import dockerfile
from tests.deploy.test_manifests import _all_k8s, _one

config = pytest.importorskip("server.config")

CLUSTER_NET = ipaddress.ip_network("10.96.0.0/12")


def _variable(name: str) -> str:
    return name.upper().replace("-", "_")


def service_links(service: dict[str, Any], cluster_ip: str) -> dict[str, str]:
    """The variables the kubelet derives from one Service (envvars.FromServices)."""
    prefix = _variable(service["metadata"]["name"])
    ports = service["spec"]["ports"]
    env = {f"{prefix}_SERVICE_HOST": cluster_ip, f"{prefix}_SERVICE_PORT": str(ports[0]["port"])}
    for port in ports:
        if port.get("name"):
            env[f"{prefix}_SERVICE_PORT_{_variable(port['name'])}"] = str(port["port"])
    for i, port in enumerate(ports):
        protocol = port.get("protocol", "TCP")
        url = f"{protocol.lower()}://{cluster_ip}:{port['port']}"
        if i == 0:
            env[f"{prefix}_PORT"] = url
        each = f"{prefix}_PORT_{port['port']}_{protocol.upper()}"
        env[each] = url
        env[f"{each}_PROTO"] = protocol.lower()
        env[f"{each}_PORT"] = str(port["port"])
        env[f"{each}_ADDR"] = cluster_ip
    return env


def injected(every_service: bool = False) -> dict[str, str]:
    """Service links of every Service in deploy/ (the kubelet skips headless ones; with
    ``every_service`` they are rendered too, as if each had a cluster IP)."""
    services = [d for _, d in _all_k8s() if d["kind"] == "Service"]
    ips = CLUSTER_NET.hosts()
    env: dict[str, str] = {}
    for service in services:
        ip = str(next(ips))
        if service["spec"].get("clusterIP") == "None" and not every_service:
            continue
        env |= service_links(service, ip)
    return env


def _resource(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """A resourceFieldRef as the kubelet renders it: cpu rounded up to whole cores."""
    kind, _, resource = ref["resource"].partition(".")
    value = str(container["resources"][kind][resource])
    if resource == "cpu":
        cores = int(value[:-1]) / 1000 if value.endswith("m") else float(value)
        return str(math.ceil(cores))
    return value


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            env[entry["name"]] = _resource(container, entry["valueFrom"]["resourceFieldRef"])
    return env


def environment(
    pod: dict[str, Any], container: dict[str, Any], *, links: bool | None = None
) -> dict[str, str]:
    """The container's environment: image ENV, then service links (when the pod has them
    on, or `links` says so), then the container's own env."""
    env = dict(dockerfile.load().stage("runtime").env())
    if links if links is not None else pod.get("enableServiceLinks", True):
        env |= injected(every_service=links is True)
    return env | container_env(container)


def pods() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod spec, server container) for every pod template in deploy/k8s."""
    deployment = _one("Deployment")["spec"]["template"]["spec"]
    yield "deployment", deployment, next(c for c in deployment["containers"]
                                         if c["name"] == "server")  # fmt: skip
    # KServe: the pod spec is the predictor's, the container the ServingRuntime's
    predictor = _one("InferenceService")["spec"]["predictor"]
    yield "kserve", predictor, _one("ServingRuntime")["spec"]["containers"][0]


PODS = list(pods())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return config.Settings()


def _grpc_port(container: dict[str, Any]) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] in ("grpc", "h2c"))


def test_the_resnet_serve_service_would_inject_the_port_setting() -> None:
    env = injected()
    # the kubelet names the Service's first port (HTTP 8000 since the REST port came first)
    assert env["RESNET_SERVE_PORT"].startswith("tcp://10.")
    assert env["RESNET_SERVE_PORT"].rpartition(":")[2] in ("8000", "8001")
    for name in ("RESNET_SERVE_SERVICE_HOST", "RESNET_SERVE_PORT_8001_TCP",
                 "RESNET_SERVE_PORT_8001_TCP_ADDR", "RESNET_SERVE_SERVICE_PORT_GRPC"):  # fmt: skip
        assert name in env


@pytest.mark.parametrize(("name", "pod", "container"), PODS, ids=[p[0] for p in PODS])
def test_every_pod_turns_service_links_off(name: str, pod: dict, container: dict) -> None:
    assert pod.get("enableServiceLinks") is False, name
    assert container_env(container)["RESNET_SERVE_PORT"] == str(_grpc_port(container))


@pytest.mark.parametrize("links", [None, True], ids=["as-written", "links-on"])
@pytest.mark.parametrize(("name", "pod", "container"), PODS, ids=[p[0] for p in PODS])
def test_settings_build_from_the_rendered_environment(
    name: str, pod: dict, container: dict, links: bool | None, clean_env: pytest.MonkeyPatch
) -> None:
    settings = settings_from(environment(pod, container, links=links), clean_env)
    assert settings.port == _grpc_port(container)
    assert settings.metrics_port == 8002


def test_a_service_link_as_the_port_is_refused_with_the_fix(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """Without the explicit port, the injected link reaches the settings: refused, naming
    the variable and the fix, not a bare 'not a valid integer'."""
    link = injected()["RESNET_SERVE_PORT"]
    with pytest.raises(ValidationError) as refused:
        settings_from({"RESNET_SERVE_PORT": link}, clean_env)
    message = str(refused.value)
    assert f"'{link}' is not a port number" in message
    assert "RESNET_SERVE_PORT" in message and "enableServiceLinks: false" in message
    with pytest.raises(ValidationError, match="RESNET_SERVE_METRICS_PORT"):
        config.Settings(metrics_port="tcp://10.96.0.9:8002")
