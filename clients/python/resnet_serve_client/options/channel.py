"""Everything about the connection, and the channels built from it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import grpc
import grpc.aio

from .keepalive import Keepalive
from .retry import Retry
from .tls import TLS

DEFAULT_PORT = 8001

# Services whose calls get the retry policy. Health is left out on purpose:
# a health check should report what it sees, not retry until it looks better.
RETRIED_SERVICES = ("resnet_serve.v1.Classifier", "inference.GRPCInferenceService")


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """How to connect to a resnet-serve server.

    tls: ``TLS(...)`` for an encrypted (optionally mutual-TLS) connection;
    ``None`` for plaintext. token: a bearer token sent as
    ``authorization: Bearer <token>`` with every call, as static call metadata
    (over TLS and plaintext alike; no metadata plugin, whose callbacks can deadlock
    grpcio's shutdown). retry: the retry policy, ``None``
    for none. keepalive: HTTP/2 keepalive pings, ``None`` for gRPC's default
    (off). load_balancing: gRPC policy across the target's resolved
    addresses; with ``dns:///host:port`` and ``round_robin`` every address
    gets calls. wait_for_ready: calls wait, up to their deadline, for a
    server that is unreachable, draining or still loading its models (they
    go on retrying UNAVAILABLE past gRPC's 5 attempts, see ``patience``)
    instead of failing with UNAVAILABLE; turn it on to ride out restarts.
    reconnect_backoff: first and largest delay (seconds) between
    reconnection attempts. metadata: extra headers for every call.
    channel_args: raw gRPC channel arguments, applied last.
    """

    tls: TLS | None = None
    token: str | None = None
    retry: Retry | None = field(default_factory=Retry)
    keepalive: Keepalive | None = None
    load_balancing: str = "round_robin"
    wait_for_ready: bool = False
    reconnect_backoff: tuple[float, float] = (0.25, 5.0)
    metadata: tuple[tuple[str, str], ...] = ()
    channel_args: tuple[tuple[str, Any], ...] = ()

    def service_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"loadBalancingConfig": [{self.load_balancing: {}}]}
        if self.retry is not None:
            config["methodConfig"] = [
                {
                    "name": [{"service": service} for service in RETRIED_SERVICES],
                    "retryPolicy": self.retry.policy(),
                }
            ]
        return config

    def channel_arguments(self) -> list[tuple[str, Any]]:
        first, largest = self.reconnect_backoff
        args: list[tuple[str, Any]] = [
            ("grpc.service_config", json.dumps(self.service_config())),
            ("grpc.enable_retries", int(self.retry is not None)),
            ("grpc.primary_user_agent", f"resnet-serve-client/{version('resnet-serve-client')}"),
            ("grpc.initial_reconnect_backoff_ms", int(first * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(largest * 1000)),
        ]
        if self.keepalive is not None:
            args += self.keepalive.channel_args()
        if self.tls is not None and self.tls.server_name:
            args.append(("grpc.ssl_target_name_override", self.tls.server_name))
        overridden = {name for name, _ in self.channel_args}
        return [arg for arg in args if arg[0] not in overridden] + list(self.channel_args)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Headers for every call, the bearer token first."""
        if self.token:
            return (("authorization", f"Bearer {self.token}"), *self.metadata)
        return self.metadata

    def credentials(self) -> grpc.ChannelCredentials | None:
        return None if self.tls is None else self.tls.credentials()


def normalize_target(target: str) -> str:
    """``host`` → ``host:8001``; targets with a port or a resolver scheme pass through."""
    if ":" in target.rsplit("]", 1)[-1] or "://" in target or target.startswith("unix:"):
        return target
    return f"{target}:{DEFAULT_PORT}"


def sync_channel(target: str, options: ChannelOptions) -> grpc.Channel:
    target, args, credentials = _parts(target, options)
    if credentials is None:
        return grpc.insecure_channel(target, options=args)
    return grpc.secure_channel(target, credentials, options=args)


def aio_channel(target: str, options: ChannelOptions) -> grpc.aio.Channel:
    target, args, credentials = _parts(target, options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=args)
    return grpc.aio.secure_channel(target, credentials, options=args)


def _parts(
    target: str, options: ChannelOptions
) -> tuple[str, list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    return normalize_target(target), options.channel_arguments(), options.credentials()
