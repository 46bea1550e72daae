"""CPU time of the server's threads by what they do, read from ``/proc`` at scrape time.

Exported as ``resnet_serve_thread_cpu_seconds{threads=...}``: the CPU seconds (user +
system) of the process's live threads in each group, so that CPU spent inside
``session.run`` and CPU spent around it are counted apart, per thread, without timing
anything on the request path. The groups:

- ``onnxruntime``: the threads ONNX Runtime starts while a session opens (its intra-op
  pool), found by the threads that appear during `opening`;
- ``inference``: the batchers' executor threads, which call ``session.run`` (and take
  part in its work);
- ``event_loop``: the thread running the asyncio loop (gRPC's aio callbacks, the request
  path, the batcher's scheduling, metrics);
- ``decode``: the preprocessing workers;
- ``other``: everything else (gRPC core's threads, /metrics, asyncio's default executor).

The groups are process-wide (threads are), kept in one map that threads enter by
`name_current` (an executor's initializer) or `opening`. Reading costs nothing until
/metrics is scraped. Off Linux (no ``/proc/self/task``) every group reads 0.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

GROUPS = ("onnxruntime", "inference", "event_loop", "decode", "other")
_TASKS = Path("/proc/self/task")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_groups: dict[int, str] = {}
_lock = threading.Lock()


def name_process(name: str) -> None:
    """Name this process as ``ps`` and ``top`` show it (/proc/PID/comm, 15 bytes at most);
    threads started afterwards inherit the name."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


def name_current(group: str) -> None:
    """Count the calling thread in `group` (use as a thread pool's initializer)."""
    with _lock:
        _groups[threading.get_native_id()] = group


@contextlib.contextmanager
def opening(group: str) -> Iterator[None]:
    """Count the threads started while the block runs in `group` (not those known already)."""
    before = _thread_ids()
    yield
    with _lock:
        for tid in _thread_ids() - before:
            _groups.setdefault(tid, group)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds of the live threads, by group."""
    totals = dict.fromkeys(GROUPS, 0.0)
    for tid in _thread_ids():
        try:
            stat = (_TASKS / str(tid) / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
        totals[_groups.get(tid, "other")] += ticks / _TICKS
    return totals


def _thread_ids() -> set[int]:
    try:
        return {int(entry) for entry in os.listdir(_TASKS)}
    except OSError:
        return set()


class ThreadCpuCollector(Collector):
    """The gauge family, read when the registry is collected."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "resnet_serve_thread_cpu_seconds",
            "CPU time (user + system) of the process's live threads by what they do: "
            "onnxruntime, inference (the callers of session.run), event_loop, decode, other.",
            labels=["threads"],
        )
        for group, seconds in cpu_seconds().items():
            family.add_metric([group], seconds)
        yield family
