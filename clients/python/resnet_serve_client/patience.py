"""How long a call keeps trying when the server answers UNAVAILABLE.

gRPC's retry policy (``options.retry``) covers short blips, at most 5 attempts.
A server that restarts is unavailable for longer: it refuses calls while it
drains, and answers UNAVAILABLE while it loads its models. With
``wait_for_ready=True`` a call therefore goes on retrying UNAVAILABLE, with the
same exponential backoff and jitter, until its deadline; without it, only
gRPC's own attempts are made. A ``ClassifyStream`` that breaks after
answering is beyond gRPC's retries in any case, so ``classify_many`` reopens it
here: within ``retry.max_attempts``, or until the deadline with
``wait_for_ready``. When the server sends ``grpc-retry-pushback-ms`` (a
draining resnet-serve does), the next attempt waits exactly that long instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import grpc

from .errors import ResnetServeError
from .options.channel import ChannelOptions
from .options.retry import Retry


@dataclass(slots=True)
class Patience:
    retry: Retry | None
    deadline: float = math.inf  # time.monotonic() value
    max_attempts: int | None = None
    attempts: int = 0

    @classmethod
    def for_call(cls, options: ChannelOptions, timeout: float | None) -> Patience:
        """For one unary call: keep trying only with ``wait_for_ready``."""
        retry = (options.retry or Retry()) if options.wait_for_ready else None
        return cls(retry, _deadline(timeout))

    @classmethod
    def for_stream(cls, options: ChannelOptions, timeout: float | None) -> Patience:
        """For reopening a broken stream; ``timeout`` counts from the first failure."""
        if options.wait_for_ready:
            return cls(options.retry or Retry(), _deadline(timeout))
        if options.retry is None:
            return cls(None)
        return cls(options.retry, max_attempts=options.retry.max_attempts)

    def remaining(self) -> float | None:
        """What is left of the deadline, as a gRPC timeout (``None``: no deadline)."""
        return None if self.deadline == math.inf else max(0.0, self.deadline - time.monotonic())

    def delay(self, error: ResnetServeError) -> float | None:
        """Seconds to wait before trying again, or ``None`` to give up with ``error``."""
        if self.retry is None or error.code is not grpc.StatusCode.UNAVAILABLE:
            return None
        self.attempts += 1
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return None
        # A server's pushback replaces the backoff, as in gRPC's own retries.
        delay = self.retry.backoff(self.attempts) if error.pushback is None else error.pushback
        if time.monotonic() + delay >= self.deadline:
            return None
        return delay


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else time.monotonic() + timeout
