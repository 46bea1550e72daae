"""Triton's own load generator, perf_analyzer (C++), against the server's v2 endpoint.

The SDK's load generator is Python: at concurrency 1 it spends about a
millisecond of CPU per request on the same two cores, and that time is part of
every latency it reports. perf_analyzer (shipped in ``tritonclient`` wheels up to 2.49)
is the client Triton users measure with, so the bench runs it too, for the v2
variant, to show the server's latency with a client that costs little.

It needs two shared libraries to start, even against a CPU-only server:
Debian's ``libb64-0d`` (``make bench`` installs it as root) and
``libcudart.so.12``, taken from the ``nvidia-cuda-runtime-cu12`` wheel of the
dev extra. Without them the variant is left out of the run, and the report
says why.

Each slice runs perf_analyzer for three time windows of a third of the slice
(``-s`` set so high that any three windows count as stable: perf_analyzer's
check compares three windows' max / min, which a loaded machine can push past
any real bound, and the bench's own rounds deal with drift). Every request's
send and receive time comes from its ``--profile-export-file``, so slices add
up exactly like the SDK's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from resnet_serve_client.bench import LevelResult

# tritonclient's wheels carried the binary up to 2.49; `make venv` installs 2.41's (2.49's
# writes an empty profile export) apart from the venv's packages, which keep the current
# tritonclient (without it).
BINARY = next(
    (
        path
        for path in (
            Path(sys.executable).with_name("perf_analyzer"),
            Path(sys.prefix) / "perf-analyzer" / "bin" / "perf_analyzer",
        )
        if path.is_file()
    ),
    Path(sys.prefix) / "perf-analyzer" / "bin" / "perf_analyzer",
)
TIMEOUT_MARGIN = 120.0  # seconds beyond the windows: start-up, metadata, a retried window
# perf_analyzer's --stability-percentage: three windows are stable when max / min of each
# figure is within 1 + this / 100, so 10**6 % takes the first three windows as they are
ANY_WINDOWS = "1000000"


def _environment() -> dict[str, str]:
    """The environment with the CUDA runtime wheel's library folder on the search path."""
    env = dict(os.environ)
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:  # no nvidia namespace at all
        spec = None
    if spec is not None and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p
        )
    return env


def unavailable() -> str | None:
    """Why perf_analyzer cannot run here, or None when it can."""
    if not BINARY.is_file():
        return f"no {BINARY} (make venv installs it from the tritonclient 2.41 wheel)"
    try:
        done = subprocess.run(
            [str(BINARY), "--version"], env=_environment(), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    except OSError as exc:
        return f"{BINARY.name} does not start: {exc}"
    if "error while loading shared libraries" in done.stderr:
        return f"{BINARY.name} does not start: {done.stderr.strip().splitlines()[-1]}"
    return None


def measure(
    address: str,
    model: str,
    concurrency: int,
    seconds: float,
    work: Path,
    inputs: dict[str, bytes] | None,
    protocol: str = "grpc",
    flags: Sequence[str] = (),
) -> LevelResult:
    """One measured slice at `concurrency`: every request of the stable windows.

    `inputs` maps each input name to the raw bytes of one image's tensor: the same data
    the SDK's v2 variant sends. perf_analyzer's own "zero" data is no stand-in (all-zero
    pixels ran ResNet-50 18 % slower in ONNX Runtime here), and its "random" bytes are
    NaN and infinity as often as not in a float32 tensor: what a user running it without
    data flags sends (``inputs=None``), which the server computes like any other input.
    `protocol`: ``grpc`` (`address` is the gRPC port) or ``http`` (the HTTP port).
    `flags`: more of perf_analyzer's flags (``--shared-memory system``: the tensors through
    regions it registers, `bench.shared_memory`).
    """
    data_flags: list[str] = []
    if inputs is not None:
        data = work / f"{model}-input"
        data.mkdir(parents=True, exist_ok=True)
        for name, raw in inputs.items():
            (data / name).write_bytes(raw)
        data_flags = ["--input-data", str(data)]
    export = work / f"{model}-{protocol}-c{concurrency}.json"
    export.unlink(missing_ok=True)
    window_ms = max(200, round(1000 * seconds / 3))
    command = [
        str(BINARY), "-m", model, "-u", address, "-i", protocol,
        "--concurrency-range", str(concurrency), "-b", "1",
        "--measurement-mode", "time_windows", "-p", str(window_ms), "-s", ANY_WINDOWS,
        *data_flags, *flags, "--profile-export-file", str(export),
    ]  # fmt: skip
    cpu_before, started = _children_cpu(), time.monotonic()
    done = subprocess.run(
        command, env=_environment(), capture_output=True, text=True,
        timeout=10 * window_ms / 1000 + TIMEOUT_MARGIN,  # at most 10 windows (--max-trials)
    )  # fmt: skip
    cpu = _children_cpu() - cpu_before
    result = LevelResult(concurrency, None, 1)
    if done.returncode != 0 or not export.is_file():
        result.seconds = time.monotonic() - started  # nothing measured: the time it took
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        result.errors[f"perf_analyzer exit {done.returncode}: {' | '.join(tail)}"] += 1
        return result
    (experiment,) = json.loads(export.read_text())["experiments"]
    boundaries = experiment["window_boundaries"]
    requests = experiment["requests"]
    result.seconds = (boundaries[-1] - boundaries[0]) / 1e9
    result.latencies = [
        (r["response_timestamps"][-1] - r["timestamp"]) / 1e9
        for r in requests
        if r.get("response_timestamps")
    ]
    result.ok = len(result.latencies)
    if len(requests) > result.ok:
        result.errors["no response"] += len(requests) - result.ok
    result.cpu_seconds = cpu
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
