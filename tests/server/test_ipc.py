"""`server.ipc.Channel` over a real Unix socket pair, both ends in one event loop.

Messages sent in one loop iteration go out as one frame and arrive in one
`on_messages` call, in order; frames far larger than one read (5 MB) arrive whole;
frames sent back to back arrive as separate calls; each side hears `on_closed`
when the other closes, and sending after that is a no-op. A channel with ``hold`` keeps
its messages while its loop has other callbacks ready, up to ``hold`` seconds, and sends
them at once when the loop has nothing else to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from server import ipc

Frames = list[list[tuple[Any, ...]]]


class End:
    """One side of the pair: the frames it received, and whether it heard the close."""

    def __init__(self) -> None:
        self.frames: Frames = []
        self.closed = asyncio.Event()
        self.arrived = asyncio.Event()

    def on_messages(self, messages: list[tuple[Any, ...]]) -> None:
        self.frames.append(messages)
        self.arrived.set()

    def on_closed(self) -> None:
        self.closed.set()

    async def until(self, frames: int) -> Frames:
        while len(self.frames) < frames:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 60)
        return self.frames


@contextlib.asynccontextmanager
async def pair(hold: float = 0.0) -> AsyncIterator[tuple[ipc.Channel, End, ipc.Channel, End]]:
    """Two channels over one socket pair (``a`` with `hold`), both closed at the end."""
    a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a_end, b_end = End(), End()
    a = await ipc.Channel.open(a_sock, a_end.on_messages, a_end.on_closed, hold)
    b = await ipc.Channel.open(b_sock, b_end.on_messages, b_end.on_closed)
    try:
        yield a, a_end, b, b_end
    finally:
        a.close()
        b.close()


async def test_one_iteration_is_one_frame_in_order() -> None:
    async with pair() as (a, _, _, b_end):
        for i in range(100):
            a.send(("infer", i, "cifar", "1"))
        frames = await b_end.until(1)
        assert frames == [[("infer", i, "cifar", "1") for i in range(100)]]
        a.send(("cancel", 1))
        await asyncio.sleep(0)  # a later iteration: a frame of its own
        a.send(("cancel", 2))
        a.send(("cancel", 3))
        frames = await b_end.until(3)
        assert frames[1:] == [[("cancel", 1)], [("cancel", 2), ("cancel", 3)]]


async def test_both_directions_at_once() -> None:
    async with pair() as (a, a_end, b, b_end):
        a.send(("hello", "segment", 4096))
        b.send(("settings", {"port": 1}))
        assert await b_end.until(1) == [[("hello", "segment", 4096)]]
        assert await a_end.until(1) == [[("settings", {"port": 1})]]


async def test_large_frames_split_across_reads_arrive_whole() -> None:
    big = np.random.default_rng(0).standard_normal(5_000_000 // 4).astype(np.float32)
    async with pair() as (a, _, _, b_end):
        a.send(("done", 1, big))
        a.send(("done", 2, big[:10]))
        await asyncio.sleep(0)
        a.send(("done", 3, bytes(range(256)) * 20_000))
        frames = await b_end.until(2)
        assert len(frames) == 2
        (one, two), (three,) = frames
        assert one[:2] == ("done", 1) and np.array_equal(one[2], big)
        assert two[:2] == ("done", 2) and np.array_equal(two[2], big[:10])
        assert three == ("done", 3, bytes(range(256)) * 20_000)


async def test_on_closed_when_the_peer_closes_and_no_send_after() -> None:
    async with pair() as (a, a_end, b, b_end):
        a.send(("answer", 7, None, None))
        a.close()  # what was queued still goes out first
        assert await b_end.until(1) == [[("answer", 7, None, None)]]
        await asyncio.wait_for(b_end.closed.wait(), 60)
        assert b.closed
        b.send(("collect", 1))  # dropped: the peer is gone
        await asyncio.sleep(0)
        await asyncio.wait_for(a_end.closed.wait(), 60)
        assert a_end.frames == []


def send_in_turns(channel: ipc.Channel, turns: int, busy: float = 0.0) -> None:
    """One message per loop iteration for `turns` iterations, the loop never idle between
    them (each turn schedules the next), each turn `busy` seconds long."""
    loop = asyncio.get_running_loop()

    def turn(i: int) -> None:
        time.sleep(busy)
        channel.send(("infer", i))
        if i + 1 < turns:
            loop.call_soon(turn, i + 1)

    loop.call_soon(turn, 0)


async def test_a_busy_loop_sends_what_it_queued_in_one_frame_once_idle() -> None:
    async with pair(hold=60) as (a, _, _, b_end):
        send_in_turns(a, 5)
        frames = await b_end.until(1)
        assert frames == [[("infer", i) for i in range(5)]]


async def test_without_hold_each_iteration_is_its_own_frame() -> None:
    async with pair() as (a, _, _, b_end):
        send_in_turns(a, 5)
        frames = await b_end.until(5)
        assert frames == [[("infer", i)] for i in range(5)]


async def test_hold_bounds_how_long_a_busy_loop_keeps_a_message() -> None:
    async with pair(hold=0.01) as (a, _, _, b_end):
        send_in_turns(a, 12, busy=0.004)  # 48 ms of busy turns: frames of about 3
        await b_end.until(1)
        while sum(len(frame) for frame in b_end.frames) < 12:
            await b_end.until(len(b_end.frames) + 1)
        assert [m for frame in b_end.frames for m in frame] == [("infer", i) for i in range(12)]
        assert len(b_end.frames) >= 3
        assert max(len(frame) for frame in b_end.frames) <= 4


async def test_an_idle_loop_sends_at_once_whatever_the_hold() -> None:
    async with pair(hold=60) as (a, _, _, b_end):
        a.send(("cancel", 1))
        frames = await asyncio.wait_for(b_end.until(1), 5)
        assert frames == [[("cancel", 1)]]
