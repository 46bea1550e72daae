"""Distributed tracing end to end: ``resnet-serve serve`` as a real process exporting over
OTLP/gRPC to a receiver on loopback (`bench.otlp.Receiver`, the collector's TraceService).

Calls carry a client's W3C ``traceparent`` (gRPC metadata, HTTP header); what arrives:

- a SERVER span per call, in the client's trace, its parent the client's span, named and
  given attributes by the RPC and HTTP semantic conventions; ``preprocess``, ``queue`` and
  ``encode`` children under it;
- a ``batch`` span per session run, the root of its own trace, linked to the server span
  of every request it served, with the batch's size, requests, instance and provider;
- with ``--frontends 2``: the server span and its ``preprocess``/``encode`` from a front
  end, the ``queue`` and ``batch`` spans from the engine, pointing at that server span;
- the endpoint by ``--trace-endpoint`` and by ``OTEL_EXPORTER_OTLP_ENDPOINT``; the other
  ``OTEL_*`` variables honoured (the sampler: ``parentbased_traceidratio`` at 0 records a
  sampled caller's trace and nothing of an unsampled one; the service name);
- JSON log lines written inside a call carry its trace id;
- off (no endpoint): nothing is exported and the process never turns tracing on.

Every wait is bounded (`Receiver.wait`); spans are exported every 50 ms
(``OTEL_BSP_SCHEDULE_DELAY``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from bench import serving
from bench.otlp import INTERNAL, SERVER, Received, Receiver
from server import config, tracing
from server.repository import ModelConfig
from tests.reliability.repos import derive

MODEL = "cifar"
INPUT = "images"
SHAPE = (1, 3, 32, 32)
GRPC_INFER = "inference.GRPCInferenceService/ModelInfer"
BATCH_TOGETHER = 4  # concurrent calls that fill one batch (max_batch_size)
# every variable of the standard that turns tracing on or steers it
OTEL_VARIABLES = [name for name in os.environ if name.startswith("OTEL_")]
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
WAIT = 30.0


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cifar batching up to 4 requests, waiting up to 1 s for them: four concurrent calls
    share one session run."""
    repo = tmp_path_factory.mktemp("tracing-repo")
    derive(repo, model_repo / MODEL, max_batch_size=BATCH_TOGETHER, max_queue_delay_us=1_000_000)
    assert ModelConfig.load(repo / MODEL).input.name == INPUT
    return repo


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as receiving:
        yield receiving


@contextlib.contextmanager
def server(
    repo: Path, log: Path, flags: list[str], env: dict[str, str]
) -> Iterator[serving.Server]:
    """A server whose environment holds no OTEL_* variable but those of `env`."""
    with pytest.MonkeyPatch.context() as patch:
        for name in OTEL_VARIABLES:
            patch.delenv(name, raising=False)
        started = serving.start(repo, log, ["--device", "cpu", *flags], env=env)
    try:
        yield started
    finally:
        code = started.stop()
        assert code == 0, f"exit {code}:\n{started.log()}"


