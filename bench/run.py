"""One benchmark run: prepare, measure raw ONNX Runtime and the server, save the JSON.

Per model, raw ONNX Runtime first runs every batch size (the sweep) while the
server sits idle (its threads sleep). Then each concurrency level is measured
in `Plan.rounds` rounds; a round runs raw ONNX Runtime again at batch 1 and at
the sweep's best batch (the *reference*), then a slice of every server
variant. Each figure of a level is the sum of its slices, so everything a
target compares was measured interleaved over the same minute or two: on a
shared machine whose speed drifts by tens of percent from minute to minute,
that is what keeps the ratios meaningful.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort

from bench import load, perf_analyzer, raw
from bench.cli import say
from bench.plan import Knobs, Plan
from bench.repository import Served, prepare
from bench.serving import Server, running

VARIANTS = {v.key: v for v in load.VARIANTS}


def _say_row(prefix: str, row: dict[str, Any]) -> None:
    """One measured level, as it finishes."""
    say(
        f"{prefix} {row['variant']:>8} c={row['concurrency']:<3} "
        f"{row['img_per_s']:7.1f} img/s  p50 {row['p50_ms']:7.1f} ms  "
        f"p99 {row['p99_ms']:7.1f} ms  batch {row['batch_mean']:5.2f}  "
        f"cpu client {row['client_cpu_pct']:.0f}% server {row['server_cpu_pct']:.0f}% "
        f"other {row['other_cpu_pct']:.0f}%"
        + (f"  errors {row['errors']}" if row["errors"] else "")
    )


def machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,  # the server's per-call cost depends on it (decision 0013)
        "commit": _git_commit(),
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, platform.processor())


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def execute(plan: Plan, source_repo: Path, photos: list[Path], work: Path) -> dict[str, Any]:
    """Run `plan` against the models of `source_repo`; the results as a JSON-able dict."""
    started, load_before = time.time(), os.getloadavg()
    plan, left_out = _runnable(plan)
    results: dict[str, Any] = {"raw": {}, "server": []}
    profiles = work / "profiles" if plan.profile else None
    results["reference"] = {}
    with _serving(plan, source_repo, work) as (server, served):
        server_log = server.settings_lines()
        for model in served:
            session = raw.Raw(model.model_file, model.config.input)
            try:
                results["raw"][model.name] = _raw(session, model, plan)
                best = max(results["raw"][model.name], key=lambda r: r["img_per_s"])["batch"]
                rows, references = asyncio.run(
                    _server_levels(server, model, plan, photos, profiles, session, best)
                )
            finally:
                session.close()
            results["server"] += rows
            results["reference"][model.name] = references
    results["meta"] = _meta(started, load_before, plan, server_log, photos) | left_out
    results["plan"] = plan.as_dict()
    return results


def _runnable(plan: Plan) -> tuple[Plan, dict[str, Any]]:
    """`plan` without the perf_analyzer variant when perf_analyzer cannot start here, and
    why (for the results' meta)."""
    wanted = [key for key in plan.variants if VARIANTS[key].client == "perf_analyzer"]
    if not wanted or (reason := perf_analyzer.unavailable()) is None:
        return plan, {}
    say(f"left out {', '.join(wanted)}: {reason}")
    kept = tuple(key for key in plan.variants if key not in wanted)
    return replace(plan, variants=kept), {"left_out": {key: reason for key in wanted}}


def execute_sweep(
    plan: Plan, knob_sets: dict[str, Knobs], source_repo: Path, photos: list[Path], work: Path
) -> dict[str, Any]:
    """The server levels of `plan` under each set of knobs.

    One server per knob set, all started at once (an idle server's threads
    sleep), and measured in interleaved slices: for each concurrency and
    round, every server in turn. So the knob sets are compared over the same
    minutes, as a run compares the server with raw ONNX Runtime.
    """
    started, load_before = time.time(), os.getloadavg()
    plan, left_out = _runnable(plan)
    results: dict[str, Any] = {"raw": {}, "sweep": []}
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[Server, list[Served]]] = {}
        for i, (label, knobs) in enumerate(knob_sets.items()):
            tuned = replace(plan, knobs=knobs)
            servers[label] = stack.enter_context(_serving(tuned, source_repo, work / f"sweep-{i}"))
        rows: dict[str, list[dict[str, Any]]] = {label: [] for label in servers}
        models = next(iter(servers.values()))[1]
        for index, model in enumerate(models):
            session = raw.Raw(model.model_file, model.config.input)
            try:
                results["raw"][model.name] = _raw(session, model, plan)
            finally:
                session.close()
            for label, found in asyncio.run(_sweep_levels(servers, index, plan, photos)).items():
                rows[label] += found
        for label, knobs in knob_sets.items():
            results["sweep"].append(
                {"label": label, "knobs": asdict(knobs), "flags": knobs.server_flags(),
                 "server_log": servers[label][0].settings_lines(), "rows": rows[label]}
            )  # fmt: skip
    results["meta"] = _meta(started, load_before, plan, [], photos) | left_out
    results["plan"] = plan.as_dict()
    return results


