"""``resnet-serve serve --frontends N`` end to end: an engine process and N front ends
sharing the ports, as real subprocesses over small cifar models.

One server per module (``split``: two front ends, explicit model control) over three
copies of cifar: ``cifar`` (inference, tritonclient), ``counted`` (only the counted
traffic) and ``control`` (loaded and unloaded). Calls go over several gRPC
connections (channels with their own subchannels), opened until every front end holds
one of them, so that each front end answers some of them:

- /metrics is one view of every process: the counted calls exactly, their images, the
  session runs; every family (and series name) a one-process server of the same repo
  shows is there too; v2 ModelStatistics over gRPC and HTTP, asked of each front end,
  counts every call, with execution_count equal to compute_infer's count;
- tritonclient's answers through the front ends equal ONNX Runtime's on the model file,
  each request its own, under concurrent calls from every front end;
- explicit load and unload through one front end are what every front end answers
  once the call returns (ModelReady, inference), over gRPC and HTTP; an unloaded
  version's series leave /metrics as they do in one process;
- a call expired or cancelled in a front end while queued is dropped by the engine
  before compute (its own server: resnet18, one front end);
- the concurrent-call and HTTP body limits are the server's, over both front ends (its
  own server, a stream or a stalled body held on each front end);
- TLS with a bearer token; process names (``rs-engine``, ``rs-frontend-<i>``);
  ``RESNET_SERVE_FRONTENDS``; bad counts refused at start (exit 2).

Every server stops with exit 0, leaving no front end and no shared-memory segment.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from resnet_serve_client import TLS, ChannelOptions, Client, Unauthenticated
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from bench import serving
from server import shm
from server.config import Settings
from tests.fixtures.messages import encoded, float_tensor, random_chw
from tests.fixtures.messages import sample as scraped
from tests.reliability.repos import derive
from tests.reliability.wire import OpenStream
from tests.security.certs import PKI, make_pki
from tests.shared_data import PHOTOS

FLAGS = ["--frontends", "2", "--device", "cpu", "--model-control-mode", "explicit",
         "--load-model", "*"]
SHAPE = (3, 32, 32)
TOKEN = "frontends-test-token-71c2"
# channels with their own subchannel: each one its own TCP connection
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
MOST_CHANNELS = 64


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("frontends-repo")
    for name in ("cifar", "counted", "control"):
        derive(repo, model_repo / "cifar", name=name)
    return repo


def stop_cleanly(server: serving.Server) -> None:
    """SIGTERM; exit 0, its front ends gone and their segments with them."""
    engine = server.process.pid
    frontends = [p.pid for p in psutil.Process(engine).children()]
    code = server.stop()
    assert code == 0, f"exit {code}:\n{server.log()}"
    for pid in frontends:
        with contextlib.suppress(psutil.NoSuchProcess):
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"front end {pid} left"
    assert not list(shm.SHM_DIR.glob(f"{shm.PREFIX}{engine}.*"))


@pytest.fixture(scope="module")
def split(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.Server]:
    server = serving.start(repo, tmp_path_factory.mktemp("split") / "server.log", FLAGS)
    yield server
    stop_cleanly(server)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., serving.Server]]:
    """Servers a test starts with `serving.start`'s arguments, stopped cleanly after it."""
    servers: list[serving.Server] = []

    def start(repo: Path, flags: list[str], **options: object) -> serving.Server:
        log = tmp_path / f"server-{len(servers)}.log"
        servers.append(serving.start(repo, log, flags, **options))
        return servers[-1]

    yield start
    for server in servers:
        stop_cleanly(server)


def frontend_pids(server: serving.Server) -> list[int]:
    return [p.pid for p in psutil.Process(server.process.pid).children()]


def grpc_port(server: serving.Server) -> int:
    return int(server.address.rpartition(":")[2])