@pytest.fixture(scope="module")
def by_flag(
    repo: Path, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[serving.Server]:
    """One process, the endpoint by --trace-endpoint, JSON logs."""
    log = tmp_path_factory.mktemp("by-flag") / "server.log"
    flags = ["--trace-endpoint", receiver.endpoint, "--log-format", "json"]
    with server(repo, log, flags, FAST_EXPORT) as started:
        yield started


@pytest.fixture(scope="module")
def split(
    repo: Path, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[serving.Server]:
    """``--frontends 2``, the endpoint and the service name by the standard variables."""
    log = tmp_path_factory.mktemp("split") / "server.log"
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_SERVICE_NAME": "classifier-split"}  # fmt: skip
    with server(repo, log, ["--frontends", "2"], env) as started:
        yield started


# the client's side of a trace


class Caller:
    """A client span: its ``traceparent`` and the ids to look for."""

    def __init__(self, sampled: bool = True) -> None:
        self.trace_id = secrets.token_hex(16)
        self.span_id = secrets.token_hex(8)
        self.traceparent = f"00-{self.trace_id}-{self.span_id}-{'01' if sampled else '00'}"

    def spans(self, received: list[Received]) -> list[Received]:
        return [r for r in received if r.trace_id == self.trace_id]

    def server_span(self, received: list[Received]) -> Received | None:
        return next((r for r in self.spans(received) if r.span.kind == SERVER), None)


def pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


def grpc_infer(
    address: str, caller: Caller | None, model: str = MODEL, options: list[tuple[str, int]] = ()
) -> None:
    request = v2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = INPUT, "FP32"
    tensor.shape.extend(SHAPE)
    request.raw_input_contents.append(pixels().tobytes())
    metadata = [("traceparent", caller.traceparent)] if caller else []
    with grpc.insecure_channel(address, options=list(options)) as channel:
        v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=30)


def http_infer(url: str, caller: Caller) -> dict[str, object]:
    body = {"inputs": [{"name": INPUT, "shape": list(SHAPE),
                        "datatype": "FP32", "data": pixels().ravel().tolist()}]}  # fmt: skip
    request = urllib.request.Request(
        f"{url}/v2/models/{MODEL}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "traceparent": caller.traceparent},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def batch_of(server_span: Received, received: list[Received]) -> Received | None:
    """The ``batch`` span linked to `server_span`."""
    key = (server_span.trace_id, server_span.span_id)
    return next((r for r in received if r.span.name == tracing.BATCH and key in r.links), None)


def call_traced(caller: Caller) -> Callable[[list[Received]], bool]:
    """A `Receiver.wait` condition: the caller's server span, its three children and the
    batch span linked to it have all arrived."""

    def found(received: list[Received]) -> bool:
        span = caller.server_span(received)
        if span is None:
            return False
        names = {r.span.name for r in caller.spans(received)}
        return {tracing.PREPROCESS, tracing.QUEUE, tracing.ENCODE} <= names and (
            batch_of(span, received) is not None
        )

    return found


def check_call(caller: Caller, received: list[Received]) -> tuple[Received, Received]:
    """The shape of one traced call; its server span and its batch span."""
    span = caller.server_span(received)
    assert span is not None
    assert span.parent_span_id == caller.span_id  # the client's span is the parent
    assert span.span.end_time_unix_nano >= span.span.start_time_unix_nano > 0
    children = [r for r in caller.spans(received) if r.span.kind != SERVER]
    assert sorted(r.span.name for r in children) == sorted(
        [tracing.PREPROCESS, tracing.QUEUE, tracing.ENCODE]
    )
    for child in children:
        assert child.span.kind == INTERNAL
        assert child.parent_span_id == span.span_id, child.span.name
        assert span.span.start_time_unix_nano <= child.span.start_time_unix_nano
        assert child.span.end_time_unix_nano <= span.span.end_time_unix_nano
    batch = batch_of(span, received)
    assert batch is not None
    assert batch.trace_id != caller.trace_id and batch.parent_span_id == ""  # a root
    attributes = batch.attributes
    assert attributes["resnet_serve.model"] == MODEL
    assert attributes["resnet_serve.batch.size"] >= 1
    assert attributes["resnet_serve.batch.requests"] == len(batch.links)
    assert attributes["resnet_serve.provider"] == "CPUExecutionProvider"
    assert attributes["resnet_serve.instance"]
    return span, batch


# one process, the endpoint by flag


def test_a_grpc_call_is_a_server_span_in_the_callers_trace(
    by_flag: serving.Server, receiver: Receiver
) -> None:
    caller = Caller()
    grpc_infer(by_flag.address, caller)
    received = receiver.wait(call_traced(caller), WAIT)
    span, batch = check_call(caller, received)
    assert span.span.name == GRPC_INFER
    attributes = span.attributes
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert attributes["rpc.method"] == "ModelInfer"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["network.peer.address"] == "127.0.0.1"
    assert span.resource["service.name"] == tracing.DEFAULT_SERVICE_NAME
    assert span.process == batch.process == "server"


def test_an_http_call_is_a_server_span_in_the_callers_trace(
    by_flag: serving.Server, receiver: Receiver
) -> None:
    caller = Caller()
    answer = http_infer(by_flag.http_url or "", caller)
    assert answer["model_name"] == MODEL
    received = receiver.wait(call_traced(caller), WAIT)
    span, _ = check_call(caller, received)
    attributes = span.attributes
    assert span.span.name == f"POST {attributes['http.route']}"
    assert attributes["http.route"].endswith("/infer")
    assert attributes["http.request.method"] == "POST"
    assert attributes["url.path"] == f"/v2/models/{MODEL}/infer"
    assert attributes["http.response.status_code"] == 200


def test_a_batch_span_links_every_request_it_served(
    by_flag: serving.Server, receiver: Receiver
) -> None:
    callers = [Caller() for _ in range(BATCH_TOGETHER)]
    with ThreadPoolExecutor(BATCH_TOGETHER) as pool:
        list(pool.map(lambda c: grpc_infer(by_flag.address, c), callers))
    received = receiver.wait(lambda r: all(call_traced(c)(r) for c in callers), WAIT)
    batches = {check_call(c, received)[1].span_id: c for c in callers}
    shared = [b for b in received if b.span_id in batches and len(b.links) > 1]
    assert shared, "no session run served two of the concurrent calls"
    servers = {(s.trace_id, s.span_id) for c in callers if (s := c.server_span(received))}
    for batch in shared:
        assert set(batch.links) <= servers
        assert batch.attributes["resnet_serve.batch.requests"] == len(batch.links)
        assert batch.attributes["resnet_serve.batch.size"] == len(batch.links)  # one image each


def test_json_log_lines_of_a_call_carry_its_trace_id(
    by_flag: serving.Server, receiver: Receiver
) -> None:
    caller = Caller()
    with pytest.raises(grpc.RpcError) as refused:
        grpc_infer(by_flag.address, caller, model="no-such-model")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    receiver.wait(lambda r: caller.server_span(r) is not None, WAIT)
    lines = [json.loads(line) for line in by_flag.log().splitlines() if line.startswith("{")]
    logged = [line for line in lines if "NOT_FOUND" in line["message"]]
    assert logged and all(line.get("trace_id") == caller.trace_id for line in logged), logged
    assert any("tracing on" in line["message"] for line in lines)
    assert caller.server_span(receiver.spans()).attributes["rpc.grpc.status_code"] == 5


# front ends: the endpoint and the service name by the standard variables


def test_front_end_spans_and_the_engines_queue_and_batch_spans_join(
    split: serving.Server, receiver: Receiver
) -> None:
    callers = [Caller() for _ in range(2 * BATCH_TOGETHER)]
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection each: both front ends

    def call(indexed: tuple[int, Caller]) -> None:
        index, caller = indexed
        if index % 2:
            http_infer(split.http_url or "", caller)
            return
        grpc_infer(split.address, caller, options=options)

    with ThreadPoolExecutor(len(callers)) as pool:
        list(pool.map(call, enumerate(callers)))
    received = receiver.wait(lambda r: all(call_traced(c)(r) for c in callers), WAIT)
    frontends = set()
    for caller in callers:
        span, batch = check_call(caller, received)
        assert span.process.startswith("frontend-"), span.process
        frontends.add(span.process)
        assert span.resource["service.name"] == "classifier-split"
        by_name = {r.span.name: r for r in caller.spans(received)}
        assert by_name[tracing.PREPROCESS].process == span.process
        assert by_name[tracing.ENCODE].process == span.process
        assert by_name[tracing.QUEUE].process == "engine"  # carried to the engine
        assert batch.process == "engine"
    assert frontends <= {"frontend-0", "frontend-1"}


# the sampler from OTEL_TRACES_SAMPLER


def test_ratio_zero_records_a_sampled_callers_trace_and_nothing_of_an_unsampled_one(
    repo: Path, receiver: Receiver, tmp_path: Path
) -> None:
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0",
           "OTEL_SERVICE_NAME": "ratio-zero"}  # fmt: skip
    unsampled, sampled = Caller(sampled=False), Caller()
    with server(repo, tmp_path / "server.log", [], env) as started:
        grpc_infer(started.address, unsampled)
        http_infer(started.http_url or "", unsampled)
        grpc_infer(started.address, None)  # a root: the ratio decides, 0
        grpc_infer(started.address, sampled)  # exported after the others' spans would be
        receiver.wait(call_traced(sampled), WAIT)
    # the server has stopped: whatever it still held is exported
    ours = [r for r in receiver.spans() if r.resource["service.name"] == "ratio-zero"]
    check_call(sampled, ours)
    assert unsampled.spans(ours) == []
    # the sampled call's four spans and its batch's, nothing of the others
    server_span = sampled.server_span(ours)
    assert server_span is not None
    assert [r.trace_id for r in ours].count(sampled.trace_id) == 4
    (batch,) = [r for r in ours if r.trace_id != sampled.trace_id]
    assert batch.span.name == tracing.BATCH
    assert batch.links == [(sampled.trace_id, server_span.span_id)]


# off


@pytest.mark.parametrize(
    "env", [{}, {"OTEL_SDK_DISABLED": "true"}], ids=["no-endpoint", "sdk-disabled"]
)
def test_off_exports_nothing_and_never_turns_on(
    repo: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """No endpoint at all; or one, with the standard OTEL_SDK_DISABLED=true."""
    with Receiver() as receiving:
        if env:
            env = {**env, **FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiving.endpoint}
        with server(repo, tmp_path / "server.log", ["--log-format", "json"], env) as started:
            caller = Caller()
            grpc_infer(started.address, caller)
            http_infer(started.http_url or "", caller)
            with pytest.raises(grpc.RpcError):
                grpc_infer(started.address, caller, model="no-such-model")
            log = started.log()
        assert receiving.exports == 0  # nothing, even as the server exited
    assert "tracing on" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any("NOT_FOUND" in line["message"] for line in lines)
    assert not any("trace_id" in line for line in lines)


def test_off_unless_an_endpoint_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert tracing.endpoint_configured("") == ""
    assert tracing.configure("", "server") is False and tracing.ENABLED is False
    assert tracing.step("anything") is tracing.step("other")  # one shared no-op
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.endpoint_configured("") == "http://collector:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")
    assert tracing.endpoint_configured("") == "http://traces:4317"  # the signal's own wins
    assert tracing.endpoint_configured("http://flag:4317") == "http://flag:4317"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.endpoint_configured("") == ""
    assert tracing.ENABLED is False


def test_the_endpoint_setting_by_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    assert config.from_arguments(parser.parse_args([])).trace_endpoint == ""
    monkeypatch.setenv("RESNET_SERVE_TRACE_ENDPOINT", "http://env:4317")
    assert config.from_arguments(parser.parse_args([])).trace_endpoint == "http://env:4317"
    flagged = parser.parse_args(["--trace-endpoint", "http://flag:4317"])
    assert config.from_arguments(flagged).trace_endpoint == "http://flag:4317"  # the flag wins
