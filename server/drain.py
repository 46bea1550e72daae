"""The drain: when the server stops taking calls, and when its clients may come back.

gRPC's server stops matching new calls the moment it is told to stop, while a
client learns that the port is going away only when the server's GOAWAY
reaches it. A call that arrives in between is cancelled by gRPC itself, and the
client sees CANCELLED, which nothing retries. Clients that keep retrying a
draining server (``wait_for_ready``) would land there sooner or later.

So every refusal while draining carries ``grpc-retry-pushback-ms`` (gRPC's own
retry waits exactly that long, and the SDK does too):

- while accepted calls are still being answered, ``PUSHBACK``: short, so
  retries keep arriving and keep being refused with UNAVAILABLE;
- once they are all answered, the port stays open for ``SETTLE`` more, longer
  than ``PUSHBACK``, so every retry pushed back before it has come and gone;
  refusals in that time push the next attempt past the close by ``AFTER_CLOSE``.

Then the port closes with nobody due to arrive. Only a brand-new call can still
meet the close, and a balancer has stopped sending those: health has said
NOT_SERVING since the drain began.
"""

from __future__ import annotations

import asyncio
import math

PUSHBACK = 0.1
SETTLE = 0.25
AFTER_CLOSE = 0.25


class Drain:
    """Shared by the handler wrapper, the streams and the lifecycle; create it inside the loop."""

    def __init__(self) -> None:
        self._started = asyncio.Event()
        self._closes_at: float | None = None

    def begin(self) -> None:
        self._started.set()

    def is_set(self) -> bool:
        """True once the drain has begun."""
        return self._started.is_set()

    async def wait(self) -> None:
        """Until the drain begins."""
        await self._started.wait()

    def pushback_ms(self) -> int:
        """How long a caller refused now should wait before trying again."""
        if self._closes_at is None:
            return round(PUSHBACK * 1000)
        until_close = max(0.0, self._closes_at - asyncio.get_running_loop().time())
        return math.ceil((until_close + AFTER_CLOSE) * 1000)

    async def settle(self, budget: float) -> None:
        """Keep the port open for ``SETTLE`` (at most ``budget``) seconds once every accepted
        call is answered, pushing refused callers past the close."""
        loop = asyncio.get_running_loop()
        self._closes_at = loop.time() + max(0.0, min(SETTLE, budget))
        await asyncio.sleep(self._closes_at - loop.time())
