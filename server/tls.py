"""TLS and mutual TLS for the gRPC and HTTP ports, from `Settings.tls_cert`, `tls_key`,
`tls_client_ca`.

With ``tls_cert`` and ``tls_key`` both ports speak TLS only; adding
``tls_client_ca`` makes it require a client certificate that chains to that
CA (mutual TLS). The files are read once at start-up; a file that cannot be
read or holds no PEM block stops the server with one line naming it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from server.config import Settings


class TLSError(ValueError):
    """A TLS file cannot be used; the message names it."""


def _pem(setting: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read {setting} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TLSError(f"{setting} {path} holds no PEM block")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``; None when TLS is off."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    chain = _pem("tls_cert", settings.tls_cert)
    key = _pem("tls_key", settings.tls_key)
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _pem("tls_client_ca", settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def describe(settings: Settings) -> str:
    """How the port is protected, for the start-up log line."""
    if settings.tls_cert is None:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca is not None else "TLS"


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The same certificate, key and client CA for the HTTP port; None when TLS is off."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    _pem("tls_cert", settings.tls_cert)
    _pem("tls_key", settings.tls_key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca is not None:
            _pem("tls_client_ca", settings.tls_client_ca)
            context.load_verify_locations(cafile=settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise TLSError(f"cannot use tls_cert/tls_key/tls_client_ca: {exc}") from None
    return context
