"""ONNX Runtime's thread spinning, A/B in one process: ``python -m bench spin``.

One session per setting, on the server's own session options
(`server.providers.session_options`), run in interleaved slices so the
machine's drift falls on every setting alike. Each setting runs back to back
and with an idle gap between runs (a server's round trip between requests),
and reports p50 latency and this process's CPU time per run: spinning
that outlasts a run shows as CPU spent in the gap.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench import cli, raw
from bench.repository import build_missing
from server.config import Settings
from server.repository import MODEL_FILE, ModelConfig, latest_version
from server.sessions import open_session

DEFAULT_US = Settings().spin_duration_us


def settings(durations: list[int]) -> dict[str, Settings]:
    """No spinning, then spinning for each duration (0: ONNX Runtime's own)."""
    found = {"no spinning": Settings(allow_spinning=False)}
    for us in durations:
        label = "ONNX Runtime's own duration" if us == 0 else f"{us} µs"
        default = " (server default)" if us == DEFAULT_US else ""
        found[f"spinning, {label}{default}"] = Settings(spin_duration_us=us)
    return found


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("spin", help="ONNX Runtime thread spinning, A/B in one process")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repo", type=Path, default=cli.TMP / "models")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--slice", type=float, default=0.5, help="seconds per setting per round")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="idle time between runs")
    parser.add_argument(
        "--durations",
        default=f"{DEFAULT_US},0",
        help="spin durations in µs to compare with no spinning, 0: ONNX Runtime's own",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    build_missing(args.repo, [args.model])
    model_dir = args.repo / args.model
    config = ModelConfig.load(model_dir)
    model_file = latest_version(model_dir) / MODEL_FILE
    threads = Settings().threads_per_session(1, None)
    sessions = {
        label: open_session(model_file, chosen, threads).session
        for label, chosen in settings(list(cli.ints(args.durations))).items()
    }
    feed = {config.input.name: raw.random_batch(config.input, args.batch, np.random.default_rng(0))}
    gaps = (0.0, args.gap_ms / 1000)
    latencies: dict[tuple[str, float], list[float]] = {(k, g): [] for k in sessions for g in gaps}
    cpu = dict.fromkeys(latencies, 0.0)
    for session in sessions.values():
        session.run(None, feed)
    for _ in range(args.rounds):
        for label, session in sessions.items():
            for gap in gaps:
                key = (label, gap)
                began_cpu, end = time.process_time(), time.perf_counter() + args.slice
                while time.perf_counter() < end:
                    start = time.perf_counter()
                    session.run(None, feed)
                    latencies[key].append(time.perf_counter() - start)
                    if gap:
                        time.sleep(gap)
                cpu[key] += time.process_time() - began_cpu
    print(
        f"{args.model} batch {args.batch}, {threads} intra-op threads, {args.rounds} rounds of "
        f"{args.slice:g} s per setting\n"
    )
    print("| setting | gap between runs | runs | p50 ms | mean ms | CPU ms per run |")
    print("|---|---:|---:|---:|---:|---:|")
    for (label, gap), values in latencies.items():
        ms = np.asarray(values) * 1000
        per_run = 1000 * cpu[(label, gap)] / len(values)
        print(
            f"| {label} | {gap * 1000:g} ms | {len(values)} | {np.median(ms):.2f} "
            f"| {ms.mean():.2f} | {per_run:.1f} |"
        )
    return 0
