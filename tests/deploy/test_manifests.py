"""deploy/: yamllint everywhere, Kubernetes schemas offline, and the numbers that must agree.

Kubernetes manifests are validated by kubernetes-validate against the schemas
it bundles (strict: unknown fields fail). ServingRuntime and InferenceService
(KServe) are CRDs: validated against the parts of KServe's own CRD schemas
they use (tests/deploy/schemas/kserve.yaml, strict as well), the pod parts
they embed as a core/v1 Pod; KEDA's ScaledObject likewise against its CRD's
schema (tests/deploy/schemas/keda.yaml), the HPA behavior it embeds as an
autoscaling/v2 HPA's, its Prometheus queries against the server's families.
ServiceMonitor (Prometheus Operator) is checked structurally. Envoy, Prometheus,
compose and the Grafana dashboard are parsed and checked for the properties the
deployment relies on. Every pod that runs resnet-serve (the Deployment's, the
ServingRuntime's, the InferenceService's) sets its front-end count and gives the
processes what tests/deploy/sizing.py says they need: CPU, a memory-backed
/dev/shm, memory covering both; compose's shm_size covers what auto can start.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy import dockerfile, prom, sizing
from tests.deploy.dockerfile import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
# The oldest Kubernetes the manifests promise to work on (native preStop sleep: 1.30+,
# enabled by default from 1.30), and the newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
K8S_FILES = sorted(K8S.rglob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_k8s() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in K8S_FILES for d in _docs(p)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _all_k8s() if d["kind"] == kind]
    if name is not None:
        found = [d for d in found if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _server_container() -> dict[str, Any]:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "server")


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _image_env() -> dict[str, str]:
    return dockerfile.load().stage("runtime").env()


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- lint and schemas --------------------------------------------------------------------


def test_there_is_something_to_check() -> None:
    assert len(YAML_FILES) >= 10 and len(K8S_FILES) >= 6


def test_yamllint() -> None:
    exe = shutil.which("yamllint", path=str(Path(sys.executable).parent)) or "yamllint"
    result = subprocess.run(
        [exe, "--strict", "-f", "parsable", "-c", str(DEPLOY / ".yamllint.yaml"),
         *map(str, YAML_FILES)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_kubernetes_schema(path: Path, version: str) -> None:
    for doc in _docs(path):
        api, kind = doc["apiVersion"], doc["kind"]
        if kind == "Kustomization":
            continue  # kustomize's own file, checked in test_kustomization_lists_every_manifest
        if kind in ("ServingRuntime", "InferenceService", "ServiceMonitor", "ScaledObject"):
            continue  # CRDs: no bundled schema; KServe's, KEDA's and ServiceMonitor's below
        assert "." not in api.split("/")[0] or api.split("/")[0].endswith("k8s.io"), (
            f"{path.name}: {kind} {api} is a CRD: add a structural check for it"
        )
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_is_not_a_no_op() -> None:
    doc = _one("Deployment")
    broken = json.loads(json.dumps(doc))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 60  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    images = {i["name"] for i in kustomization["images"]}
    assert _server_container()["image"].split(":")[0] in images


# --- the Deployment ----------------------------------------------------------------------


def test_deployment_probes_are_native_grpc_health_checks() -> None:
    container = _server_container()
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert str(grpc_port) == _image_env()["RESNET_SERVE_PORT"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe


def test_termination_outlasts_prestop_and_drain() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    container = _server_container()
    grace = float(_env(container).get("RESNET_SERVE_GRACE_PERIOD") or
                  _image_env()["RESNET_SERVE_GRACE_PERIOD"])  # fmt: skip
    pre_stop = container["lifecycle"]["preStop"]
    delay = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else 0
    assert delay >= 5, "a preStop delay lets endpoint removal reach the load balancers first"
    assert pod["terminationGracePeriodSeconds"] > delay + grace
    # liveness must not kill a pod that is draining (health answers NOT_SERVING meanwhile)
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace


def test_deployment_resources_and_security() -> None:
    container = _server_container()
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory", "nvidia.com/gpu"} <= set(resources[kind]), kind
    pod = _one("Deployment")["spec"]["template"]["spec"]
    image_uid = int(dockerfile.load().stage("runtime").last("USER").value.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_services_select_the_pods_and_name_real_ports() -> None:
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)
    port_names = {p["name"] for p in _server_container()["ports"]}
    services = [d for _, d in _all_k8s() if d["kind"] == "Service"]
    assert {s["spec"].get("clusterIP", "") for s in services} >= {"None"}, "a headless Service"
    assert any(s["spec"].get("type") == "ClusterIP" for s in services), "a ClusterIP Service"
    for service in services:
        assert _matches(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["appProtocol"] == "kubernetes.io/h2c"


def test_hpa_and_pdb_target_the_deployment() -> None:
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"],
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = _one("PodDisruptionBudget")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")


def test_prometheus_scrape_annotations_point_at_metrics() -> None:
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    metrics_port = next(p for p in _server_container()["ports"] if p["name"] == "metrics")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port["containerPort"])
    assert str(metrics_port["containerPort"]) == _image_env()["RESNET_SERVE_METRICS_PORT"]


# --- front ends: CPU, /dev/shm and memory -------------------------------------------------


def _runs_resnet_serve(container: dict[str, Any]) -> bool:
    return container.get("image", "").rsplit("/", 1)[-1].split(":")[0] == "resnet-serve"


def _kserve_merged(isvc: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The pod KServe makes of an InferenceService and its runtime: the model's container
    fields merged into the runtime's container (env by name, resources key by key), the
    predictor's volumes beside the runtime's."""
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    (container,) = runtime["spec"]["containers"]
    merged = json.loads(json.dumps(container))
    env = {e["name"]: e for e in merged.get("env", [])}
    merged["env"] = list((env | {e["name"]: e for e in model.get("env", [])}).values())
    for kind, values in model.get("resources", {}).items():
        merged.setdefault("resources", {}).setdefault(kind, {}).update(values)
    merged["volumeMounts"] = merged.get("volumeMounts", []) + model.get("volumeMounts", [])
    volumes = runtime["spec"].get("volumes", []) + predictor.get("volumes", [])
    return {"containers": [merged], "volumes": volumes}


