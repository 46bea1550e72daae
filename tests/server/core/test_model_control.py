"""Model control without restarts: repository polling, explicit load and unload, version
policies, on real servers under load (``--model-control-mode``, `server.core.manager`).

Every server here runs the small CIFAR model (``cifar``, resnet20) from the builder's
session repository; new versions are its version 1 copied and renamed into place, as the
builder publishes them. Traffic is a few clients calling ``Classify`` without a version
in a loop; every call must succeed while versions come and go.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2
from resnet_serve_client.proto.inference import grpc_service_pb2 as v2
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from bench import serving
from builder.__main__ import main as builder_main
from server.repository import CONFIG_FILE, MODEL_FILE, ModelConfig, sha256_file
from tests.fixtures.messages import CHELSEA, encoded, sample
from tests.fixtures.servers import InProcessServer
from tests.server.core.test_manager import add_model, rewrite_verification

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
POLL = ("--model-control-mode", "poll", "--repository-poll-secs", "0.1")
EXPLICIT = ("--model-control-mode", "explicit", "--load-model", "*")  # every model at start
TOKEN = "lifecycle-token"
WITH_TOKEN = (("authorization", f"Bearer {TOKEN}"),)
WAIT = 180.0  # seconds: generous, for a busy machine; nothing here asserts a duration


def cifar_repo(model_repo: Path, tmp_path: Path, **config: object) -> Path:
    """A repository holding only ``cifar`` version 1 (and `config` fields set)."""
    repo = tmp_path / "repo"
    model_dir = add_model(repo, model_repo / "cifar", "cifar")
    if config:
        write_config(model_dir, **config)
    return repo


def write_config(model_dir: Path, **fields: object) -> None:
    """Replace config.json atomically, as an operator's tooling would."""
    config = ModelConfig.load(model_dir).model_dump(mode="json") | fields
    staged = model_dir / ".tmp-config.json"
    staged.write_text(json.dumps(config, indent=2))
    os.replace(staged, model_dir / CONFIG_FILE)


def publish(
    model_dir: Path, version: int, prepare: Callable[[Path], object] = lambda _: None
) -> Path:
    """A copy of version 1 as `version`, changed by `prepare` while staged, then renamed into
    place (never half there): the builder's way. Real copies, not links to the session's
    repository, so `prepare` may break the files."""
    staged = model_dir / f".tmp-{version}"
    shutil.copytree(model_dir / "1", staged)
    prepare(staged)
    target = model_dir / str(version)
    os.rename(staged, target)
    return target


def corrupt(version_dir: Path) -> None:
    """A model.onnx that ONNX Runtime cannot open, recorded as verified (so only loading
    it finds out)."""
    (version_dir / MODEL_FILE).write_bytes(b"not an onnx graph")
    rewrite_verification(version_dir, sha256=sha256_file(version_dir / MODEL_FILE))


def withdraw(version_dir: Path) -> None:
    """Take a version away at once (rename out of the version names), then delete it."""
    hidden = version_dir.with_name(f".removed-{version_dir.name}")
    os.rename(version_dir, hidden)
    shutil.rmtree(hidden)


