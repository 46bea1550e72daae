"""The CPU image built and run for real: three containers behind nginx.

The image is built the way `make images` builds it (deploy/images.py: a private
dockerd where none answers, the debootstrapped base, the wheelhouse, no
registry), with the small CIFAR resnet20 baked in so that three replicas stay
light on a 2-core machine. The containers run as the image says (its
ENTRYPOINT, its USER 10001, its HEALTHCHECK) on the host network with distinct
ports, a read-only root filesystem and a tmpfs /tmp; nginx balances them.

- The image holds onnxruntime (CPU) and no torch.
- Docker's own HEALTHCHECK status of each container turns `healthy`.
- Classify and v2 ModelInfer through nginx reach every replica.
- `docker stop` of one replica under steady load from both APIs: no call fails,
  the container exits 0.
- A fourth container with RESNET_SERVE_FRONTENDS=2 and the /dev/shm that
  tests/deploy/sizing.py gives two front ends: PID 1 is rs-engine, its children
  rs-frontend-0 and rs-frontend-1; it serves a Classify; `docker stop` (SIGTERM
  to PID 1) drains all three processes and it exits 0.

Marked `docker`; skipped with the reason where Docker cannot run (not Linux, not
root and no daemon, docker.io or debootstrap missing: `make deps-system`).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench import serving
from deploy import images
from tests.deploy import nginx, procs, sizing
from tests.deploy.load import Load

ARCH = "resnet20"
MODEL = ARCH
TAG_SUFFIX = "-test"
SERVER_FLAGS = ("--instances", "1", "--intra-op-threads", "1", "--decode-workers", "1",
                "--grace-period", "20")  # fmt: skip
STOP_TIMEOUT = 40  # docker stop -t: longer than the grace period
BEFORE_STOP = 40  # calls completed before `docker stop`
AFTER_EXIT = 40  # calls completed after the stopped container has exited
SPREAD_CALLS = 30
FRONTENDS = 2  # the container that runs an engine and front ends

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def docker() -> Iterator[images.Docker]:
    reason = images.unavailable_reason()
    if reason:
        pytest.skip(f"Docker cannot run here: {reason}")
    if nginx.find() is None and not os.environ.get("CI"):
        pytest.skip("nginx is not installed (`make deps-system` installs it as root)")
    with contextlib.ExitStack() as stack:
        try:
            found = stack.enter_context(images.daemon())
        except images.Unavailable as exc:
            pytest.skip(f"Docker cannot run here: {exc}")
        yield found


@pytest.fixture(scope="module")
def image(docker: images.Docker, tmp_path_factory: pytest.TempPathFactory) -> str:
    logs = tmp_path_factory.mktemp("image-build")
    started = time.monotonic()
    try:
        tags = images.build_images(docker, ["cpu"], archs=ARCH, suffix=TAG_SUFFIX, log_dir=logs)
    except images.Unavailable as exc:  # not enough disk
        pytest.skip(f"Docker cannot run here: {exc}")
    print(f"\nimage {tags['cpu']} ready in {time.monotonic() - started:.0f} s")
    return tags["cpu"]


@dataclass
class Container:
    name: str
    port: int
    http_port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _inspect(docker: images.Docker, name: str) -> dict:
    (state,) = json.loads(docker.run("inspect", name).stdout)
    return state


def _health(docker: images.Docker, name: str) -> str:
    state = _inspect(docker, name)["State"]
    if not state["Running"]:
        raise AssertionError(f"{name} exited with {state['ExitCode']}:\n"
                             f"{docker.run('logs', name, check=False).stderr[-3000:]}")  # fmt: skip
    return state["Health"]["Status"]


def _start(docker: images.Docker, image: str, suffix: str, *options: str) -> Container:
    """A detached container of `image` on the host network with ports of its own."""
    container = Container(f"resnet-serve-test-{os.getpid()}-{suffix}", serving.free_port(),
                          serving.free_port(), serving.free_port())  # fmt: skip
    docker.run(
        "run", "--detach", "--name", container.name, "--network", "host",
        "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp",
        "--env", f"RESNET_SERVE_PORT={container.port}",
        "--env", f"RESNET_SERVE_HTTP_PORT={container.http_port}",
        "--env", f"RESNET_SERVE_METRICS_PORT={container.metrics_port}",
        "--env", "RESNET_SERVE_HOST=127.0.0.1",
        "--env", "RESNET_SERVE_METRICS_HOST=127.0.0.1",
        *options, image, *SERVER_FLAGS,
    )  # fmt: skip
    return container


def _wait_healthy(docker: images.Docker, container: Container) -> None:
    try:
        procs.wait_until(lambda: _health(docker, container.name) == "healthy", None,
                         f"{container.name}: HEALTHCHECK healthy", every=1)  # fmt: skip
    except AssertionError as exc:
        health = _inspect(docker, container.name)["State"].get("Health")
        logs = docker.run("logs", container.name, check=False)
        output = (logs.stdout + logs.stderr)[-3000:]
        raise AssertionError(f"{exc}\nhealth: {health}\nlogs:\n{output}") from None


@pytest.fixture(scope="module")
def replicas(docker: images.Docker, image: str) -> Iterator[list[Container]]:
    started: list[Container] = []
    try:
        for index in range(3):
            started.append(_start(docker, image, str(index)))
        for container in started:
            _wait_healthy(docker, container)
        yield started
    finally:
        for container in started:
            docker.run("rm", "--force", container.name, check=False)


@pytest.fixture(scope="module")
def proxy(replicas: list[Container], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[nginx.Nginx]:  # fmt: skip
    assert nginx.find() is not None, "CI must have nginx: `make deps-system` installs it"
    server = nginx.start(tmp_path_factory.mktemp("nginx"), [r.address for r in replicas])
    yield server
    server.stop()


def test_image_holds_onnxruntime_and_no_torch(docker: images.Docker, image: str) -> None:
    listed = docker.run("run", "--rm", "--network", "none", "--entrypoint", "pip", image,
                        "list", "--format", "json").stdout  # fmt: skip
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert {"onnxruntime", "resnet-serve", "resnet-serve-client"} <= installed
    assert not {"torch", "onnxruntime-gpu", "onnx"} & installed, sorted(installed)
    probe = "import importlib.util as u; print(u.find_spec('torch'))"
    found = docker.run("run", "--rm", "--network", "none", "--entrypoint", "python", image,
                       "-c", probe).stdout  # fmt: skip
    assert found.strip() == "None"


def test_containers_run_as_the_image_says_and_report_healthy(
    docker: images.Docker, replicas: list[Container]
) -> None:
    for container in replicas:
        state = _inspect(docker, container.name)
        assert state["Config"]["User"] == "10001:10001"
        assert state["HostConfig"]["ReadonlyRootfs"] is True
        health = state["State"]["Health"]
        assert health["Status"] == "healthy", health
        last = health["Log"][-1]
        assert last["ExitCode"] == 0 and last["Output"].strip() == "SERVING", last


def _ok_total(container: Container) -> float:
    return procs.requests_total(container.metrics_port, "OK")


def test_classify_and_v2_through_nginx_reach_every_replica(
    replicas: list[Container], proxy: nginx.Nginx
) -> None:
    before = [_ok_total(r) for r in replicas]
    load = Load(proxy.address, MODEL, v2=True)
    threads = load.run()
    try:
        load.wait_for(SPREAD_CALLS, "calls through nginx")
    finally:
        load.finish(threads)
    assert not load.failures, load.failures[:5]
    assert load.ok_by_api["classify"] > 0 and load.ok_by_api["v2"] > 0, load.ok_by_api
    grown = [_ok_total(r) - b for r, b in zip(replicas, before, strict=True)]
    assert all(g > 0 for g in grown), f"calls per replica: {grown}\n{proxy.error_log()}"


def test_docker_stop_under_load_fails_no_call(
    docker: images.Docker, replicas: list[Container], proxy: nginx.Nginx
) -> None:
    stopped = replicas[0]
    load = Load(proxy.address, MODEL, v2=True)
    threads = load.run()
    stop_result: list[str] = []
    try:
        load.wait_for(BEFORE_STOP, "steady load before docker stop")
        assert not load.failures, load.failures[:5]
        stopper = threading.Thread(target=lambda: stop_result.append(
            docker.run("stop", "--time", str(STOP_TIMEOUT), stopped.name,
                       timeout=STOP_TIMEOUT + 60).stdout))  # fmt: skip
        stopper.start()
        stopper.join(timeout=STOP_TIMEOUT + 90)
        at_exit = load.ok
        load.wait_for(at_exit + AFTER_EXIT, "steady load after the stopped container exited")
    finally:
        load.finish(threads)
    state = _inspect(docker, stopped.name)["State"]
    logs = docker.run("logs", stopped.name, check=False)
    assert not load.failures, (
        f"{len(load.failures)} failed calls: {load.failures[:5]}\n"
        f"nginx error log:\n{proxy.error_log()[-3000:]}\nstopped container:\n{logs.stderr[-3000:]}"
    )
    assert stop_result, "docker stop did not return"
    assert not state["Running"] and state["ExitCode"] == 0, (state, logs.stderr[-3000:])
    assert not state["OOMKilled"]
    assert load.ok == load.sent, "every call made got its answer"
    assert load.ok_by_api["classify"] > 0 and load.ok_by_api["v2"] > 0, load.ok_by_api
    assert load.ok - at_exit >= AFTER_EXIT, "load went on after the replica left"
    for survivor in replicas[1:]:
        assert _health(docker, survivor.name) == "healthy"


# --- an engine and its front ends in one container -----------------------------------------


@pytest.fixture(scope="module")
def split(docker: images.Docker, image: str) -> Iterator[Container]:
    """One container running an engine and FRONTENDS front ends, /dev/shm sized for them."""
    shm = sizing.shm_bytes(FRONTENDS, sizing.default_segment())
    container = _start(docker, image, "frontends", "--shm-size", str(shm),
                       "--env", f"RESNET_SERVE_FRONTENDS={FRONTENDS}")  # fmt: skip
    try:
        _wait_healthy(docker, container)
        yield container
    finally:
        docker.run("rm", "--force", container.name, check=False)


def _processes(docker: images.Docker, name: str) -> dict[int, tuple[str, int]]:
    """{pid: (comm, parent pid)} inside the container, read from /proc as docs/deploy.md
    shows (the image has no ps); the exec's own shell and grep are in it too."""
    script = "grep -H . /proc/[0-9]*/comm; grep -H . /proc/[0-9]*/stat"
    out = docker.run("exec", name, "sh", "-c", script, check=False).stdout
    comms, parents = {}, {}
    for line in out.splitlines():
        path, _, value = line.partition(":")
        pid, kind = int(path.split("/")[2]), path.split("/")[3]
        if kind == "comm":
            comms[pid] = value
        else:  # "pid (comm) state ppid ...": the comm may hold spaces and parentheses
            parents[pid] = int(value.rsplit(")", 1)[1].split()[1])
    return {pid: (comm, parents.get(pid, -1)) for pid, comm in comms.items()}