def _server_pods() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every pod spec under deploy/k8s that runs resnet-serve, with its server container."""
    pods: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for _, doc in _all_k8s():
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            pod = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "ServingRuntime":
            pod = doc["spec"]
        elif doc["kind"] == "InferenceService":
            runtime = _one("ServingRuntime", doc["spec"]["predictor"]["model"]["runtime"])
            pod = _kserve_merged(doc, runtime)
        else:
            continue
        for container in pod["containers"]:
            if _runs_resnet_serve(container):
                name = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
                pods[name] = (pod, container)
    return pods


SERVER_PODS = _server_pods()


def _gpu(container: dict[str, Any]) -> bool:
    resources = container.get("resources", {})
    return any("nvidia.com/gpu" in resources.get(kind, {}) for kind in ("requests", "limits"))


def _frontend_problems(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """What the pod lacks for the front ends its server container starts (sizing.py)."""
    env = _env(container)
    count = sizing.frontends(env.get("RESNET_SERVE_FRONTENDS"))
    if count is None:
        # the images' auto follows the node (the GPU image's CUDA provider, the cores)
        return ["RESNET_SERVE_FRONTENDS is auto: set the count the resources are sized for"]
    if count == 0:
        return []
    segment = int(env.get("RESNET_SERVE_FRONTEND_SHM_BYTES") or sizing.default_segment())
    need = sizing.shm_bytes(count, segment)
    problems = []
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    shm = volumes.get(mounts.get("/dev/shm", ""), {}).get("emptyDir")
    size = 0.0
    if shm is None:
        problems.append("no emptyDir mounted at /dev/shm (the runtime's own is 64Mi)")
    else:
        if shm.get("medium") != "Memory":
            problems.append("/dev/shm's emptyDir is not medium: Memory")
        if "sizeLimit" not in shm:
            problems.append("/dev/shm's emptyDir has no sizeLimit (it would be the node's memory)")
        size = sizing.k8s_quantity(shm.get("sizeLimit", 0))
        if size < need:
            problems.append(f"/dev/shm sizeLimit {size:.0f} < (front ends + 1) x segment = {need}")
    resources = container.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    cpu = sizing.k8s_quantity(requests.get("cpu", 0))
    if cpu < sizing.cpus(count):
        problems.append(f"requests.cpu {cpu:g} < front ends + 1 = {sizing.cpus(count)}")
    for resource in ("cpu", "memory"):
        if resource in limits and sizing.k8s_quantity(limits[resource]) < sizing.k8s_quantity(
            requests.get(resource, 0)
        ):
            problems.append(f"limits.{resource} < requests.{resource}")
    # the emptyDir may fill up to its sizeLimit, all of it charged to the container's memory
    want = sizing.memory(count, segment) - need + max(size, need)
    for kind, values in (("requests", requests), ("limits", limits)):
        got = sizing.k8s_quantity(values.get("memory", 0))
        if got < want:
            problems.append(f"{kind}.memory {got:.0f} < engine + front ends + /dev/shm "
                            f"= {want:.0f}")  # fmt: skip
    return problems


def test_every_server_pod_is_checked() -> None:
    assert set(SERVER_PODS) == {
        "Deployment/resnet-serve/server",
        "ServingRuntime/resnet-serve/kserve-container",
        "InferenceService/resnet-serve/kserve-container",
    }


@pytest.mark.parametrize("name", sorted(SERVER_PODS))
def test_front_ends_have_their_cpu_shm_and_memory(name: str) -> None:
    pod, container = SERVER_PODS[name]
    assert _frontend_problems(pod, container) == []


def test_gpu_pods_run_front_ends() -> None:
    gpu = {n: c for n, (_, c) in SERVER_PODS.items() if _gpu(c)}
    assert gpu, "the Deployment and the InferenceService ask for a GPU"
    for name, container in gpu.items():
        count = sizing.frontends(_env(container).get("RESNET_SERVE_FRONTENDS"))
        assert count is not None and count >= 1, name


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name] + [
        {"name": name, "value": value}
    ]


def _shm_volume(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    return next(v for v in pod["volumes"] if v["name"] == mount["name"])


@pytest.mark.parametrize(
    ("change", "expected"),
    [(lambda pod, c: _set_env(c, "RESNET_SERVE_FRONTENDS", "auto"), "is auto"),
     (lambda pod, c: _set_env(c, "RESNET_SERVE_FRONTENDS", "8"), "sizeLimit"),
     (lambda pod, c: _set_env(c, "RESNET_SERVE_FRONTEND_SHM_BYTES", str(256 << 20)), "sizeLimit"),
     (lambda pod, c: c["volumeMounts"].pop(), "no emptyDir mounted at /dev/shm"),
     (lambda pod, c: _shm_volume(pod)["emptyDir"].pop("medium"), "medium: Memory"),
     (lambda pod, c: _shm_volume(pod)["emptyDir"].pop("sizeLimit"), "no sizeLimit"),
     (lambda pod, c: _shm_volume(pod)["emptyDir"].update(sizeLimit="64Mi"), "sizeLimit"),
     (lambda pod, c: _shm_volume(pod)["emptyDir"].update(sizeLimit="8Gi"), "limits.memory"),
     (lambda pod, c: c["resources"]["requests"].update(cpu="4"), "requests.cpu"),
     (lambda pod, c: c["resources"]["limits"].update(memory="5Gi"), "limits.memory"),
     (lambda pod, c: c["resources"]["requests"].update(memory="4Gi"), "requests.memory")],
    ids=["auto", "more front ends", "larger segments", "no mount", "on disk", "no size",
         "small", "large", "cpu", "memory limit", "memory request"],
)  # fmt: skip
def test_front_end_check_is_not_a_no_op(change: Any, expected: str) -> None:
    pod = json.loads(json.dumps(_one("Deployment")["spec"]["template"]["spec"]))
    container = next(c for c in pod["containers"] if _runs_resnet_serve(c))
    assert _frontend_problems(pod, container) == []
    change(pod, container)
    problems = _frontend_problems(pod, container)
    assert any(expected in p for p in problems), problems


def test_single_process_needs_no_shm() -> None:
    pod = json.loads(json.dumps(_one("Deployment")["spec"]["template"]["spec"]))
    container = next(c for c in pod["containers"] if _runs_resnet_serve(c))
    _set_env(container, "RESNET_SERVE_FRONTENDS", "0")
    container["volumeMounts"] = []
    assert _frontend_problems(pod, container) == []


def test_deployment_comments_state_the_sizes() -> None:
    """The figures written beside the values are the values."""
    pod, container = SERVER_PODS["Deployment/resnet-serve/server"]
    env = _env(container)
    count = int(env["RESNET_SERVE_FRONTENDS"])
    segment = int(env["RESNET_SERVE_FRONTEND_SHM_BYTES"])
    text = (K8S / "deployment.yaml").read_text()
    assert f"RESNET_SERVE_FRONTENDS ({count})" in text
    assert f"RESNET_SERVE_FRONTEND_SHM_BYTES ({segment >> 20}Mi)" in text
    assert f"({count} front ends + 1) x {segment >> 20}Mi" in text
    assert f"{count} front ends + 1 engine" in text
    assert sizing.k8s_quantity(_shm_volume(pod)["emptyDir"]["sizeLimit"]) == sizing.shm_bytes(
        count, segment
    )


# --- CRDs, checked structurally ----------------------------------------------------------


def test_servicemonitor() -> None:
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [
        d for _, d in _all_k8s()
        if d["kind"] == "Service"
        and _matches(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
    ]  # fmt: skip
    assert len(selected) == 1, "the ServiceMonitor selects exactly one Service (no double scrape)"
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


KSERVE_SCHEMAS = yaml.safe_load((Path(__file__).parent / "schemas" / "kserve.yaml").read_text())
CONTAINER_FIELDS = {"name", "image", "command", "args", "env", "ports", "resources", "volumeMounts",
                    "readinessProbe", "livenessProbe", "securityContext"}  # fmt: skip


def _strict(schema: Any) -> Any:
    """As the API server with strict field validation: an object schema that lists its
    properties (and does not preserve unknown fields) accepts no other field."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def _kserve_validate(doc: dict[str, Any]) -> None:
    schema = KSERVE_SCHEMAS[doc["kind"]][doc["apiVersion"]]
    jsonschema.validate(doc, _strict(schema), format_checker=jsonschema.FormatChecker())