@contextlib.contextmanager
def spread(server: serving.Server, at_least: int = 8) -> Iterator[list[grpc.Channel]]:
    """At least `at_least` connected channels, as many more as it takes (up to
    `MOST_CHANNELS`) for every front end to hold one of their connections."""
    port = grpc_port(server)
    channels: list[grpc.Channel] = []
    try:
        while True:
            channel = (
                grpc.insecure_channel(server.address, OWN_CONNECTION)
                if server.credentials is None
                else grpc.secure_channel(server.address, server.credentials, OWN_CONNECTION)
            )
            channels.append(channel)
            grpc.channel_ready_future(channel).result(timeout=60)
            if len(channels) >= at_least and min(held(server, port).values()) > 0:
                break
            assert len(channels) < MOST_CHANNELS, f"connections by front end: {held(server, port)}"
        yield channels
    finally:
        for channel in channels:
            channel.close()


def held(server: serving.Server, port: int) -> dict[int, int]:
    """Front end pid -> how many of this process's connections to `port` it holds."""
    ours = {
        c.laddr.port
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }
    return {
        pid: sum(
            1
            for c in psutil.Process(pid).net_connections("tcp")
            if c.laddr.port == port and c.raddr and c.raddr.port in ours
        )
        for pid in frontend_pids(server)
    }


def infer_request(model: str, batch: np.ndarray) -> v2.ModelInferRequest:
    tensor = v2.ModelInferRequest.InferInputTensor(
        name="images", datatype="FP32", shape=list(batch.shape)
    )
    return v2.ModelInferRequest(
        model_name=model, inputs=[tensor], raw_input_contents=[batch.tobytes()]
    )


def logits(response: v2.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(output.shape)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32)


