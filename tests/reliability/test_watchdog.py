"""The suite cannot hang: a test stuck in C with the GIL held still ends the run, with
every thread's stack on stderr (tests/fixtures/watchdog.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HANG = '''
import ctypes


def test_holds_the_gil_forever():
    # PyDLL keeps the GIL across the call: no Python thread runs again, pytest-timeout's
    # neither; pause() returns only for a signal handler, which Python cannot run either.
    ctypes.PyDLL(None).pause()
'''


def test_a_test_that_holds_the_gil_still_ends_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(HANG)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
         str(ROOT), "-p", "tests.fixtures.watchdog", "-o", "timeout=1", "-o", "hang_grace=2",
         "-q", "--no-header", str(tmp_path / "test_hang.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode != 0
    assert "Timeout (0:00:03)!" in result.stderr, result.stderr[-2000:]
    assert "test_holds_the_gil_forever" in result.stderr
    assert took < 60, f"ended after {took:.0f} s"