def _pod(name: str, containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": containers}}  # fmt: skip


@pytest.mark.parametrize("kind", ["ServingRuntime", "InferenceService"])
def test_kserve_crd_schema(kind: str) -> None:
    _kserve_validate(_one(kind))


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [("ServingRuntime", ("spec", "protocolVersion"), ["grpc-v2"]),  # misspelt
     ("ServingRuntime", ("spec", "protocolVersions"), ["grpc-v3"]),
     ("ServingRuntime", ("spec", "supportedModelFormats"), [{"name": "onnx", "priority": 0}]),
     ("InferenceService", ("spec", "predictor", "model", "storageURI"), "gs://x"),
     ("InferenceService", ("spec", "predictor", "model", "modelFormat"), {"version": "1"})],
)  # fmt: skip
def test_kserve_schema_check_is_not_a_no_op(kind: str, path: tuple[str, ...], value: Any) -> None:
    broken = json.loads(json.dumps(_one(kind)))
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        _kserve_validate(broken)


def test_kserve_servingruntime() -> None:
    runtime = _one("ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"], "the Open Inference Protocol v2 over gRPC"
    assert [f["name"] for f in spec["supportedModelFormats"]] == ["onnx"]
    assert spec["multiModel"] is False
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    # KServe's storage initializer puts the storageUri's content here
    assert _env(container)["RESNET_SERVE_REPO"] == "/mnt/models"
    (port,) = container["ports"]
    assert port["name"] == "h2c", "KServe routes HTTP/2 (gRPC) to a port named h2c"
    assert str(port["containerPort"]) == _image_env()["RESNET_SERVE_PORT"]
    assert container["readinessProbe"]["grpc"]["port"] == port["containerPort"]
    user = dockerfile.load().stage("runtime").last("USER")
    assert user is not None
    assert str(container["securityContext"]["runAsUser"]) == user.value.split(":")[0].strip()
    assert spec["annotations"]["prometheus.kserve.io/port"] == _image_env()[
        "RESNET_SERVE_METRICS_PORT"
    ]
    pod = _pod(runtime["metadata"]["name"], spec["containers"])
    pod["spec"]["volumes"] = spec.get("volumes", [])
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def test_kserve_inferenceservice_uses_the_runtime() -> None:
    isvc, runtime = _one("InferenceService"), _one("ServingRuntime")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    assert "containers" not in predictor, "the runtime brings the container"
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    # KServe picks a runtime only if it lists the model's protocol (the default is v1)
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert re.match(r"^(gs|s3|pvc|https?|hf|oci|azure)://", model["storageUri"])
    # the model's container fields merge into the runtime's container
    (container,) = runtime["spec"]["containers"]
    merged = {**container, **{k: v for k, v in model.items() if k in CONTAINER_FIELDS}}
    pod = _pod(isvc["metadata"]["name"], [merged])
    pod["spec"]["volumes"] = _kserve_merged(isvc, runtime)["volumes"]
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


