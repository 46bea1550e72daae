"""Retries: gRPC's service-config policy for unary calls, resumption for broken streams.

Failures are scripted on the fake; the retry across a real server restart is in
test_real_server.py.
"""

from __future__ import annotations

import grpc
import pytest
import resnet_serve_client as rsc

from tests.fixtures.fake_classifier import MODEL, FakeServer

FAST = rsc.Retry(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "server is draining")
OVERLOADED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")


def test_unavailable_is_retried_until_it_succeeds(fake: FakeServer) -> None:
    fake.script.failures.extend([UNAVAILABLE, UNAVAILABLE, UNAVAILABLE])
    with rsc.Client(fake.target, model=MODEL, options=rsc.ChannelOptions(retry=FAST)) as client:
        [result] = client.classify(b"abcd")
    assert result.top.index == 4
    assert fake.script.calls == 4


async def test_async_client_retries_too(fake: FakeServer) -> None:
    fake.script.failures.extend([UNAVAILABLE, OVERLOADED])
    options = rsc.ChannelOptions(retry=FAST)
    async with rsc.AsyncClient(fake.target, model=MODEL, options=options) as client:
        [result] = await client.classify(b"ab")
    assert result.top.index == 2
    assert fake.script.calls == 3


def test_overload_retries_are_bounded(fake: FakeServer) -> None:
    fake.script.failures.extend([OVERLOADED] * 10)
    options = rsc.ChannelOptions(retry=FAST)
    with (
        rsc.Client(fake.target, model=MODEL, options=options) as client,
        pytest.raises(rsc.Overloaded) as caught,
    ):
        client.classify(b"x")
    assert caught.value.message == "queue is full"
    assert fake.script.calls == FAST.max_attempts


def test_overload_is_not_retried_when_turned_off(fake: FakeServer) -> None:
    fake.script.failures.extend([OVERLOADED] * 3)
    retry = rsc.Retry(initial_backoff=0.01, on_overload=False)
    options = rsc.ChannelOptions(retry=retry)
    with (
        rsc.Client(fake.target, model=MODEL, options=options) as client,
        pytest.raises(rsc.Overloaded),
    ):
        client.classify(b"x")
    assert fake.script.calls == 1


def test_other_errors_are_not_retried(fake: FakeServer) -> None:
    fake.script.failures.append((grpc.StatusCode.INVALID_ARGUMENT, "top_k is 0"))
    with rsc.Client(fake.target, model=MODEL) as client, pytest.raises(rsc.InvalidArgument):
        client.classify(b"x")
    assert fake.script.calls == 1


def test_no_retry_policy_means_one_attempt(fake: FakeServer) -> None:
    fake.script.failures.append(UNAVAILABLE)
    options = rsc.ChannelOptions(retry=None)
    with (
        rsc.Client(fake.target, model=MODEL, options=options) as client,
        pytest.raises(rsc.Unavailable),
    ):
        client.classify(b"x")
    assert fake.script.calls == 1


def test_waiting_for_ready_retries_unavailable_past_grpcs_attempts(fake: FakeServer) -> None:
    fake.script.failures.extend([UNAVAILABLE] * 12)
    options = rsc.ChannelOptions(retry=FAST, wait_for_ready=True)
    with rsc.Client(fake.target, model=MODEL, options=options) as client:
        assert client.classify(b"abc")[0].top.index == 3
    assert fake.script.calls == 13


async def test_async_waiting_for_ready_too(fake: FakeServer) -> None:
    fake.script.failures.extend([UNAVAILABLE] * 12)
    options = rsc.ChannelOptions(retry=FAST, wait_for_ready=True)
    async with rsc.AsyncClient(fake.target, model=MODEL, options=options) as client:
        assert [r.top.index async for r in client.classify_many([b"ab"], stream=False)] == [2]
    assert fake.script.calls == 13