async def _sweep_levels(
    servers: dict[str, tuple[Server, list[Served]]], index: int, plan: Plan, photos: list[Path]
) -> dict[str, list[dict[str, Any]]]:
    """Model `index` on every server: each level in rounds, each round every server in turn."""
    variants = [VARIANTS[key] for key in plan.variants]
    first = next(iter(servers.values()))[1][index]  # the same names and inputs on every server
    requests = {v.key: load.requests_for(v, first, photos) for v in variants}
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in servers}
    for concurrency in plan.concurrencies:
        levels: dict[tuple[str, str], load.Accumulated] = {}
        for _ in range(plan.rounds):
            for label, (server, served) in servers.items():
                for variant in (v for v in variants if v.runs_at(concurrency)):
                    key = (label, variant.key)
                    levels[key] = await load.run_variant(
                        server,
                        served[index],
                        variant,
                        concurrency,
                        requests[variant.key],
                        warmup=plan.warmup,
                        seconds=plan.seconds / plan.rounds,
                        into=levels.get(key),
                    )
        for label, (_, served) in servers.items():
            for variant in (v for v in variants if v.runs_at(concurrency)):
                row = load.level_row(served[index], variant, levels[(label, variant.key)])
                _say_row(f"{label:>24} {row['model']}", row)
                rows[label].append(row)
    return rows


@contextlib.contextmanager
def _serving(plan: Plan, source_repo: Path, work: Path) -> Iterator[tuple[Server, list[Served]]]:
    served = prepare(
        source_repo,
        work / "repo",
        list(plan.models),
        max_batch_size=plan.knobs.max_batch_size,
        max_queue_delay_us=plan.knobs.max_queue_delay_us,
        refill_wait=plan.knobs.refill_wait,
    )
    flags = plan.knobs.server_flags()
    say(f"starting the server over {work / 'repo'} {' '.join(flags)}")
    with running(work / "repo", work / "server.log", flags) as server:
        yield server, served


def _raw(session: raw.Raw, model: Served, plan: Plan) -> list[dict[str, Any]]:
    say(f"{model.name}: raw ONNX Runtime at batch sizes {list(plan.batch_sizes)}")
    return [
        session.measure(batch, plan.raw_seconds).result().as_dict() for batch in plan.batch_sizes
    ]


def _meta(
    started: float,
    load_before: tuple[float, float, float],
    plan: Plan,
    server_log: list[str],
    photos: list[Path],
) -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "machine": machine(),
        "server_flags": plan.knobs.server_flags(),
        "server_log": server_log,
        "photos": [p.name for p in photos],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


async def _server_levels(
    server: Server,
    model: Served,
    plan: Plan,
    photos: list[Path],
    profiles: Path | None,
    session: raw.Raw,
    best_batch: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every level of `model` in rounds (see the module docstring): rows and references."""
    variants = [VARIANTS[key] for key in plan.variants]
    requests = {v.key: load.requests_for(v, model, photos) for v in variants}
    slice_seconds = plan.seconds / plan.rounds
    reference_batches = sorted({1, best_batch})
    rows, references = [], []
    for concurrency in plan.concurrencies:
        levels: dict[str, load.Accumulated] = {}
        samples = {batch: raw.Samples(batch) for batch in reference_batches}
        for round_ in range(plan.rounds):
            raw.reference_round(session, samples, plan.reference_seconds)
            last = round_ == plan.rounds - 1
            for variant in (v for v in variants if v.runs_at(concurrency)):
                levels[variant.key] = await load.run_variant(
                    server,
                    model,
                    variant,
                    concurrency,
                    requests[variant.key],
                    warmup=plan.warmup,
                    seconds=slice_seconds,
                    into=levels.get(variant.key),
                    profile_dir=profiles if last else None,
                )
        for batch in reference_batches:
            ref = samples[batch].result()
            references.append(
                {
                    "concurrency": concurrency,
                    **ref.as_dict(),
                    "slice_img_per_s": samples[batch].window_img_per_s,
                }
            )
            say(
                f"{model.name:>10} {'raw b' + str(batch):>8} c={concurrency:<3} "
                f"{ref.img_per_s:7.1f} img/s  p50 {ref.p50_ms:7.1f} ms (next to this level)"
            )
        for variant in (v for v in variants if v.runs_at(concurrency)):
            row = load.level_row(model, variant, levels[variant.key])
            _say_row(f"{model.name:>10}", row)
            rows.append(row)
    return rows, references
