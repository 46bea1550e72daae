"""Faults injected into a running server and a running build.

- A session run that never returns: its model turns NOT_SERVING once the run has gone on
  for ``--session-run-timeout`` (the version's `server.core.health.Watchdog`), while the
  other model keeps answering and the server stays SERVING; the hung caller gets its
  answer once the run ends.
- A model instance's inference thread that dies (an asynchronous ``SystemExit`` while it
  holds a batch): the batch is never answered, so the same bound turns the model
  NOT_SERVING; the other model keeps answering, and the server still stops at once (the
  close fails the dead thread's run instead of waiting for it).
- A model file corrupted on disk under ``--model-control-mode poll``: a new version whose
  ``model.onnx`` no longer matches its sha256 is refused with one log line, however many
  polls see it, and the serving version keeps answering, also when its own file is then
  corrupted in place (its session was made from the bytes checked at load).
- The disk filling during ``resnet-serve build``: one ``error:`` line naming the file
  system, exit 1, no traceback, no version directory and no staging left. A real full disk
  (a 512 KiB tmpfs, skipped where it cannot be mounted) and, everywhere, a write that
  raises ENOSPC at publish time.
- 100 explicit load/unload cycles of one model on a subprocess server: its RSS after
  cycle 100 is within 10 % of the plateau after cycle 10 (about 15 s; the figures:
  docs/benchmarks.md).

(A run past its bound with two ``max_failed_batches`` cases: tests/reliability/test_health.py;
a new version ONNX Runtime cannot open under poll: tests/server/core/test_model_control.py.)
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from bench import serving
from builder import repository as builder_repository
from builder.__main__ import main as builder_main
from builder.repository import TMP_PREFIX
from server.repository import MODEL_FILE
from server.sessions import Runner
from tests.fixtures.servers import InProcessServer
from tests.reliability import images
from tests.reliability.repos import derive
from tests.reliability.wire import call, classify

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RUN_TIMEOUT = 1.0  # --session-run-timeout of the hang and death cases
SLACK = 2.0  # seconds past the bound a busy 2-core machine may take to say so
RESNET_SERVE = str(Path(sys.executable).with_name("resnet-serve"))


def two_models(model_repo: Path, repo: Path) -> Path:
    """``cifar`` and ``victim`` (the same small graph), one instance each."""
    derive(repo, model_repo / "cifar")
    derive(repo, model_repo / "cifar", "victim")
    return repo


def seconds_until(server: Any, name: str, status: int, limit: float) -> float:
    """Seconds until `name`'s health is `status` (failing past `limit`)."""
    started = time.monotonic()
    while server.health(name) != status:
        assert time.monotonic() - started < limit, f"{name!r} never {status}:\n{server.log()}"
        time.sleep(0.02)
    return time.monotonic() - started


def others_keep_serving(server: Any) -> None:
    with server.channel() as channel:
        code, details, _ = call(channel, classify("cifar", images.one_pixel()))
    assert code is grpc.StatusCode.OK, details
    assert server.health("cifar") == SERVING and server.health() == SERVING


def send(server: Any, model: str, timeout: float) -> tuple[grpc.Channel, grpc.Future]:
    channel = server.channel()
    stub = pb_grpc.ClassifierStub(channel)
    return channel, stub.Classify.future(classify(model, images.one_pixel()), timeout=timeout)


# 1. a session run that never returns, an inference thread that dies


