"""The bad-input catalogue (`tests.reliability.catalogue`) against one real server.

For every case: the exact status code and a message naming the problem and
nothing of the inside (no traceback, path or object repr); then
the server is still SERVING, a valid request of each API succeeds, and the
server's RSS has grown less than `RSS_BOUND` since the baseline taken after
warm-up (so over the whole catalogue, too). Then a few hypothesis examples of
arbitrary bytes over the wire, under the same checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import serving
from tests.reliability import images, wire
from tests.reliability.catalogue import (
    CASES,
    IMAGE_CASES,
    MODEL,
    SERVER_FLAGS,
    UINT8_MODEL,
    Case,
    valid_requests,
)
from tests.reliability.repos import derive
from tests.reliability.wire import answer, answered, call, classify, infer, infer_images
from tests.security.leaks import leaks

SERVING = health_pb2.HealthCheckResponse.SERVING
MIB = 1 << 20
# RSS the server may gain over the whole catalogue, after warm-up (docs/security.md).
RSS_BOUND = 64 * MIB
# A status message is at most this long, whatever the request (docs/security.md).
MAX_DETAILS = 1100


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.Server]:
    repo = tmp_path_factory.mktemp("catalogue-repo")
    derive(repo, model_repo / MODEL)
    derive(repo, model_repo / UINT8_MODEL, max_batch_size=1)  # warmed at batch size 1 only
    running = serving.start(repo, tmp_path_factory.mktemp("catalogue-logs") / "server.log",
                            SERVER_FLAGS)  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def channel(server: serving.Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def rss(server: serving.Server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


@pytest.fixture(scope="module")
def baseline(server: serving.Server, channel: grpc.Channel) -> int:
    """RSS after each decoder, both APIs and the pool's threads have been used a few times."""
    for _ in range(3):
        for request in valid_requests():
            assert call(channel, request)[0] is grpc.StatusCode.OK
        for case in (c for c in CASES if c.code is grpc.StatusCode.OK):
            call(channel, case.request())
    return rss(server)


def still_healthy(server: serving.Server, channel: grpc.Channel, baseline: int) -> None:
    assert server.process.poll() is None, server.log()
    assert server.health() == SERVING
    for request in valid_requests():
        code, details, response = call(channel, request)
        assert code is grpc.StatusCode.OK, details
        assert answered(response) == 1
    grown = rss(server) - baseline
    assert grown < RSS_BOUND, f"RSS grew {grown / MIB:.1f} MiB since warm-up"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(
    server: serving.Server, channel: grpc.Channel, baseline: int, case: Case
) -> None:
    code, details, response = call(channel, case.request())
    assert code is case.code, f"{code.name}: {details[:2000]}"
    assert case.fragment in details, details[:2000]
    assert len(details) <= MAX_DETAILS, f"{len(details)} characters: {details[:200]}"
    assert leaks(details, server.log_path.parent) == [], details
    if code is grpc.StatusCode.OK:
        assert answered(response) == 1
        if case.same_as is not None:
            reference = call(channel, case.same_as())
            assert reference[0] is grpc.StatusCode.OK, reference[1]
            np.testing.assert_allclose(answer(response), answer(reference[2]), rtol=1e-5)
    still_healthy(server, channel, baseline)


# Refused from what they declare: a message of a stream gets the same answer, and the
# stream goes on with the next message.
STREAMED = [c for c in CASES if c.name in (
    "many-empty-images", "bytes-many-empty-elements", "bytes-elements-past-the-shape",
    "typed-bytes-many-empty-elements", "typed-fp32-count-vs-shape",
)]  # fmt: skip