def test_waiting_for_ready_ends_at_the_deadline(fake: FakeServer) -> None:
    fake.script.failures.extend([UNAVAILABLE] * 10_000)
    options = rsc.ChannelOptions(retry=FAST, wait_for_ready=True)
    with (
        rsc.Client(fake.target, model=MODEL, options=options, timeout=0.3) as client,
        pytest.raises((rsc.Unavailable, rsc.DeadlineExceeded)),
    ):
        client.classify(b"x")
    assert fake.script.failures


# Backoff far beyond the deadline: the call can only succeed in time by following the
# server's pushback, in gRPC's own attempts and in the SDK's after them.
SLOW = rsc.Retry(max_attempts=5, initial_backoff=60.0, max_backoff=60.0)
PUSHED_BACK = (*UNAVAILABLE, (("grpc-retry-pushback-ms", "1"),))


def test_pushback_replaces_the_backoff(fake: FakeServer) -> None:
    fake.script.failures.extend([PUSHED_BACK] * 12)
    options = rsc.ChannelOptions(retry=SLOW, wait_for_ready=True)
    with rsc.Client(fake.target, model=MODEL, options=options, timeout=10) as client:
        assert client.classify(b"abc")[0].top.index == 3
    assert fake.script.calls == 13


async def test_async_pushback_too(fake: FakeServer) -> None:
    fake.script.failures.extend([PUSHED_BACK] * 12)
    options = rsc.ChannelOptions(retry=SLOW, wait_for_ready=True)
    async with rsc.AsyncClient(fake.target, model=MODEL, options=options, timeout=10) as client:
        assert (await client.classify(b"ab"))[0].top.index == 2
    assert fake.script.calls == 13


def test_errors_carry_the_pushback(fake: FakeServer) -> None:
    fake.script.failures.append((*UNAVAILABLE, (("grpc-retry-pushback-ms", "250"),)))
    fake.script.failures.append(UNAVAILABLE)
    options = rsc.ChannelOptions(retry=None)
    with rsc.Client(fake.target, model=MODEL, options=options) as client:
        with pytest.raises(rsc.Unavailable) as pushed:
            client.classify(b"x")
        with pytest.raises(rsc.Unavailable) as plain:
            client.classify(b"x")
    assert pushed.value.pushback == 0.25
    assert plain.value.pushback is None


@pytest.mark.parametrize("concurrency", [1, 4])
def test_broken_stream_is_reopened_and_unanswered_requests_resent(
    fake: FakeServer, concurrency: int
) -> None:
    fake.script.break_stream_after = 5
    images = [b"x" * n for n in range(1, 21)]
    with rsc.Client(fake.target, model=MODEL, options=rsc.ChannelOptions(retry=FAST)) as client:
        results = list(client.classify_many(images, concurrency=concurrency, stream=True))
    assert [r.top.index for r in results] == list(range(1, 21))
    assert fake.script.stream_calls == 2


async def test_async_broken_stream_is_reopened(fake: FakeServer) -> None:
    fake.script.break_stream_after = 3
    images = [b"x" * n for n in range(1, 11)]
    async with rsc.AsyncClient(fake.target, model=MODEL,
                               options=rsc.ChannelOptions(retry=FAST)) as client:
        results = [r async for r in client.classify_many(images, concurrency=4)]
    assert [r.top.index for r in results] == list(range(1, 11))
    assert fake.script.stream_calls == 2


def test_broken_stream_without_retries_fails_only_the_request_it_broke_on(
    fake: FakeServer,
) -> None:
    fake.script.break_stream_after = 2
    images = [b"x" * n for n in range(1, 6)]
    with rsc.Client(fake.target, model=MODEL, options=rsc.ChannelOptions(retry=None)) as client:
        results = list(client.classify_many(images, concurrency=3, stream=True,
                                            return_exceptions=True))
    assert isinstance(results[2], rsc.Unavailable)
    assert [r.top.index for r in results if not isinstance(r, Exception)] == [1, 2, 4, 5]


def test_retry_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="gRPC's limit"):
        rsc.Retry(max_attempts=6)
    with pytest.raises(ValueError):
        rsc.Retry(initial_backoff=2, max_backoff=1)
    policy = rsc.Retry().policy()
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert policy["initialBackoff"] == "0.1s"
