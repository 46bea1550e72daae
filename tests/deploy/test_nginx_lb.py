"""Three servers behind a real nginx (`grpc_pass`), on loopback.

- Calls through nginx are spread over every replica: each replica's
  resnet_serve_requests_total grows.
- One replica gets SIGTERM in the middle of steady load from the SDK (its
  retry policy, with CANCELLED added as docs/deploy.md advises behind nginx):
  no call fails, the drained
  replica exits 0, and the calls answered by the three replicas add up to
  exactly the calls made.

A small CIFAR ResNet keeps three servers light on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import serving
from tests.deploy import nginx, procs
from tests.deploy.load import Load

SERVER_FLAGS = (
    "--instances", "1", "--intra-op-threads", "1", "--decode-workers", "1",
    "--grace-period", "20",
)  # fmt: skip
SPREAD_CALLS = 30  # calls before the drain; each replica should see some
BEFORE_SIGTERM = 40  # calls of steady load completed before SIGTERM
AFTER_EXIT = 40  # calls completed after the drained replica has exited

pytestmark = pytest.mark.skipif(
    nginx.find() is None and not os.environ.get("CI"),
    reason="nginx is not installed (`make deps-system` installs it as root)",
)


@pytest.fixture(scope="module")
def small_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A repository holding only the builder fixture's smallest model (the CIFAR net)."""

    def size(config: Path) -> int:
        return json.loads(config.read_text()).get("input", {}).get("size", 1 << 30)

    config = min(model_repo.glob("*/config.json"), key=size)
    repo = tmp_path_factory.mktemp("lb") / "models"
    shutil.copytree(config.parent, repo / config.parent.name)
    return repo, config.parent.name


@pytest.fixture(scope="module")
def replicas(small_repo: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[list[serving.Server]]:  # fmt: skip
    repo, _ = small_repo
    logs = tmp_path_factory.mktemp("lb-logs")
    started: list[serving.Server] = []
    try:
        for i in range(3):
            started.append(serving.start(repo, logs / f"server-{i}.log", SERVER_FLAGS))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def proxy(replicas: list[serving.Server], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[nginx.Nginx]:  # fmt: skip
    assert nginx.find() is not None, "CI must have nginx: `make deps-system` installs it"
    server = nginx.start(tmp_path_factory.mktemp("nginx"), [r.address for r in replicas])
    yield server
    server.stop()


def _metrics_port(server: serving.Server) -> int:
    return int(server.metrics_url.rsplit(":", 1)[1].split("/")[0])


def _ok_total(server: serving.Server) -> float:
    return procs.requests_total(_metrics_port(server), "OK")


def _last_ok_total(server: serving.Server) -> float:
    """Scrape a draining server's OK count until its process exits; the last value read.

    Calls it completes after that last read are not in it: the access log of
    nginx accounts for every call (see the test)."""
    last = _ok_total(server)
    while server.process.poll() is None:
        try:
            last = _ok_total(server)
        except (urllib.error.URLError, ConnectionError):
            break
    return last


def test_calls_through_nginx_reach_every_replica(
    replicas: list[serving.Server], proxy: nginx.Nginx, small_repo: tuple[Path, str]
) -> None:
    from resnet_serve_client import Client

    _, model = small_repo
    before = [_ok_total(r) for r in replicas]
    skip = len(proxy.access_log())
    with Client(proxy.address, model=model, timeout=60) as client:
        image = procs.jpeg()
        for _ in range(SPREAD_CALLS):
            (result,) = client.classify(image, top_k=3)
            assert result.model == model
    grown = [_ok_total(r) - b for r, b in zip(replicas, before, strict=True)]
    assert all(g > 0 for g in grown), f"calls per replica: {grown}\n{proxy.error_log()}"
    assert sum(grown) == SPREAD_CALLS
    # nginx's account of who answered agrees with each replica's own counter
    answered = proxy.answered(skip)
    assert [answered[r.address] for r in replicas] == grown


def test_sigterm_under_load_fails_no_call(
    replicas: list[serving.Server], proxy: nginx.Nginx, small_repo: tuple[Path, str]
) -> None:
    _, model = small_repo
    drained, *survivors = replicas
    before = [_ok_total(r) for r in replicas]
    skip = len(proxy.access_log())

    load = Load(proxy.address, model)
    threads = load.run()
    try:
        load.wait_for(BEFORE_SIGTERM, "steady load before SIGTERM")
        assert not load.failures, load.failures[:5]
        assert drained.process.poll() is None
        drained.process.send_signal(signal.SIGTERM)
        drained_last = _last_ok_total(drained)
        exit_code = drained.process.wait(timeout=120)
        at_exit = load.ok
        load.wait_for(at_exit + AFTER_EXIT, "steady load after the drained replica exited")
    finally:
        load.finish(threads)

    not_ok = [line for line in proxy.access_log()[skip:] if not line.endswith(("|-0", "|0-"))]
    assert not load.failures, (
        f"{len(load.failures)} failed calls: {load.failures[:5]}\n"
        f"nginx, calls not answered OK:\n" + "\n".join(not_ok[:20]) +
        f"\nnginx error log:\n{proxy.error_log()[-3000:]}"
        f"\ndrained replica:\n{drained.log()[-3000:]}"
    )
    assert exit_code == 0, drained.log()[-3000:]
    assert load.ok == load.sent, "every call made got its answer"
    assert at_exit >= BEFORE_SIGTERM and load.ok - at_exit >= AFTER_EXIT, "load went on"

    # Who answered what. The survivors' own counters are read after the load; the
    # drained replica's last readable value may miss its final few calls, which
    # nginx's access log (one line per call, naming the replica that answered) has.
    grown = [drained_last - before[0],
             *(_ok_total(r) - b for r, b in zip(survivors, before[1:], strict=True))]  # fmt: skip
    answered = proxy.answered(skip)
    by_replica = [answered[r.address] for r in replicas]
    assert sum(by_replica) == load.sent, f"answered per replica {by_replica}, sent {load.sent}"
    assert by_replica[1:] == grown[1:], f"nginx {by_replica} vs the replicas' counters {grown}"
    assert 0 < grown[0] <= by_replica[0], f"nginx {by_replica} vs the replicas' counters {grown}"
    assert all(g > 0 for g in grown), f"calls per replica: {grown}"