def test_front_ends_run_as_children_of_the_engine_and_drain_on_docker_stop(
    docker: images.Docker, split: Container
) -> None:
    from resnet_serve_client import Client

    found = {pid: p for pid, p in _processes(docker, split.name).items()
             if p[0].startswith("rs-")}  # fmt: skip
    assert found.get(1, ("",))[0] == "rs-engine", f"PID 1 is the engine: {found}"
    frontends = sorted(comm for pid, (comm, _) in found.items() if pid != 1)
    assert frontends == [f"rs-frontend-{i}" for i in range(FRONTENDS)], found
    assert all(parent == 1 for pid, (_, parent) in found.items() if pid != 1), found

    with Client(split.address, timeout=60) as client:
        (result,) = client.classify(procs.jpeg(), model=MODEL, top_k=3)
    assert result.model == MODEL and len(result.classes) == 3
    # /metrics is the engine's, one view of every process
    assert procs.requests_total(split.metrics_port, "OK") == 1

    docker.run("stop", "--time", str(STOP_TIMEOUT), split.name, timeout=STOP_TIMEOUT + 60)
    state = _inspect(docker, split.name)["State"]
    logs = docker.run("logs", split.name, check=False)
    output = logs.stdout + logs.stderr
    assert not state["Running"] and state["ExitCode"] == 0, (state, output[-3000:])
    assert not state["OOMKilled"]
    # SIGTERM reached the engine (PID 1), which passed it on to each front end
    assert output.count("SIGTERM received: draining") == FRONTENDS + 1, output[-3000:]
    assert "killing it" not in output, output[-3000:]
