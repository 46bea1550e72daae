"""The control channel between the engine and one front end: messages over a Unix socket
pair, batched per wake-up.

A message is a tuple whose first element names it (`server.engine` lists them). `send`
only queues; the queue goes out as one frame (a 4-byte length, then a pickled list) from
a callback scheduled once per event-loop iteration, so the requests a front end
receives in one wake-up reach the engine in one write, and the answers of one batch go
back to each front end in one write. A channel opened with ``hold`` (the front end's)
keeps its queue while its loop has other callbacks ready to run, up to ``hold`` seconds
after the first message, and writes it once the loop has nothing else to do: a busy front
end sends a frame per few requests, and each frame costs the engine one wake-up; an idle
one sends at once. The other side gets each frame's messages in one call of
`on_messages`. Pickle is safe here: the socket pair is created by the engine before it
starts the front end, so only the two processes hold its ends.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

_LENGTH = struct.Struct("<I")

Handler = Callable[[list[tuple[Any, ...]]], None]


class Channel(asyncio.Protocol):
    def __init__(
        self, on_messages: Handler, on_closed: Callable[[], None], hold: float = 0.0
    ) -> None:
        self._on_messages = on_messages
        self._on_closed = on_closed
        self._hold = hold
        self._since = 0.0  # loop.time() of the first message queued
        self._transport: asyncio.Transport | None = None
        self._pending: list[tuple[Any, ...]] = []
        self._buffer = bytearray()
        self.closed = False

    @classmethod
    async def open(
        cls,
        sock: socket.socket,
        on_messages: Handler,
        on_closed: Callable[[], None],
        hold: float = 0.0,
    ) -> Channel:
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(
            lambda: cls(on_messages, on_closed, hold), sock=sock
        )
        return channel

    def send(self, message: tuple[Any, ...]) -> None:
        if self.closed:
            return
        if not self._pending:
            loop = asyncio.get_running_loop()
            if self._hold:
                self._since = loop.time()
                loop.call_soon(self._flush_when_idle, loop)
            else:
                loop.call_soon(self._flush)
        self._pending.append(message)

    def _flush_when_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """`_flush` once no other callback is ready (asyncio's loop keeps them in ``_ready``;
        a loop without it flushes at once) or `hold` has passed since the first message."""
        if getattr(loop, "_ready", None) and loop.time() - self._since < self._hold:
            loop.call_soon(self._flush_when_idle, loop)
            return
        self._flush()

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self._transport is not None and not self.closed:
            data = pickle.dumps(pending, protocol=5)
            self._transport.write(_LENGTH.pack(len(data)) + data)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + 4 + length
            if len(buffer) < end:
                break
            messages = pickle.loads(buffer[start + 4 : end])
            start = end
            self._on_messages(messages)
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_closed()