async def eventually(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + WAIT
    while loop.time() < until:
        result = condition()
        if await result if isinstance(result, Awaitable) else result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


class Traffic:
    """`clients` callers of ``Classify`` for `model` (no version) until the block ends; the
    version of every answer in order, and every failure."""

    def __init__(self, address: str, model: str = "cifar", clients: int = 3) -> None:
        self._address, self._model, self._clients = address, model, clients
        self.versions: list[str] = []
        self.failures: list[grpc.aio.AioRpcError] = []
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Traffic:
        self._channel = grpc.aio.insecure_channel(self._address)
        stub = pb_grpc.ClassifierStub(self._channel)
        request = pb.ClassifyRequest(model=self._model, images=[encoded(CHELSEA)])

        async def client() -> None:
            while not self._stop.is_set():
                try:
                    response = await stub.Classify(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    self.failures.append(exc)
                else:
                    self.versions.append(response.version)

        self._tasks = [asyncio.ensure_future(client()) for _ in range(self._clients)]
        await eventually(lambda: len(self.versions) >= 3, "traffic answered")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._channel.close()

    async def answered_by(self, version: str, count: int = 6) -> bool:
        """The next `count` answers all come from `version`."""
        mark = len(self.versions)
        for _ in range(1000):
            if len(self.versions) >= mark + count or self.failures:
                break
            await asyncio.sleep(0.05)
        return set(self.versions[mark : mark + count]) == {version}

    def check(self) -> None:
        assert not self.failures, [f"{f.code().name}: {f.details()}" for f in self.failures]


def versions_listed(server: InProcessServer | serving.Server, model: str = "cifar") -> dict:
    """{version: (state name, reason)} as ListModels shows them."""
    with server.channel() as channel:
        stub = pb_grpc.ClassifierStub(channel)
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    if model not in listed:
        return {}
    return {
        v.version: (pb.VersionInfo.State.Name(v.state), v.reason) for v in listed[model].versions
    }


def metric(server: InProcessServer | serving.Server, name: str, **labels: str) -> float:
    return sample(server.metrics(), name, **labels)


async def test_poll_serves_a_version_added_under_load_and_drains_one_removed_under_load(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    repo = cifar_repo(model_repo, tmp_path)
    server = inprocess_factory(repo, *POLL)
    async with Traffic(server.address) as traffic:
        publish(repo / "cifar", 2)
        await eventually(lambda: traffic.answered_by("2"), "version 2 takes the traffic")
        assert versions_listed(server) == {"1": ("READY", ""), "2": ("READY", "")}

        withdraw(repo / "cifar" / "2")
        await eventually(lambda: traffic.answered_by("1"), "version 1 takes the traffic back")
        await eventually(lambda: "2" not in versions_listed(server), "version 2 unlisted")
        assert server.health("cifar") == SERVING
    traffic.check()
    assert {"1", "2"} <= set(traffic.versions)

    log = server.log()
    assert "loading model cifar version 2: found by the repository poll" in log
    assert "model cifar version 2 READY in" in log
    assert "model cifar version 2 unloaded in" in log
    assert "s: removed from the repository" in log
    text = server.metrics()
    assert sample(text, "resnet_serve_model_loads_total", model="cifar", version="2",
                  outcome="ok") == 1  # fmt: skip
    assert sample(text, "resnet_serve_model_unloads_total", model="cifar", version="2",
                  reason="removed") == 1  # fmt: skip
    # the unloaded version's series are gone; version 1's stay
    assert 'version="2"' not in "\n".join(
        line for line in text.splitlines() if not line.startswith("resnet_serve_model_")
    )
    assert sample(text, "resnet_serve_requests_total", model="cifar", version="1", code="OK") > 0


async def test_poll_refuses_broken_versions_with_a_log_line_while_the_old_one_serves(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    repo = cifar_repo(model_repo, tmp_path)
    server = inprocess_factory(repo, *POLL)
    async with Traffic(server.address) as traffic:
        publish(repo / "cifar", 2, lambda staged: rewrite_verification(staged, passed=False))
        broken = publish(repo / "cifar", 3, corrupt)
        await eventually(
            lambda: (
                "model cifar version 3 refused" in server.log()
                and "model cifar version 2 refused" in server.log()
            ),
            "both refused",
        )
        listed = versions_listed(server)
        assert listed["1"] == ("READY", "")
        assert listed["2"][0] == "UNAVAILABLE"
        assert "verification.json does not say passed: true" in listed["2"][1]
        assert listed["3"] == ("UNAVAILABLE", "could not be loaded; the server log says why")
        await eventually(lambda: traffic.answered_by("1"), "version 1 still serves")

        # refused versions are not tried again at each poll, only once their files change
        polls = server.log().count("loading model cifar version 3")
        await asyncio.sleep(1.0)  # ten polls
        assert server.log().count("loading model cifar version 3") == polls == 1
        withdraw(broken)
        publish(repo / "cifar", 3)
        await eventually(lambda: traffic.answered_by("3"), "the fixed version 3 serves")
    traffic.check()
    assert "model cifar version 2 refused: verification.json does not say passed: true" in (
        server.log()
    )
    assert metric(server, "resnet_serve_model_loads_total", model="cifar", version="3",
                  outcome="failed") == 1  # fmt: skip
    assert server.health("cifar") == SERVING


async def test_version_policy_chooses_what_serves_and_a_change_applies_under_load(
    model_repo: Path,
    tmp_path: Path,
    inprocess_factory: Callable[..., InProcessServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = cifar_repo(model_repo, tmp_path, version_policy={"latest": {"num_versions": 1}})
    publish(repo / "cifar", 2)
    assert builder_main(["models", "--repo", str(repo)]) == 0
    header, _, one, two = capsys.readouterr().out.splitlines()
    assert header.split()[-1] == "serves"
    assert one.endswith("no: not in the version policy (latest 1)")
    assert two.endswith("yes")

    server = inprocess_factory(repo, *POLL)
    assert versions_listed(server) == {
        "1": ("UNAVAILABLE", "not in the version policy (latest 1)"),
        "2": ("READY", ""),
    }
    with server.channel() as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(pb.ClassifyRequest(model="cifar", version="1",
                                             images=[encoded(CHELSEA)]), timeout=30)  # fmt: skip
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "not in the version policy (latest 1)" in error.value.details()

    async with Traffic(server.address) as traffic:
        await eventually(lambda: traffic.answered_by("2"), "version 2 serves")
        write_config(repo / "cifar", version_policy={"specific": {"versions": [1]}})
        await eventually(lambda: traffic.answered_by("1"), "version 1 takes over")
        await eventually(
            lambda: (
                versions_listed(server).get("2")
                == ("UNAVAILABLE", "not in the version policy (specific 1)")
            ),
            "version 2 retired",
        )
    traffic.check()
    with server.channel() as channel:
        info = pb_grpc.ClassifierStub(channel).GetModel(
            pb.GetModelRequest(name="cifar"), timeout=30
        )
    assert [(v.version, v.state) for v in info.versions] == [("1", pb.VersionInfo.READY)]
    assert metric(server, "resnet_serve_model_unloads_total", model="cifar", version="2",
                  reason="policy") == 1  # fmt: skip
    assert "model cifar version 2 unloaded in" in server.log()


def test_explicit_load_and_unload_need_the_token(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    repo = cifar_repo(model_repo, tmp_path)
    server = inprocess_factory(repo, *EXPLICIT, "--auth-token", TOKEN)
    headers = dict(WITH_TOKEN)
    with server.channel() as channel, grpcclient.InferenceServerClient(server.address) as triton:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        classifier = pb_grpc.ClassifierStub(channel)
        metadata = stub.ServerMetadata(v2.ServerMetadataRequest(), metadata=WITH_TOKEN, timeout=30)
        assert "model_repository" in metadata.extensions

        for call, request in [
            (stub.RepositoryModelUnload, v2.RepositoryModelUnloadRequest(model_name="cifar")),
            (stub.RepositoryModelLoad, v2.RepositoryModelLoadRequest(model_name="cifar")),
        ]:
            with pytest.raises(grpc.RpcError) as error:
                call(request, timeout=30)
            assert error.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert server.health("cifar") == SERVING

        triton.unload_model("cifar", headers=headers)  # Triton's own client, with the token
        assert server.health("cifar") == NOT_SERVING
        assert versions_listed_v2(stub) == [("cifar", "1", "UNAVAILABLE", "unloaded by request")]
        request = pb.ClassifyRequest(model="cifar", images=[encoded(CHELSEA)])
        with pytest.raises(grpc.RpcError) as error:
            classifier.Classify(request, metadata=WITH_TOKEN, timeout=30)
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE

        publish(repo / "cifar", 2)  # not loaded until asked: nothing polls
        triton.load_model("cifar", headers=headers)
        assert server.health("cifar") == SERVING
        response = classifier.Classify(request, metadata=WITH_TOKEN, timeout=60)
        assert response.version == "2"
        assert [s for _, _, s, _ in versions_listed_v2(stub)] == ["READY", "READY"]

        publish(repo / "cifar", 3, corrupt)
        with pytest.raises(grpc.RpcError) as error:
            stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="cifar"),
                                     metadata=WITH_TOKEN, timeout=120)  # fmt: skip
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.details() == (
            "model cifar: version 3 not loaded: could not be loaded; the server log says why; "
            "serving: 1, 2"
        )
        assert classifier.Classify(request, metadata=WITH_TOKEN, timeout=60).version == "2"

        for name, code in [
            ("nothing_here", grpc.StatusCode.NOT_FOUND),
            ("../repo/cifar", grpc.StatusCode.INVALID_ARGUMENT),
            ("", grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as error:
                stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name=name),
                                         metadata=WITH_TOKEN, timeout=30)  # fmt: skip
            assert error.value.code() is code, name
        (repo / "broken").mkdir()
        (repo / "broken" / CONFIG_FILE).write_text('{"name": "broken"}')
        with pytest.raises(grpc.RpcError) as error:
            stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="broken"),
                                     metadata=WITH_TOKEN, timeout=30)  # fmt: skip
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.details() == (
            "model broken: config.json or the labels it names cannot be used; the server log "
            "says why; serving: nothing"
        )
        with pytest.raises(InferenceServerException, match="parameters \\['config'\\]"):
            triton.load_model("cifar", headers=headers, config='{"backend": "python"}')
    text = server.metrics()
    assert sample(text, "resnet_serve_model_unloads_total", model="cifar", version="1",
                  reason="request") == 1  # fmt: skip
    assert sample(text, "resnet_serve_model_loads_total", model="cifar", version="1",
                  outcome="ok") == 2  # fmt: skip
    log = server.log()
    assert "model cifar version 1 unloaded in" in log and "s: unloaded by request" in log
    assert "loading model cifar version 2: load requested" in log


def versions_listed_v2(stub: v2_grpc.GRPCInferenceServiceStub) -> list[tuple[str, ...]]:
    index = stub.RepositoryIndex(v2.RepositoryIndexRequest(), metadata=WITH_TOKEN, timeout=30)
    return [(m.name, m.version, m.state, m.reason) for m in index.models]


async def test_a_load_during_a_poll_is_safe(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    repo = cifar_repo(model_repo, tmp_path)
    server = inprocess_factory(
        repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.05"
    )
    async with (
        Traffic(server.address) as traffic,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        load = v2.RepositoryModelLoadRequest(model_name="cifar")
        publish(repo / "cifar", 2)
        await asyncio.gather(*(stub.RepositoryModelLoad(load, timeout=120) for _ in range(8)))
        assert versions_listed(server)["2"] == ("READY", "")  # loaded when the first call returns
        await eventually(lambda: traffic.answered_by("2"), "version 2 serves")

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="cifar"))
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "the model control mode is poll" in error.value.details()
    traffic.check()
    assert server.log().count("loading model cifar version 2") == 1
    assert metric(server, "resnet_serve_model_loads_total", model="cifar", version="2",
                  outcome="ok") == 1  # fmt: skip


async def test_poll_adds_and_removes_whole_models_and_sigterm_stops_the_poller(
    model_repo: Path, tmp_path: Path, server_factory: Callable[..., serving.Server]
) -> None:
    repo = cifar_repo(model_repo, tmp_path)
    server = server_factory(repo, *POLL)
    staged = repo / ".tmp-digits"
    add_model(staged.parent, model_repo / "cifar", staged.name)
    write_config(staged, name="digits")
    os.rename(staged, repo / "digits")
    await eventually(lambda: _healthy(server, "digits"), "digits SERVING")
    async with Traffic(server.address, "digits") as traffic:
        await eventually(lambda: traffic.answered_by("1"), "digits answers")
    traffic.check()

    shutil.rmtree(repo / "digits")
    await eventually(lambda: not _healthy(server, "digits"), "digits NOT_SERVING")
    await eventually(lambda: not versions_listed(server, "digits"), "digits unlisted")
    assert server.health("cifar") == SERVING and server.serving()
    assert server.stop(signal.SIGTERM) == 0
    log = server.log()
    assert "loading model digits version 1: found by the repository poll" in log
    assert "model digits: removed from the repository" in log
    assert "polling" in log and "exiting" in log


def _healthy(server: serving.Server, name: str) -> bool:
    try:
        return server.health(name) == SERVING
    except grpc.RpcError:  # NOT_FOUND before the model's health is set
        return False


def test_http_load_and_unload(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer]
) -> None:
    """The same model control on the HTTP port, through tritonclient.http; off (501) in the
    default mode."""
    repo = cifar_repo(model_repo, tmp_path)
    server = inprocess_factory(repo, *EXPLICIT)
    assert server.http_url is not None
    triton = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        triton.unload_model("cifar")
        assert not triton.is_model_ready("cifar") and server.health("cifar") == NOT_SERVING
        publish(repo / "cifar", 2)
        triton.load_model("cifar")
        assert triton.is_model_ready("cifar", "2")
        with pytest.raises(InferenceServerException) as error:
            triton.load_model("cifar", config='{"max_batch_size": 1}')
        assert error.value.status() == "400" and "not supported" in error.value.message()
    finally:
        triton.close()
    fixed = inprocess_factory(cifar_repo(model_repo, tmp_path / "none"))
    assert fixed.http_url is not None
    triton = httpclient.InferenceServerClient(fixed.http_url.removeprefix("http://"))
    try:
        with pytest.raises(InferenceServerException) as error:
            triton.unload_model("cifar")
        assert error.value.status() == "501"
    finally:
        triton.close()
