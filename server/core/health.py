"""One model version's health watchdog.

A READY version that stops serving on its own is reported by its batcher's `Watchdog`:
the batch scheduler died, ``max_failed_batches`` session runs failed in a row, or one
session run took longer than ``session_run_timeout`` seconds. The version then turns
UNAVAILABLE with the reason (`server.models.ModelRegistry.unavailable`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Watchdog:
    """One version's health watchdog (`server.core.batcher` and `server.core.instances`
    tell it about every session run and its scheduler): reports once, with the first
    reason, to `report` (`ModelVersion.unhealthy`)."""

    def __init__(
        self, report: Callable[[str], None] | None, *, max_failed_runs: int, run_timeout: float
    ) -> None:
        self._report_to = report
        self._max_failed = max_failed_runs
        self._run_timeout = run_timeout
        self._failed_in_a_row = 0
        self._overrun = (
            f"a session run has taken more than {run_timeout:g} s (session_run_timeout)"
        )
        self.reason = ""  # why it stopped being healthy; "" while it is

    def run_started(self, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle:
        """A session run starts now: reported if it is still going past ``run_timeout``."""
        return loop.call_later(self._run_timeout, self.report, self._overrun)

    def run_ended(self, timer: asyncio.TimerHandle, seconds: float, failed: bool) -> None:
        """The run `timer` watched ended after `seconds` on the loop's clock; also reported
        past ``run_timeout`` (its answer can reach the loop before the timer does)."""
        timer.cancel()
        if seconds > self._run_timeout:
            self.report(self._overrun)
        if not failed:
            self._failed_in_a_row = 0
            return
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= self._max_failed:
            self.report(f"{self._failed_in_a_row} session runs in a row failed "
                        f"(max_failed_batches {self._max_failed})")  # fmt: skip

    def scheduler_ended(self, task: asyncio.Task[None]) -> None:
        """The batch scheduler's task is done: cancelled is a close, anything else a death."""
        if not task.cancelled():
            error = task.exception()
            why = type(error).__name__ if error is not None else "returned"
            self.report(f"its batch scheduler stopped ({why})")

    def report(self, reason: str) -> None:
        """Unhealthy, once: the first reason is the one reported."""
        if self.reason:
            return
        self.reason = reason
        if self._report_to is not None:
            self._report_to(reason)