# --- KEDA: scaling on queue depth and in-flight requests ----------------------------------


KEDA_SCHEMAS = yaml.safe_load((Path(__file__).parent / "schemas" / "keda.yaml").read_text())


def _keda_validate(doc: dict[str, Any]) -> None:
    """The ScaledObject against KEDA's CRD schema, each prometheus trigger's metadata against
    the keys KEDA's Prometheus scaler reads, the HPA behavior as an autoscaling/v2 HPA's."""
    schema = KEDA_SCHEMAS[doc["kind"]][doc["apiVersion"]]
    jsonschema.validate(doc, _strict(schema), format_checker=jsonschema.FormatChecker())
    spec = doc["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)  # the CRD's rule
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus", "only the prometheus trigger's keys are known"
        assert trigger.get("metricType", "AverageValue") in ("AverageValue", "Value")
        jsonschema.validate(trigger["metadata"], _strict(KEDA_SCHEMAS["PrometheusTriggerMetadata"]))
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": doc["metadata"]["name"]},
           "spec": {"scaleTargetRef": spec["scaleTargetRef"], "maxReplicas": 1,
                    "behavior": behavior}}  # fmt: skip
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)


def test_keda_scaledobject_schema() -> None:
    _keda_validate(_one("ScaledObject"))


@pytest.mark.parametrize(
    ("path", "value"),
    [(("spec", "minReplicas"), 3),  # an HPA's name, not KEDA's
     (("spec", "triggers", 0, "metadata", "treshold"), "64"),
     (("spec", "triggers", 0, "metadata", "threshold"), "sixty-four"),
     (("spec", "triggers", 0, "metadata", "threshold"), 64),  # metadata values are strings
     (("spec", "triggers", 1, "metadata", "query"), None),  # required: None deletes it
     (("spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleUp",
       "stabilizationWindow"), 0)],
)  # fmt: skip
def test_keda_schema_check_is_not_a_no_op(path: tuple[Any, ...], value: Any) -> None:
    broken = json.loads(json.dumps(_one("ScaledObject")))
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        _keda_validate(broken)


