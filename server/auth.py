"""Bearer-token authentication of the gRPC port: the tokens and the check of a call's
metadata, which the one handler wrapper (`server.interceptors.Guard`) runs per call.

On when `Settings.auth_token` (env ``RESNET_SERVE_AUTH_TOKEN``) or
`Settings.auth_token_file` names at least one token. Every call must then
carry ``authorization: Bearer <token>`` with an accepted token; a missing or
wrong one is refused with `server.errors.Unauthenticated` (UNAUTHENTICATED,
through the server's one error map). Probes stay open so load balancers and
Kubernetes work without a token (`server.handlers.PROBES`): grpc.health.v1
and the v2 protocol's ServerLive, ServerReady and ModelReady.

Refusals are counted (``resnet_serve_auth_failures_total``) and logged at most once per
`LOG_INTERVAL` seconds, one WARNING line with how many were refused since the last one,
so a flood of unauthenticated calls cannot flood the log (`RateLimitedLog`, the rule the
HTTP port follows for malformed requests too).

Tokens are compared in constant time: the SHA-256 of the presented token is
compared with ``hmac.compare_digest`` against the digest of every accepted
token, all of them, so neither the content nor which token matched shows in
the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from typing import Any

from server.config import Settings
from server.metrics import Metrics

log = logging.getLogger(__name__)

_SCHEME = "bearer "
LOG_INTERVAL = 10.0  # seconds between two log lines about refused calls


class TokenError(ValueError):
    """The token settings cannot be used; the message says why, in one line."""


def load_tokens(settings: Settings) -> tuple[str, ...]:
    """The accepted tokens: `auth_token` and each line of `auth_token_file` (none: auth off)."""
    tokens: list[str] = []
    if settings.auth_token is not None:
        token = settings.auth_token.get_secret_value().strip()
        if not token:
            raise TokenError("auth_token is empty; give a token or leave it unset")
        tokens.append(token)
    if settings.auth_token_file is not None:
        path = settings.auth_token_file
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise TokenError(f"cannot read auth_token_file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise TokenError(f"auth_token_file {path} is not UTF-8 text") from None
        found = [s for line in lines if (s := line.strip()) and not s.startswith("#")]
        if not found:
            raise TokenError(f"auth_token_file {path} holds no token")
        tokens += found
    return tuple(tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class RateLimitedLog:
    """One WARNING line at most every `interval` seconds for an event a caller can repeat at
    will (a refused token, a malformed request): how many since the last line, and the
    last one's `detail`. The first event is logged at once."""

    def __init__(
        self, logger: logging.Logger, what: str, note: str = "", interval: float = LOG_INTERVAL
    ) -> None:
        self._logger, self._what, self._note, self._interval = logger, what, note, interval
        self._unlogged = 0  # events since the last log line
        self._logged_at: float | None = None

    def event(self, detail: str) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < self._interval:
            return
        since = "" if self._logged_at is None else f" in the last {now - self._logged_at:.0f} s"
        self._logger.warning(
            "%d %s%s; the last: %s (at most one such line per %g s%s)",
            self._unlogged, self._what, since, detail, self._interval, self._note,
        )  # fmt: skip
        self._unlogged, self._logged_at = 0, now


class TokenCheck:
    """Whether a call's metadata carries an accepted bearer token."""

    def __init__(
        self, tokens: Sequence[str], metrics: Metrics, log_interval: float = LOG_INTERVAL
    ) -> None:
        if not tokens:
            raise ValueError("TokenCheck needs at least one token")
        self._digests = tuple(_digest(t) for t in tokens)
        self._metrics = metrics
        self._log = RateLimitedLog(
            log, "call(s) refused UNAUTHENTICATED",
            "; resnet_serve_auth_failures_total counts them all", log_interval,
        )  # fmt: skip

    def accepts(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """None when the metadata carries an accepted token, else why not."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return "missing bearer token; send the metadata 'authorization: Bearer <token>'"
        if len(values) > 1:
            return f"{len(values)} authorization metadata entries; send one 'Bearer <token>'"
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
        if value[: len(_SCHEME)].lower() != _SCHEME:
            return "authorization metadata is not 'Bearer <token>'"
        presented = _digest(value[len(_SCHEME) :].strip())
        matched = False
        for accepted in self._digests:
            matched |= hmac.compare_digest(presented, accepted)
        return None if matched else "bearer token is not accepted"

    def refused(self, method: str, reason: str) -> None:
        """Count a refused call; log it unless a line was written within the interval."""
        self._metrics.auth_failures.inc()
        self._log.event(f"{method}, {reason}")
