"""HTTP/2 keepalive pings, to notice a dead connection behind a load balancer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Ping the server every ``time`` seconds and drop the connection if no
    answer comes within ``timeout``. Servers refuse pings more often than
    their own minimum (gRPC's default: 5 minutes without calls), so keep
    ``permit_without_calls`` off unless the server allows it.

    gRPC bounds the wait for a ping's answer by ``grpc.http2.ping_timeout_ms``
    (default one minute), not by ``grpc.keepalive_timeout_ms`` alone: both are
    set to ``timeout``, else a peer that stops answering (a frozen process) keeps
    its connection, and its share of calls, for a minute.
    """

    time: float = 60.0
    timeout: float = 20.0
    permit_without_calls: bool = False

    def channel_args(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", int(self.time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout * 1000)),
            ("grpc.http2.ping_timeout_ms", int(self.timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
            ("grpc.http2.max_pings_without_data", 0),
        ]
