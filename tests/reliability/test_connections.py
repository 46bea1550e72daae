"""Connections and concurrency: calls beyond the server's limits, streams per connection.

A server with ``--max-concurrent-calls 2``: two open ClassifyStreams hold both calls;
a third call is answered RESOURCE_EXHAUSTED at once, naming the limit, while health
probes still answer SERVING; once a stream ends, calls succeed again. With
``--max-streams-per-connection 1`` a second call on a connection whose one stream is
open waits on the client's side, while a call on another connection is answered.

Keepalive, with short settings: a client that pings every second keeps an idle
stream open for seconds and the stream answers again (with gRPC's default policy,
shown as the control, the server answers GOAWAY too_many_pings and the stream
dies); a stream that outlives ``--max-connection-age`` plus its grace is ended with
UNAVAILABLE, and the client's next call, on a new connection, succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from tests.fixtures.servers import InProcessServer
from tests.reliability import images
from tests.reliability.repos import derive
from tests.reliability.wire import CALL_TIMEOUT, OpenStream, classify

SERVING = health_pb2.HealthCheckResponse.SERVING
MODEL = "cifar"


def _connection(server: InProcessServer, *options: tuple[str, int]) -> grpc.Channel:
    """A channel with a connection of its own (channels to one address otherwise share)."""
    return grpc.insecure_channel(
        server.address, options=[("grpc.use_local_subchannel_pool", 1), *options]
    )


@pytest.fixture(scope="module")
def cifar_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cifar-only")
    derive(repo, model_repo / MODEL)
    return repo


# A client pinging every second, also while no data flows (as the SDK does every 60 s).
PINGING = (("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 5000),
           ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0))
IDLE = 6.0  # seconds the stream stays quiet: six pings, the default policy allows two


def _idle_stream_survives(server: InProcessServer) -> None:
    with _connection(server, *PINGING) as channel:
        stream = OpenStream(channel, classify(MODEL, images.one_pixel()))
        time.sleep(IDLE)
        stream.send()
        stream.close()


@pytest.mark.parametrize(("interval", "survives"), [("0.5", True), ("300", False)],
                         ids=["policy", "grpc-default-control"])  # fmt: skip
def test_an_idle_stream_with_client_pings(
    inprocess_factory: Callable[..., InProcessServer],
    cifar_repo: Path,
    interval: str,
    survives: bool,
) -> None:
    server = inprocess_factory(cifar_repo, "--min-ping-interval", interval)
    if survives:
        _idle_stream_survives(server)
    else:
        with pytest.raises(grpc.RpcError) as ended:
            _idle_stream_survives(server)
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value
    assert server.health() == SERVING


def test_old_connections_are_closed_and_clients_reconnect(
    inprocess_factory: Callable[..., InProcessServer], cifar_repo: Path
) -> None:
    server = inprocess_factory(cifar_repo, "--max-connection-age", "1",
                               "--max-connection-age-grace", "1")  # fmt: skip
    with _connection(server) as channel:
        stream = OpenStream(channel, classify(MODEL, images.one_pixel()))
        time.sleep(5)  # past age + grace (each +-10% jitter)
        with pytest.raises(grpc.RpcError) as ended:
            stream.send()
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE, ended.value
        request = classify(MODEL, images.one_pixel())
        assert pb_grpc.ClassifierStub(channel).Classify(request, timeout=CALL_TIMEOUT).results


def _eventually_ok(call: Callable[[], object], seconds: float = 30.0) -> None:
    """The stream's end reaches the server's count just after the client sees it."""
    until = time.monotonic() + seconds
    while True:
        try:
            call()
            return
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > until:
                raise
            time.sleep(0.05)


def test_calls_beyond_the_limit_are_refused_and_probes_still_answer(
    inprocess_factory: Callable[..., InProcessServer],
    model_repo: Path,
) -> None:
    server = inprocess_factory(model_repo, "--max-concurrent-calls", "2")
    with server.channel() as channel:
        stub = pb_grpc.ClassifierStub(channel)
        pixel = classify(MODEL, images.one_pixel())
        first, second = OpenStream(channel, pixel), OpenStream(channel, pixel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(classify(MODEL, images.one_pixel()), timeout=CALL_TIMEOUT)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (
            "the server is answering 2 calls, its limit (max_concurrent_calls 2); "
            "retry later or on another instance"
        )
        assert server.health() == SERVING and server.health(MODEL) == SERVING
        second.close()
        _eventually_ok(lambda: stub.Classify(classify(MODEL, images.one_pixel()),
                                             timeout=CALL_TIMEOUT))  # fmt: skip
        first.close()
    assert "max_concurrent_calls 2" in server.log()


def test_streams_per_connection_wait_on_the_client(
    inprocess_factory: Callable[..., InProcessServer],
    model_repo: Path,
) -> None:
    server = inprocess_factory(model_repo, "--max-streams-per-connection", "1")
    request = classify(MODEL, images.one_pixel())
    with _connection(server) as busy, _connection(server) as other:
        stream = OpenStream(busy, classify(MODEL, images.one_pixel()))
        with pytest.raises(grpc.RpcError) as waited:  # no stream free on this connection
            pb_grpc.ClassifierStub(busy).Classify(request, timeout=2)
        assert waited.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert pb_grpc.ClassifierStub(other).Classify(request, timeout=CALL_TIMEOUT).results
        stream.close()
        assert pb_grpc.ClassifierStub(busy).Classify(request, timeout=CALL_TIMEOUT).results


def test_calls_without_a_deadline_get_the_default_timeout(
    inprocess_factory: Callable[..., InProcessServer], cifar_repo: Path
) -> None:
    """A call that carries no deadline gets the server's (`--default-timeout`, here 1 µs:
    past before the first image is decoded); each message of a stream without one too.
    Calls with a deadline of their own are not affected."""
    server = inprocess_factory(cifar_repo, "--default-timeout", "0.000001")
    request = classify(MODEL, images.one_pixel())
    message = ("no answer within 1e-06 s, the server's timeout for calls without a deadline "
               "(default_timeout); set a deadline on the call")  # fmt: skip
    with server.channel() as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as timed_out:
            stub.Classify(request)
        assert timed_out.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert timed_out.value.details() == message
        (answer,) = stub.ClassifyStream(iter([request]))
        assert answer.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert answer.error.message == message
        assert stub.Classify(request, timeout=CALL_TIMEOUT).results
    assert server.health() == SERVING
    assert 'code="DEADLINE_EXCEEDED"' in server.metrics()