def test_keda_takes_over_the_hpa_and_scales_like_it() -> None:
    scaled, hpa = _one("ScaledObject"), _one("HorizontalPodAutoscaler")
    spec = scaled["spec"]
    assert {"apiVersion": "apps/v1", "kind": "Deployment", **spec["scaleTargetRef"]} == \
        hpa["spec"]["scaleTargetRef"]  # fmt: skip
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])  # fmt: skip
    config = spec["advanced"]["horizontalPodAutoscalerConfig"]
    assert config["behavior"] == hpa["spec"]["behavior"]
    # KEDA refuses a target that another HPA scales, unless it is handed that HPA by name
    annotations = scaled["metadata"]["annotations"]
    assert annotations["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"
    assert config["name"] == hpa["metadata"]["name"]
    assert "keda" not in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]


def _keda_queries() -> list[str]:
    return [t["metadata"]["query"] for t in _one("ScaledObject")["spec"]["triggers"]]


def test_keda_queries_ask_for_series_the_server_exports() -> None:
    exported = _exported_series()
    headless = next(d for _, d in _all_k8s() if d["kind"] == "Service"
                    and d["spec"].get("clusterIP") == "None")  # fmt: skip
    monitor = _one("ServiceMonitor")
    assert _matches(monitor["spec"]["selector"]["matchLabels"], headless["metadata"]["labels"])
    used = set()
    for query in _keda_queries():
        used |= set(re.findall(r"resnet_serve_\w+", query))
        # the ServiceMonitor's job label is the name of the Service it scrapes through
        assert f'job="{headless["metadata"]["name"]}"' in query
        assert query.startswith("sum("), "one value for all replicas: the HPA divides it"
    assert used == {"resnet_serve_inflight_requests", "resnet_serve_queue_depth"}
    assert used <= exported