@pytest.mark.parametrize("case", STREAMED, ids=[c.id for c in STREAMED])
def test_stream_messages_are_bounded_alike(
    server: serving.Server, channel: grpc.Channel, baseline: int, case: Case
) -> None:
    valid = {r.DESCRIPTOR.name: r for r in valid_requests()}
    if case.api == "classify":
        stub = wire.pb_grpc.ClassifierStub(channel)
        messages = [case.request(), valid["ClassifyRequest"]]
        first, second = stub.ClassifyStream(iter(messages), timeout=wire.CALL_TIMEOUT)
        assert first.error.code == case.code.value[0], first.error
        assert case.fragment in first.error.message, first.error.message
        assert second.WhichOneof("result") == "response" and answered(second.response) == 1
    else:
        stub = wire.v2_grpc.GRPCInferenceServiceStub(channel)
        messages = [case.request(), valid["ModelInferRequest"]]
        first, second = stub.ModelStreamInfer(iter(messages), timeout=wire.CALL_TIMEOUT)
        assert case.fragment in first.error_message, first.error_message
        assert second.error_message == "" and answered(second.infer_response) == 1
    still_healthy(server, channel, baseline)


def test_the_catalogue_covers_both_apis() -> None:
    ids = [c.id for c in CASES]
    assert len(CASES) >= 30 and len(set(ids)) == len(ids)
    for case in IMAGE_CASES:
        assert {f"classify:{case.name}", f"v2:{case.name}"} <= set(ids)


def test_exif_orientation_changes_the_answer(channel: grpc.Channel) -> None:
    """The EXIF row proves something only if ignoring the tag would give another answer."""
    rotated = call(channel, classify(MODEL, images.exif_rotated()[0]))[2]
    ignored = call(channel, classify(MODEL, images.exif_ignored()))[2]
    assert not np.allclose(answer(rotated), answer(ignored))


ANY_OUTCOME = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
WIRE = settings(
    max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


@WIRE
@given(data=st.binary(max_size=4096))
def test_any_bytes_as_an_image_over_the_wire(
    server: serving.Server, channel: grpc.Channel, baseline: int, data: bytes
) -> None:
    for request in (classify(MODEL, data), infer_images(MODEL, data)):
        code, details, _ = call(channel, request)
        assert code in ANY_OUTCOME, f"{code.name}: {details}"
    still_healthy(server, channel, baseline)


@WIRE
@given(
    datatype=st.sampled_from(["FP32", "UINT8", "BYTES", "INT64", "FP16"]),
    shape=st.lists(st.integers(-2, 40), max_size=5),
    raw=st.binary(max_size=2048),
)
def test_any_v2_tensor_over_the_wire(
    server: serving.Server,
    channel: grpc.Channel,
    baseline: int,
    datatype: str,
    shape: list[int],
    raw: bytes,
) -> None:
    code, details, _ = call(channel, infer(MODEL, datatype=datatype, shape=shape, raw=raw))
    assert code in ANY_OUTCOME, f"{code.name}: {details}"
    still_healthy(server, channel, baseline)


FORGED = "2026-01-01 00:00:00,000 ERROR server.forged [-] forged line"


def test_caller_strings_stay_on_one_log_line(
    server: serving.Server, channel: grpc.Channel, baseline: int
) -> None:
    """Model, tensor and datatype names with newlines and escape sequences are written
    escaped: each event stays one line, and none can be forged."""
    requests = [
        classify(f"model\n{FORGED}", images.one_pixel()),
        infer_images(f"model\r\n{FORGED}", images.one_pixel()),
        infer_images(MODEL, images.one_pixel(), name=f"input\n{FORGED}\x1b[2J"),
        infer(MODEL, datatype=f"FP32\n{FORGED}", shape=[1], raw=b""),
    ]
    for request in requests:
        code, details, _ = call(channel, request)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), details
    log = server.log()
    assert not [line for line in log.splitlines() if line.startswith(FORGED)], log
    assert "\x1b" not in log
    assert f"\\n{FORGED}" in log and f"\\r\\n{FORGED}" in log and "\\x1b[2J" in log
    still_healthy(server, channel, baseline)