def test_a_session_run_that_never_returns_turns_its_model_not_serving(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    hang, release = threading.Event(), threading.Event()
    run = Runner.run_joined

    def hanging(self: Runner, batch: Any, size: int) -> Any:
        if hang.is_set() and threading.current_thread().name.startswith("infer-victim-"):
            release.wait(120)
        return run(self, batch, size)

    monkeypatch.setattr(Runner, "run_joined", hanging)
    repo = two_models(model_repo, tmp_path / "repo")
    server = inprocess_factory(repo, "--session-run-timeout", str(RUN_TIMEOUT))
    hang.set()
    channel, hung = send(server, "victim", timeout=60)
    try:
        took = seconds_until(server, "victim", NOT_SERVING, RUN_TIMEOUT + 30)
        assert took < RUN_TIMEOUT + SLACK, took
        others_keep_serving(server)
        assert not hung.done()
    finally:
        release.set()
    hung.result()  # the run went on past the bound: its caller still gets the answer
    channel.close()
    others_keep_serving(server)
    assert server.health("victim") == NOT_SERVING
    assert ("model victim version 1 UNAVAILABLE, no longer serving: a session run has taken "
            f"more than {RUN_TIMEOUT:g} s (session_run_timeout)") in server.log()  # fmt: skip


def kill_thread(name: str) -> None:
    """Raise SystemExit in the thread called `name` at its next bytecode: a thread blocked
    on its job queue dies as soon as it takes a job, outside its own try."""
    (thread,) = [t for t in threading.enumerate() if t.name == name]
    assert thread.ident is not None
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit)
    )
    assert done == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_inference_thread_that_dies_turns_its_model_not_serving(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    repo = two_models(model_repo, tmp_path / "repo")
    server = inprocess_factory(repo, "--session-run-timeout", str(RUN_TIMEOUT))
    kill_thread("infer-victim-1_0")
    channel, lost = send(server, "victim", timeout=RUN_TIMEOUT + 2)
    took = seconds_until(server, "victim", NOT_SERVING, RUN_TIMEOUT + 30)
    assert took < RUN_TIMEOUT + SLACK, took
    assert not any(t.name == "infer-victim-1_0" for t in threading.enumerate())
    others_keep_serving(server)
    with pytest.raises(grpc.RpcError) as error:
        lost.result()
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    channel.close()
    with server.channel() as channel:
        code, details, _ = call(channel, classify("victim", images.one_pixel()))
    assert code is grpc.StatusCode.UNAVAILABLE, details
    assert ("model victim version 1 UNAVAILABLE, no longer serving: a session run has taken "
            f"more than {RUN_TIMEOUT:g} s (session_run_timeout)") in server.log()  # fmt: skip
    # closing the version does not wait for the run its dead thread held
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10, server.log()


# 2. a model file corrupted on disk, under poll


def flip_a_byte(path: Path) -> None:
    """Corrupt `path` in place, as a bad disk would: same size, one byte different."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupted_model_file_is_refused_once_while_the_serving_version_answers(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    repo = tmp_path / "repo"
    model_dir = repo / "cifar"
    shutil.copytree(model_repo / "cifar", model_dir)  # real copies: the test breaks them
    server = inprocess_factory(
        repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.1"
    )
    staged = model_dir / f"{TMP_PREFIX}2"
    shutil.copytree(model_dir / "1", staged)
    flip_a_byte(staged / MODEL_FILE)  # before the rename: no poll sees it whole
    os.rename(staged, model_dir / "2")  # published whole, as the builder does

    def refusals() -> list[str]:
        return [line for line in server.log().splitlines()
                if "model cifar version 2 refused" in line]  # fmt: skip

    deadline = time.monotonic() + 60
    while not refusals():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    time.sleep(1.5)  # fifteen more polls see the same files
    (line,) = refusals()
    assert line.endswith("model.onnx does not match the sha256 in verification.json"), line
    assert server.log().count("loading model cifar version 2") == 1
    flip_a_byte(model_dir / "1" / MODEL_FILE)  # the serving version's own file, in place
    time.sleep(1.0)
    with server.channel() as channel:
        for _ in range(5):
            code, details, answer = call(channel, classify("cifar", images.one_pixel()))
            assert code is grpc.StatusCode.OK, details
            assert answer.version == "1"
    assert refusals() == [line]
    assert server.log().count("loading model cifar version") == 2  # 1 at start, 2 once
    assert server.health("cifar") == SERVING


# 3. the disk filling during a build


def assert_nothing_published(repo: Path, name: str) -> None:
    left = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) if repo.exists() else []
    assert left in ([], [name]), left  # no version, no staging, no config.json, no labels


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: smaller than one resnet20 model.onnx (1.1 MB)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_build_that_fills_the_disk_says_so_and_publishes_nothing(small_disk: Path) -> None:
    repo = small_disk / "repo"
    done = subprocess.run(
        [RESNET_SERVE, "build", "resnet20", "--repo", str(repo), "--name", "full"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: No space left on device on the file system mounted at {small_disk}, which "
        f"holds the model repository {repo}; nothing was published: free space there and "
        "build again"
    )
    assert_nothing_published(repo, "full")


def test_a_build_whose_publish_hits_a_full_disk_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(builder_repository, "_write_atomically", full)  # labels.txt, config.json
    repo = tmp_path / "repo"
    assert builder_main(["build", "resnet20", "--repo", str(repo), "--name", "late"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: No space left on device on the file system mounted at ")
    assert f"holds the model repository {repo}; nothing was published" in error
    assert_nothing_published(repo, "late")


# 4. load and unload, 100 times


def control(server: serving.Server, name: str, action: str) -> None:
    request = urllib.request.Request(
        f"{server.http_url}/v2/repository/models/{name}/{action}", data=b"{}", method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as answer:
        assert answer.status == 200, answer.read()


def rss(server: serving.Server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


def test_a_hundred_load_unload_cycles_return_to_the_first_plateau(
    model_repo: Path, tmp_path: Path, server_factory: Callable[..., serving.Server]
) -> None:
    repo = two_models(model_repo, tmp_path / "repo")
    server = server_factory(repo, "--model-control-mode", "explicit", "--load-model", "*")
    figures: dict[int, int] = {}
    for cycle in range(1, 101):
        control(server, "victim", "unload")
        control(server, "victim", "load")
        if cycle in (10, 100):
            time.sleep(0.5)
            figures[cycle] = rss(server)
    others_keep_serving(server)
    growth = figures[100] / figures[10] - 1
    (tmp_path / "rss.json").write_text(json.dumps(figures))
    print(f"RSS after cycle 10: {figures[10] / 2**20:.1f} MiB, after cycle 100: "
          f"{figures[100] / 2**20:.1f} MiB ({growth:+.1%})")  # fmt: skip
    assert growth <= 0.10, figures