@pytest.mark.skipif(prom.absent("promtool"), reason=prom.MISSING)
def test_keda_queries_are_valid_promql(tmp_path: Path) -> None:
    records = [{"record": f"keda:query:{i}", "expr": q} for i, q in enumerate(_keda_queries())]
    rules = {"groups": [{"name": "keda", "rules": records}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = prom.promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose, Envoy, Prometheus ----------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"server", "envoy", "prometheus", "grafana"} <= set(services)
    server = services["server"]
    assert server["deploy"]["replicas"] == 3
    target = re.sub(r"\$\{\w+:-([\w-]+)\}", r"\1", server["build"]["target"])
    assert target in [s.name for s in dockerfile.load().stages]
    assert (COMPOSE / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    grace = float(server["environment"]["RESNET_SERVE_GRACE_PERIOD"])
    assert float(server["stop_grace_period"].rstrip("s")) > grace
    for name, service in services.items():
        if "image" in service and "build" not in service:
            assert re.search(r":v?\d+\.\d+\.\d+$", service["image"]), f"{name}: pin the tag"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} missing"


def test_compose_shm_size_covers_the_front_ends(compose: dict[str, Any]) -> None:
    """Docker's /dev/shm is 64 MiB unless shm_size says otherwise: enough for the most front
    ends the environment's default asks for (auto: as many as it ever starts)."""
    server = compose["services"]["server"]

    def default(value: str) -> str:
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)

    env = {k: default(str(v)) for k, v in server["environment"].items()}
    count = sizing.frontends(env.get("RESNET_SERVE_FRONTENDS"))
    most = sizing.auto_most() if count is None else count
    segment = int(env.get("RESNET_SERVE_FRONTEND_SHM_BYTES") or sizing.default_segment())
    assert most == 8
    assert sizing.docker_bytes(default(str(server["shm_size"]))) >= sizing.shm_bytes(most, segment)


@pytest.fixture(scope="module")
def envoy() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "envoy.yaml").read_text())


def test_envoy_upstream_is_http2_round_robin_with_grpc_health_checks(
    envoy: dict[str, Any], compose: dict[str, Any]
) -> None:
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert cluster["type"] == "STRICT_DNS", "one upstream host per replica found in DNS"
    checks = cluster["health_checks"]
    assert checks and all("grpc_health_check" in c for c in checks)
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["address"] in compose["services"]
    assert str(address["port_value"]) == _image_env()["RESNET_SERVE_PORT"]


