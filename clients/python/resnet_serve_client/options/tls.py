"""TLS settings, including a client certificate for mutual TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

PemSource = str | Path | bytes
"""PEM data as bytes, or the path of a PEM file."""


def _read(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


@dataclass(frozen=True, slots=True)
class TLS:
    """Use TLS to reach the server.

    root_certificates: the CA that signed the server's certificate; ``None``
    uses the system's trust store. certificate_chain and private_key: the
    client's own certificate, for servers that require mutual TLS (give both
    or neither). server_name: the name to check the server's certificate
    against when it differs from the target's host (e.g. an IP target).
    """

    root_certificates: PemSource | None = None
    certificate_chain: PemSource | None = None
    private_key: PemSource | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.private_key),
            certificate_chain=_read(self.certificate_chain),
        )
