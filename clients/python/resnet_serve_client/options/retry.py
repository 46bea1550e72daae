"""Retries through gRPC's own service-config retry policy."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import grpc

# gRPC clamps maxAttempts above this to it.
MAX_ATTEMPTS_LIMIT = 5


@dataclass(frozen=True, slots=True)
class Retry:
    """Retry a failed call with exponential backoff and full jitter.

    gRPC waits ``random(0, min(initial_backoff * multiplier**(n-1), max_backoff))``
    seconds before attempt n+1, for at most ``max_attempts`` attempts in all
    (gRPC's limit is 5). UNAVAILABLE (server down, restarting or draining) is
    always retried; RESOURCE_EXHAUSTED (queue full) only if ``on_overload``,
    and within the same bounded number of attempts, so a saturated server sees
    a few spaced-out retries, never a storm. ``also_on`` adds codes (for
    example CANCELLED behind a proxy that passes on a replica's shutdown;
    Classify is idempotent). A server may send ``grpc-retry-pushback-ms`` to
    delay or stop them.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    on_overload: bool = True
    also_on: tuple[grpc.StatusCode, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(
                f"max_attempts must be 2..{MAX_ATTEMPTS_LIMIT} (gRPC's limit); "
                f"got {self.max_attempts}; use retry=None for no retries"
            )
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1; got {self.multiplier}")

    @property
    def codes(self) -> tuple[grpc.StatusCode, ...]:
        codes = [grpc.StatusCode.UNAVAILABLE]
        if self.on_overload:
            codes.append(grpc.StatusCode.RESOURCE_EXHAUSTED)
        return tuple(dict.fromkeys([*codes, *self.also_on]))

    def backoff(self, attempt: int) -> float:
        """gRPC's delay before retry number ``attempt`` (1-based), for retries done by hand:
        a stream that broke after answering some requests, which gRPC cannot retry itself."""
        cap = min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        return random.uniform(0, cap)

    def policy(self) -> dict[str, Any]:
        """The ``retryPolicy`` object of a gRPC service config."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff:g}s",
            "maxBackoff": f"{self.max_backoff:g}s",
            "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": [code.name for code in self.codes],
        }