def http(
    server: serving.Server, path: str, body: object = None, *,
    token: str | None = None, context: ssl.SSLContext | None = None,
) -> tuple[int, str]:  # fmt: skip
    """One HTTP call on a new connection: (status, body)."""
    assert server.http_url is not None
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.http_url + path, data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def http_infer_body(batch: np.ndarray) -> dict[str, object]:
    inputs = [{"name": "images", "shape": list(batch.shape), "datatype": "FP32",
               "data": batch.ravel().tolist()}]  # fmt: skip
    return {"inputs": inputs}


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] of a /metrics page."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(page: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """The one sample `name` whose labels include `labels` (0 when there is none)."""
    matching = [v for have, v in page.get(name, []) if labels.items() <= have.items()]
    assert len(matching) <= 1, f"{name} {labels}: {matching}"
    return matching[0] if matching else 0.0


# the counted traffic


@dataclass(frozen=True)
class Traffic:
    ok: int  # successful calls
    images: int  # their images
    invalid: int  # calls refused INVALID_ARGUMENT


@pytest.fixture(scope="module")
def counted(split: serving.Server) -> Traffic:
    """Calls on ``counted`` from every front end (gRPC, concurrently over the spread
    channels, and HTTP), and one refused call."""
    with spread(split) as channels:
        jobs = [(channel, 1 + (i + j) % 3, 100 * i + j)
                for i, channel in enumerate(channels) for j in range(3)]  # fmt: skip

        def call(job: tuple[grpc.Channel, int, int]) -> int:
            channel, n, seed = job
            response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request("counted", images(n, seed)), timeout=120
            )
            assert logits(response).shape == (n, 10)
            return n

        with ThreadPoolExecutor(8) as pool:
            sent = list(pool.map(call, jobs))
        with pytest.raises(grpc.RpcError) as refused:
            bad = np.zeros((1, 3, 31, 32), np.float32)
            v2_grpc.GRPCInferenceServiceStub(channels[0]).ModelInfer(
                infer_request("counted", bad), timeout=120
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for seed in range(4):
        status, body = http(split, "/v2/models/counted/infer", http_infer_body(images(2, seed)))
        assert status == 200, body
        sent.append(2)
    return Traffic(ok=len(sent), images=sum(sent), invalid=1)


def test_metrics_port_shows_every_process_as_one(split: serving.Server, counted: Traffic) -> None:
    page = samples(split.metrics())
    mv = {"model": "counted", "version": "1"}
    assert value(page, "resnet_serve_requests_total", **mv, code="OK") == counted.ok
    assert value(page, "resnet_serve_requests_total", **mv, code="INVALID_ARGUMENT") == 1
    assert value(page, "resnet_serve_images_total", **mv) == counted.images
    assert value(page, "resnet_serve_request_duration_seconds_count", **mv) == counted.ok + 1
    assert value(page, "resnet_serve_batch_size_count", **mv) > 0
    assert value(page, "resnet_serve_batch_size_sum", **mv) == counted.images
    assert value(page, "resnet_serve_inflight_requests", **mv) == 0
    assert [v for _, v in page["python_info"]] == [1.0]
    assert [v for _, v in page["resnet_serve_build_info"]] == [1.0]
    assert len(page["process_start_time_seconds"]) == 1


def test_metrics_port_has_every_family_of_one_process(
    split: serving.Server, counted: Traffic, repo: Path,
    started: Callable[..., serving.Server],
) -> None:  # fmt: skip
    single = started(repo, ["--frontends", "0", "--device", "cpu"])
    with single.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request("counted", images(1, 0)), timeout=120)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(infer_request("counted", np.zeros((1, 3, 31, 32), np.float32)))
    one = {f.name: f for f in text_string_to_metric_families(single.metrics())}
    both = {f.name: f for f in text_string_to_metric_families(split.metrics())}
    assert set(one) <= set(both), f"missing with front ends: {set(one) - set(both)}"
    for name, family in one.items():
        assert both[name].type == family.type, name

    def shapes(family: Metric) -> set[tuple[str, tuple[str, ...]]]:
        return {(s.name, tuple(sorted(s.labels))) for s in family.samples}

    for name, family in one.items():
        assert shapes(family) <= shapes(both[name]), name


def test_model_statistics_through_each_frontend_count_every_call(
    split: serving.Server, counted: Traffic
) -> None:
    runs = value(samples(split.metrics()), "resnet_serve_batch_size_count", model="counted")
    assert runs > 0
    with spread(split, at_least=2) as channels:
        for channel in channels:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            answer = stub.ModelStatistics(v2.ModelStatisticsRequest(name="counted"), timeout=60)
            (stats,) = answer.model_stats
            infer = stats.inference_stats
            assert (stats.name, stats.version) == ("counted", "1")
            assert infer.success.count == counted.ok and infer.fail.count == counted.invalid
            assert stats.inference_count == counted.images
            assert stats.execution_count == infer.compute_infer.count == runs
            assert infer.compute_input.count == infer.compute_output.count == runs
            assert stats.last_inference > 0
    for _ in range(4):
        status, body = http(split, "/v2/models/counted/stats")
        assert status == 200, body
        (stats,) = json.loads(body)["model_stats"]
        infer = stats["inference_stats"]
        assert infer["success"]["count"] == counted.ok
        assert infer["fail"]["count"] == counted.invalid
        assert stats["inference_count"] == counted.images
        assert stats["execution_count"] == infer["compute_infer"]["count"] == runs


# inference


def test_tritonclient_answers_equal_onnx_runtime_under_concurrent_calls(
    split: serving.Server, repo: Path
) -> None:
    session = ort.InferenceSession(str(repo / "cifar" / "1" / "model.onnx"))

    def expected(batch: np.ndarray) -> np.ndarray:
        (out,) = session.run(None, {session.get_inputs()[0].name: batch})
        return out

    clients = [
        grpcclient.InferenceServerClient(split.address, channel_args=OWN_CONNECTION)
        for _ in range(8)
    ]
    try:

        def calls(index: int) -> None:
            client = clients[index]
            for j in range(5):
                batch = images(1 + (index + j) % 4, 1000 * index + j)
                tensor = grpcclient.InferInput("images", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                result = client.infer("cifar", [tensor], client_timeout=120)
                got = result.as_numpy("logits")
                np.testing.assert_allclose(got, expected(batch), rtol=1e-4, atol=1e-4)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(calls, range(len(clients))))
    finally:
        for client in clients:
            client.close()
    assert split.http_url is not None
    client = httpclient.InferenceServerClient(split.http_url.removeprefix("http://"))
    try:
        batch = images(3, 7)
        tensor = httpclient.InferInput("images", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=True)
        got = client.infer("cifar", [tensor]).as_numpy("logits")
        np.testing.assert_allclose(got, expected(batch), rtol=1e-4, atol=1e-4)
        assert client.is_model_ready("cifar") and client.is_server_ready()
    finally:
        client.close()


# model control


def ready_everywhere(server: serving.Server, channels: list[grpc.Channel], name: str) -> set[bool]:
    """What ModelReady says over each channel and, on new connections, over HTTP."""
    answers = {
        v2_grpc.GRPCInferenceServiceStub(c).ModelReady(v2.ModelReadyRequest(name=name)).ready
        for c in channels
    }
    for _ in range(4):
        answers.add(http(server, f"/v2/models/{name}/ready")[0] == 200)
    return answers


def infers_everywhere(channels: list[grpc.Channel], name: str) -> set[str]:
    """Each channel's outcome of one call: OK or the status code's name."""
    outcomes = set()
    for channel in channels:
        try:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(name, images(1, 0)), timeout=120
            )
        except grpc.RpcError as error:
            outcomes.add(error.code().name)
        else:
            outcomes.add("OK")
    return outcomes


def series_of(server: serving.Server, model: str, name: str) -> list[dict[str, str]]:
    return [labels for labels, _ in samples(server.metrics()).get(name, [])
            if labels.get("model") == model]  # fmt: skip


def test_load_and_unload_through_one_frontend_apply_to_every_frontend(
    split: serving.Server,
) -> None:
    with spread(split) as channels:
        stub = v2_grpc.GRPCInferenceServiceStub(channels[0])
        assert ready_everywhere(split, channels, "control") == {True}
        assert infers_everywhere(channels, "control") == {"OK"}

        status, body = http(split, "/v2/repository/models/control/unload", {})
        assert status == 200, body
        assert ready_everywhere(split, channels, "control") == {False}
        assert infers_everywhere(channels, "control") == {"UNAVAILABLE"}
        stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="control"), timeout=120)
        assert ready_everywhere(split, channels, "control") == {True}
        assert infers_everywhere(channels, "control") == {"OK"}

        last = v2_grpc.GRPCInferenceServiceStub(channels[-1])
        last.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="control"),
                                   timeout=120)  # fmt: skip
        assert ready_everywhere(split, channels, "control") == {False}
        status, body = http(split, "/v2/repository/models/control/load", {})
        assert status == 200, body
        assert ready_everywhere(split, channels, "control") == {True}
        assert infers_everywhere(channels, "control") == {"OK"}


FORGOTTEN = (
    "resnet_serve_requests_total",
    "resnet_serve_images_total",
    "resnet_serve_request_duration_seconds_count",
    "resnet_serve_batch_size_count",
    "resnet_serve_inflight_requests",
)


def test_an_unloaded_version_leaves_metrics_as_in_one_process(split: serving.Server) -> None:
    """Its series go from every process (the counts of loads and unloads stay)."""
    with split.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request("control", images(1, 0)), timeout=120)
        assert series_of(split, "control", "resnet_serve_requests_total")
        stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="control"),
                                   timeout=120)  # fmt: skip
        try:
            for name in FORGOTTEN:
                assert series_of(split, "control", name) == [], name
            assert series_of(split, "control", "resnet_serve_model_unloads_total")
        finally:
            stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="control"),
                                     timeout=120)  # fmt: skip


# security, processes, settings


def test_tls_and_bearer_token_through_frontends(
    repo: Path, started: Callable[..., serving.Server], tmp_path: Path
) -> None:
    pki: PKI = make_pki(tmp_path / "pki")
    server = started(
        repo, [*FLAGS, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)],
        credentials=grpc.ssl_channel_credentials(pki.ca.read_bytes()),
        env={"RESNET_SERVE_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    photo = PHOTOS / "chelsea.jpg"
    for _ in range(4):  # new channels, likely to more than one front end
        options = ChannelOptions(tls=TLS(root_certificates=pki.ca), token=TOKEN, retry=None)
        with Client(server.address, model="cifar", options=options, timeout=60) as sdk:
            (result,) = sdk.classify(photo)
            assert len(result.classes) == 5
    options = ChannelOptions(tls=TLS(root_certificates=pki.ca), token="wrong", retry=None)
    with (
        Client(server.address, model="cifar", options=options, timeout=60) as sdk,
        pytest.raises(Unauthenticated),
    ):
        sdk.classify(photo)
    context = ssl.create_default_context(cafile=str(pki.ca))
    body = http_infer_body(images(1, 0))
    for _ in range(4):
        assert http(server, "/v2/models/cifar/infer", body, token=TOKEN, context=context)[0] == 200
        assert http(server, "/v2/models/cifar/infer", body, context=context)[0] == 401
    assert "gRPC and HTTP ports: TLS, bearer tokens required" in server.log()
    page = samples(server.metrics())
    assert value(page, "resnet_serve_auth_failures_total") >= 5


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


HELD_BATCH = 8  # the held model's batch: it waits for this many images
HELD_DELAY_US = 600_000_000  # ... for at most 600 s
EXPIRES_AFTER = 3.0  # long enough for any busy host to queue the call first


def until_metric(server: serving.Server, name: str, value: float, **labels: str) -> None:
    """Until /metrics shows `name` (of resnet18 version 1, and `labels`) at least `value`."""
    until = time.monotonic() + 60
    while scraped(server.metrics(), name, model="resnet18", version="1", **labels) < value:
        assert time.monotonic() < until, f"{name} {labels} never {value}:\n{server.log()}"
        time.sleep(0.05)


def test_calls_expired_or_cancelled_in_a_frontend_are_dropped_by_the_engine(
    model_repo: Path, tmp_path: Path, started: Callable[..., serving.Server]
) -> None:
    """A call whose deadline passes, and one its caller cancels, while queued in the
    engine: the engine drops both before compute (the full batch queued after them runs
    alone), and the front end counts them DEADLINE_EXCEEDED and CANCELLED. resnet18 waits
    `HELD_DELAY_US` for a batch here, so each call is certainly queued when it ends,
    however quick or busy the host."""
    repo = tmp_path / "repo"
    derive(repo, model_repo / "resnet18", max_batch_size=HELD_BATCH,
           max_queue_delay_us=HELD_DELAY_US)  # fmt: skip
    server = started(repo, ["--frontends", "1", "--device", "cpu"])
    one = pb.ClassifyRequest(model="resnet18", images=[float_tensor(random_chw(99))])
    full = pb.ClassifyRequest(
        model="resnet18", images=[float_tensor(random_chw(i)) for i in range(HELD_BATCH)]
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        expiring = stub.Classify.future(one, timeout=EXPIRES_AFTER)
        until_metric(server, "resnet_serve_queue_depth", 1)  # in the engine's queue
        with pytest.raises(grpc.RpcError) as expired:
            expiring.result()
        assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        until_metric(server, "resnet_serve_requests_total", 1, code="DEADLINE_EXCEEDED")
        cancelled = stub.Classify.future(one, timeout=300)
        until_metric(server, "resnet_serve_inflight_requests", 1)  # its front end has it
        assert cancelled.cancel()
        until_metric(server, "resnet_serve_requests_total", 1, code="CANCELLED")
        assert len(stub.Classify(full, timeout=300).results) == HELD_BATCH
    after = server.metrics()
    computed = scraped(after, "resnet_serve_batch_size_sum", model="resnet18", version="1")
    assert computed == HELD_BATCH, "a dropped call was computed"
    counts = {code: scraped(after, "resnet_serve_requests_total", model="resnet18",
                            version="1", code=code)
              for code in ("DEADLINE_EXCEEDED", "CANCELLED", "OK")}  # fmt: skip
    assert counts == {"DEADLINE_EXCEEDED": 1, "CANCELLED": 1, "OK": 1}


HELD = 3.0  # seconds a lone batch waits for a fuller one in the test below


def test_a_frontend_refuses_a_call_past_the_engines_queue_before_decoding_it(
    model_repo: Path, tmp_path: Path, started: Callable[..., serving.Server]
) -> None:
    """While the engine's queue is full (a call of `max_queue_size` images held for a fuller
    batch), a call of a JPEG gets RESOURCE_EXHAUSTED from its front end with the engine's
    own message, and nothing of it is decoded; once the queue has room the same call is
    answered."""
    repo = tmp_path / "repo"
    derive(repo, model_repo / "cifar", name="held", max_batch_size=64, max_queue_size=16,
           max_queue_delay_us=int(HELD * 1e6))  # fmt: skip
    server = started(repo, ["--frontends", "1", "--device", "cpu"])
    labels = {"model": "held", "version": "1"}
    decodes = "resnet_serve_preprocess_duration_seconds_count"
    full = pb.ClassifyRequest(model="held", images=[float_tensor(random_chw(i, 32))
                                                    for i in range(16)])  # fmt: skip
    jpeg = encoded((PHOTOS / "chelsea.jpg").read_bytes())
    photo = pb.ClassifyRequest(model="held", images=[jpeg])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        held = stub.Classify.future(full, timeout=60)
        queued = time.monotonic() + 30
        while scraped(server.metrics(), "resnet_serve_queue_depth", **labels) < 16:
            assert time.monotonic() < queued and not held.done(), server.log()
            time.sleep(0.02)
        before = scraped(server.metrics(), decodes, **labels)
        started_at = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(photo, timeout=60)
        assert time.monotonic() - started_at < HELD, "refused only once the queue had room"
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (
            "model held version 1 has 16 of 16 images queued; retry later"
        )
        assert scraped(server.metrics(), decodes, **labels) == before, "a refused JPEG decoded"
        assert len(held.result().results) == 16
        assert len(stub.Classify(photo, timeout=60).results) == 1
    assert scraped(server.metrics(), decodes, **labels) == before + 1


LIMIT = 2  # --max-concurrent-calls and --http-max-body-reads of the limits' server
REFUSED_CALL = (f"the server is answering {LIMIT} calls, its limit (max_concurrent_calls "
                f"{LIMIT}); retry later or on another instance")  # fmt: skip
REFUSED_BODY = (f"the server is reading {LIMIT} request bodies, its limit (http_max_body_reads "
                f"{LIMIT}); retry later or on another instance")  # fmt: skip


def holder(server: serving.Server, port: int, client_port: int) -> int | None:
    """The front end holding our connection from `client_port` to `port`, once accepted."""
    for pid in frontend_pids(server):
        for c in psutil.Process(pid).net_connections("tcp"):
            if c.laddr.port == port and c.raddr and c.raddr.port == client_port:
                return pid
    return None


@contextlib.contextmanager
def on_each_frontend(server: serving.Server) -> Iterator[list[grpc.Channel]]:
    """A connected channel held by each front end: channels are opened until every front end
    holds one, and the others closed."""
    port = grpc_port(server)
    mine: dict[int, grpc.Channel] = {}
    others: list[grpc.Channel] = []
    try:
        while len(mine) < len(frontend_pids(server)):
            before = held(server, port)
            channel = grpc.insecure_channel(server.address, OWN_CONNECTION)
            grpc.channel_ready_future(channel).result(timeout=60)
            after = held(server, port)
            (pid,) = [pid for pid, count in after.items() if count > before.get(pid, 0)]
            if pid in mine:
                others.append(channel)
            else:
                mine[pid] = channel
            assert len(mine) + len(others) < MOST_CHANNELS, f"held: {after}"
        yield list(mine.values())
    finally:
        for channel in [*mine.values(), *others]:
            channel.close()


def stalled_bodies(server: serving.Server) -> list[socket.socket]:
    """A connection to the HTTP port on each front end, its request's body stopped after
    its first byte (opened until every front end holds one; the others closed)."""
    assert server.http_url is not None
    port = int(server.http_url.rpartition(":")[2])
    head = ("POST /v2/models/cifar/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")  # fmt: skip
    mine: dict[int, socket.socket] = {}
    for _ in range(MOST_CHANNELS):
        if len(mine) == len(frontend_pids(server)):
            return list(mine.values())
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(head.encode())
        until = time.monotonic() + 30
        while (pid := holder(server, port, sock.getsockname()[1])) is None:
            assert time.monotonic() < until, "no front end accepted the connection"
            time.sleep(0.01)
        if pid in mine:
            sock.close()
        else:
            mine[pid] = sock
    for sock in mine.values():
        sock.close()
    raise AssertionError(f"{MOST_CHANNELS} connections did not reach every front end")


def test_call_and_body_limits_hold_over_every_frontend(
    repo: Path, started: Callable[..., serving.Server]
) -> None:
    """``--max-concurrent-calls`` and ``--http-max-body-reads`` are the server's, not each
    front end's: with a stream held on each of two front ends, a call through either is
    refused RESOURCE_EXHAUSTED with the server-wide count; with a body stalled on each,
    another request is answered 503 with the same. Each answers again once they end."""
    server = started(repo, ["--frontends", "2", "--device", "cpu",
                            "--max-concurrent-calls", str(LIMIT),
                            "--http-max-body-reads", str(LIMIT)])  # fmt: skip
    pixel = pb.ClassifyRequest(model="cifar", images=[float_tensor(random_chw(0, 32))])
    with on_each_frontend(server) as channels:
        streams = [OpenStream(channel, pixel) for channel in channels]  # one call on each
        for channel in channels:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.ClassifierStub(channel).Classify(pixel, timeout=60)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == REFUSED_CALL
        assert server.health() == health_pb2.HealthCheckResponse.SERVING  # probes answer
        streams[0].close()
        until = time.monotonic() + 30
        while True:  # the closed stream is no longer counted once the server has seen it end
            try:
                pb_grpc.ClassifierStub(channels[1]).Classify(pixel, timeout=60)
                break
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert time.monotonic() < until, "still refused after a stream ended"
                time.sleep(0.05)
        streams[1].close()
    body = http_infer_body(images(1, seed=5))
    bodies = stalled_bodies(server)  # one on each front end
    try:
        until = time.monotonic() + 30
        while (answer := http(server, "/v2/models/cifar/infer", body))[0] != 503:
            assert time.monotonic() < until, f"never refused: {answer}"
            time.sleep(0.05)  # until both front ends are reading theirs
        assert json.loads(answer[1]) == {"error": REFUSED_BODY}
    finally:
        for sock in bodies:
            sock.close()
    until = time.monotonic() + 30
    while (answer := http(server, "/v2/models/cifar/infer", body))[0] != 200:
        assert time.monotonic() < until, f"still refused: {answer}"
        time.sleep(0.05)


def test_process_names(split: serving.Server) -> None:
    engine = split.process.pid
    assert comm(engine) == "rs-engine"
    assert sorted(comm(pid) for pid in frontend_pids(split)) == ["rs-frontend-0",
                                                                 "rs-frontend-1"]  # fmt: skip
    shown = subprocess.run(["ps", "-o", "comm=", "--ppid", str(engine)], capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    assert sorted(shown) == ["rs-frontend-0", "rs-frontend-1"]


def test_frontend_count_from_the_environment(
    repo: Path, started: Callable[..., serving.Server]
) -> None:
    server = started(repo, ["--device", "cpu"], env={"RESNET_SERVE_FRONTENDS": "3"})
    names = sorted(comm(pid) for pid in frontend_pids(server))
    assert names == ["rs-frontend-0", "rs-frontend-1", "rs-frontend-2"]
    assert "3 front end(s)" in server.log()
    with spread(server, at_least=3) as channels:
        assert infers_everywhere(channels, "cifar") == {"OK"}


def test_frontends_run_the_engines_code_whatever_the_working_directory_holds(
    repo: Path, started: Callable[..., serving.Server], tmp_path: Path
) -> None:
    """A ``server`` package in the directory the server starts from (another checkout, an
    application's own module) is not what the front ends import."""
    here = tmp_path / "elsewhere"
    (here / "server").mkdir(parents=True)
    (here / "server" / "__init__.py").write_text("")
    marker = tmp_path / "imported"
    (here / "server" / "frontend.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n"
    )
    server = started(repo, ["--device", "cpu", "--frontends", "2"], cwd=here)
    assert sorted(comm(pid) for pid in frontend_pids(server)) == ["rs-frontend-0",
                                                                  "rs-frontend-1"]  # fmt: skip
    with spread(server, at_least=2) as channels:
        assert infers_everywhere(channels, "cifar") == {"OK"}
    assert not marker.exists()


@pytest.mark.parametrize(("flag", "env"), [("-1", None), ("x", None), ("1.5", None),
                                           (None, "-2"), (None, "many")])  # fmt: skip
def test_bad_frontend_counts_are_refused_at_start(
    repo: Path, flag: str | None, env: str | None
) -> None:
    args = ["--repo", str(repo), "--port", "0", "--metrics-port", "0"]
    if flag is not None:
        args += ["--frontends", flag]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_SERVE_")}
    if env is not None:
        environment["RESNET_SERVE_FRONTENDS"] = env
    result = subprocess.run([*serving.SERVE, *args], capture_output=True, text=True,
                            timeout=120, env=environment)  # fmt: skip
    assert result.returncode == 2, result.stderr
    bad = flag if flag is not None else env
    (line,) = [line for line in result.stderr.splitlines() if "frontends must be" in line]
    assert f"auto or a whole number >= 0 (0: one process), not '{bad}'" in line
    assert "Traceback" not in result.stderr


def test_settings_read_frontend_counts() -> None:
    assert Settings(frontends="3").frontend_count(gpu=False) == 3
    assert Settings(frontends="0").frontend_count(gpu=True) == 0
    assert Settings(frontends="auto").frontend_count(cores=4, gpu=True) == 3
    assert Settings(frontends="auto").frontend_count(cores=4, gpu=False) == 0


@pytest.mark.parametrize(
    ("device", "offered", "driver", "expected"),
    [
        ("auto", ["CPUExecutionProvider"], True, False),
        # onnxruntime-gpu on a host without an NVIDIA GPU: the provider is offered, the
        # driver does not load, so the sessions (and auto's front-end count) stay on the CPU
        ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], False, False),
        ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], True, True),
        ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], True, False),
        ("cuda", ["CPUExecutionProvider"], False, True),
    ],
)
def test_serves_on_gpu_only_where_cuda_can_serve(
    monkeypatch: pytest.MonkeyPatch, device: str, offered: list[str], driver: bool,
    expected: bool,
) -> None:  # fmt: skip
    import onnxruntime

    from server import providers

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: offered)
    monkeypatch.setattr(providers, "cuda_driver_present", lambda: driver)
    assert providers.serves_on_gpu(Settings(device=device)) is expected