def test_frozen_replica_times_in_the_docs_follow_the_health_checks(
    envoy: dict[str, Any],
) -> None:
    """docs/deploy.md's table of how soon a frozen replica leaves the rotation states the
    numbers the health checks have."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    (cluster,) = envoy["static_resources"]["clusters"]
    (check,) = cluster["health_checks"]
    interval, timeout = (float(check[k].rstrip("s")) for k in ("interval", "timeout"))
    threshold = check["unhealthy_threshold"]
    envoy_row = re.search(r"^\| Envoy .*\| (\d+) s \(threshold", text, re.M)
    assert envoy_row, "docs/deploy.md has no Envoy row in the frozen-replica table"
    assert float(envoy_row[1]) == threshold * interval + timeout
    assert f"`interval` {interval:g} s, `timeout` {timeout:g} s, `unhealthy_threshold` " \
        f"{threshold}" in envoy_row[0]  # fmt: skip
    ready = _server_container()["readinessProbe"]
    k8s_row = re.search(r"^\| Kubernetes Services .*\| (\d+) s, then", text, re.M)
    assert k8s_row, "docs/deploy.md has no Kubernetes row in the frozen-replica table"
    assert float(k8s_row[1]) == (
        ready["failureThreshold"] * ready["periodSeconds"] + ready["timeoutSeconds"]
    )
    assert f"`periodSeconds` {ready['periodSeconds']}, `timeoutSeconds` " \
        f"{ready['timeoutSeconds']}, `failureThreshold` {ready['failureThreshold']}" \
        in k8s_row[0]  # fmt: skip


def test_envoy_retries_unavailable_on_another_host(envoy: dict[str, Any]) -> None:
    (listener,) = envoy["static_resources"]["listeners"]
    (hcm,) = listener["filter_chains"][0]["filters"]
    config = hcm["typed_config"]
    assert config["@type"].endswith("HttpConnectionManager")
    routes = [r for vh in config["route_config"]["virtual_hosts"] for r in vh["routes"]]
    clusters = {c["name"] for c in envoy["static_resources"]["clusters"]}
    for route in routes:
        assert route["route"]["cluster"] in clusters
        policy = route["route"]["retry_policy"]
        conditions = policy["retry_on"].split(",")
        assert {"unavailable", "cancelled", "connect-failure"} <= set(conditions)
        assert policy["num_retries"] >= 2
        predicates = [p["name"] for p in policy.get("retry_host_predicate", [])]
        assert "envoy.retry_host_predicates.previous_hosts" in predicates
    assert config["http_filters"][-1]["name"] == "envoy.filters.http.router"


def _envoy_bootstrap(config: dict[str, Any]) -> Any:
    """Parse into Envoy's own API classes (generated from its protos): an unknown or
    misspelt field anywhere, typed_config contents included, raises."""
    bootstrap = pytest.importorskip("envoy_data_plane.envoy.config.bootstrap.v3")
    text = json.dumps(config)
    for type_url in set(re.findall(r"type\.googleapis\.com/([\w.]+)", text)):
        importlib.import_module("envoy_data_plane." + type_url.rsplit(".", 1)[0])
    return bootstrap.Bootstrap.from_dict(config)


def test_envoy_config_matches_the_envoy_api(
    envoy: dict[str, Any], compose: dict[str, Any]
) -> None:
    # request_body_buffer_limit (bodies beyond the connection buffer stay retryable): 1.36+
    image = compose["services"]["envoy"]["image"]
    tag = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)\.\d+", image)
    assert tag and (int(tag[1]), int(tag[2])) >= (1, 36)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        parsed = _envoy_bootstrap(envoy)
    # Envoy's own deprecations read "<Message>.<field> is deprecated"
    deprecated = [str(w.message) for w in caught
                  if re.fullmatch(r"\w+\.\w+ is deprecated", str(w.message))]  # fmt: skip
    assert not deprecated, f"deprecated Envoy fields: {deprecated}"
    (cluster,) = parsed.static_resources.clusters
    assert cluster.health_checks[0].grpc_health_check is not None
    (listener,) = parsed.static_resources.listeners
    assert listener.address.socket_address.port_value == 8001


def test_envoy_api_check_is_not_a_no_op(envoy: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(envoy))
    hcm = broken["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["route_config"]["virtual_hosts"][0]["retry_polcy"] = {}
    with pytest.raises(KeyError, match="retry_polcy"):
        _envoy_bootstrap(broken)


def test_prometheus_scrapes_every_replica(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    assert float(config["global"]["scrape_interval"].rstrip("s")) > 0
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "resnet-serve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["server"] and sd["type"] == "A"
    assert str(sd["port"]) == _image_env()["RESNET_SERVE_METRICS_PORT"]
    assert "server" in compose["services"]
    names = [j["job_name"] for j in config["scrape_configs"]]
    assert len(names) == len(set(names))


# --- the Grafana dashboard ---------------------------------------------------------------


def _exported_series() -> set[str]:
    """Every series name the server can expose, from its metrics module's registry."""
    metrics_module = pytest.importorskip("server.metrics")
    registry = metrics_module.Metrics().registry
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names = set()
    for family in registry.collect():
        if family.name.startswith("resnet_serve_"):
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((COMPOSE / "grafana/dashboards/resnet-serve.json").read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def test_dashboard_queries_only_metrics_the_server_exports(dashboard: dict[str, Any]) -> None:
    exported = _exported_series()
    assert "resnet_serve_requests_total" in exported
    used = {m for e in _exprs(dashboard) for m in re.findall(r"resnet_serve_\w+", e)}
    assert used, "the dashboard queries resnet_serve_* series"
    assert used <= exported, f"not exported by the server: {sorted(used - exported)}"


def test_dashboard_shows_what_operators_need(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(_exprs(dashboard))
    assert "rate(resnet_serve_requests_total" in exprs  # throughput
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, model) (rate(" \
               "resnet_serve_request_duration_seconds_bucket" in exprs  # fmt: skip
    assert "resnet_serve_queue_depth" in exprs
    assert "resnet_serve_batch_size" in exprs
    assert "sum by (code)" in exprs and 'code!="OK"' in exprs  # errors by code
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_matches_compose(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load(
        (COMPOSE / "grafana/provisioning/dashboards/dashboards.yaml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] in mounts.values()
    datasource = yaml.safe_load(
        (COMPOSE / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
