"""Where the server's time goes during a measured window, sampled by py-spy.

Two non-blocking samplers attach to the server process for the window: one
records every thread that is running (py-spy leaves idle threads out), one
only stacks that hold the GIL. From them: each thread group's share of one
core, the GIL's busy share, and the Python functions the running threads were
in (innermost frame; for ONNX Runtime that is ``Session.run``, native code below).
ONNX Runtime's own worker threads are not Python threads and do not appear.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE = 100  # samples per second
TOP = 8
_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-f]+\): (?P<name>.*?)(?:_\d+)?$")


def _py_spy() -> str:
    """py-spy beside this interpreter (the dev extra installs it), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise FileNotFoundError("--profile needs py-spy: pip install py-spy (the dev extra)")
    return found


@dataclass
class Sampling:
    """Two running samplers and where they write."""

    running: Path
    gil: Path
    processes: list[subprocess.Popen[bytes]]

    @classmethod
    def start(cls, pid: int, seconds: float, directory: Path, name: str) -> Sampling:
        directory.mkdir(parents=True, exist_ok=True)
        running, gil = directory / f"{name}.txt", directory / f"{name}-gil.txt"
        processes = [
            subprocess.Popen(
                [_py_spy(), "record", "--pid", str(pid), "--duration", f"{max(1, round(seconds))}",
                 "--rate", str(RATE), "--threads", "--nonblocking", "--format", "raw",
                 "--output", str(out), *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for out, extra in ((running, []), (gil, ["--gil"]))
        ]  # fmt: skip
        return cls(running, gil, processes)

    def finish(self, seconds: float) -> dict[str, Any]:
        for process in self.processes:
            process.wait()
        return summarize(self.running.read_text(), self.gil.read_text(), seconds)


def _samples(text: str) -> list[tuple[list[str], int]]:
    rows = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            rows.append((stack.split(";"), int(count)))
    return rows


def _thread_group(frame: str) -> str:
    match = _THREAD.match(frame)
    return match.group("name") if match else frame


def _function(frame: str) -> str:
    """``Session.run (onnxruntime/capi/x.py:395)`` → ``Session.run (onnxruntime/capi/x.py)``."""
    return re.sub(r":\d+\)$", ")", frame)


def summarize(running: str, gil: str, seconds: float) -> dict[str, Any]:
    """Shares of one core (100 = a core busy for the whole window)."""
    expected = RATE * seconds
    threads: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    for frames, count in _samples(running):
        threads[_thread_group(frames[0])] += count
        functions[_function(frames[-1])] += count
    held = sum(count for _, count in _samples(gil))
    return {
        "threads_pct": {t: round(100 * n / expected, 1) for t, n in threads.most_common()},
        "gil_pct": round(100 * held / expected, 1),
        "top_functions_pct": {
            f: round(100 * n / expected, 1) for f, n in functions.most_common(TOP)
        },
    }
