"""The benchmark's command line.

- ``python -m bench run`` (what ``make bench`` does): raw ONNX Runtime and the
  server in one run; JSON in bench/results/, the report in docs/benchmarks.md.
- ``python -m bench sweep``: the server under each knob set of `bench.plan.SWEEP`.
- ``python -m bench report RESULTS``: redraw the report from a saved run or sweep.
- ``python -m bench precision``: int8 vs fp32 (`bench.precision`).
- ``python -m bench spin``: ONNX Runtime's thread spinning, A/B in one process (`bench.spin`).
- ``python -m bench gpu_check``: the acceptance run on an NVIDIA GPU (`bench.gpu_check`).
- ``python -m bench frontend``: the serving path's own cost per request, against raw ONNX
  Runtime and a bare grpc.aio server on the same stack (`bench.frontend`), and the server
  with 0, 1, 2, 4 front-end processes side by side (`bench.frontends`).
- ``python -m bench shared_memory``: tensors through system shared memory against the wire,
  perf_analyzer, the null model and ResNet-50 at concurrency 1 and 64 (`bench.shared_memory`).
- ``python -m bench tracing``: what OpenTelemetry tracing costs per request, off and on at
  sampling ratios 1 and 0.01 (`bench.tracing`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from bench import (
    cli,
    engine_load,
    frontend,
    gpu_check,
    photos,
    precision,
    report,
    run,
    shared_memory,
    spin,
    tracing,
)
from bench.load import VARIANT_KEYS
from bench.plan import SWEEP, Knobs, Plan
from bench.repository import build_missing

WORK = cli.TMP  # git-ignored: built models, photos, server log, profiles
SWEEP_PLAN = Plan(
    models=("resnet50",),
    variants=("uint8", "jpeg"),
    concurrencies=(1, 16),
    batch_sizes=(1, 16, 32),
    warmup=2.0,
    seconds=8.0,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    go = sub.add_parser("run", help="measure raw ONNX Runtime and the server, save, report")
    _plan_arguments(go, Plan())
    knobs, tuning = Knobs(), go.add_argument_group("server knobs (unset: the server's default)")
    tuning.add_argument("--intra-op-threads", type=int, default=knobs.intra_op_threads)
    tuning.add_argument("--instances", type=int, default=knobs.instances)
    tuning.add_argument("--decode-workers", type=int, default=knobs.decode_workers)
    tuning.add_argument(
        "--allow-spinning", action=argparse.BooleanOptionalAction, default=knobs.allow_spinning
    )
    tuning.add_argument("--spin-duration-us", type=int, default=knobs.spin_duration_us)
    tuning.add_argument("--max-batch-size", type=int, default=knobs.max_batch_size)
    tuning.add_argument("--max-queue-delay-us", type=int, default=knobs.max_queue_delay_us)
    tuning.add_argument(
        "--refill-wait",
        type=float,
        default=knobs.refill_wait,
        help="batching.refill_wait written into each config.json (unset: the config's default)",
    )
    go.add_argument(
        "--profile",
        action="store_true",
        help="sample the server with py-spy in each measured window (slows it a little)",
    )
    go.set_defaults(func=_run)

    sweep = sub.add_parser("sweep", help="the server under each knob set: " + "; ".join(SWEEP))
    _plan_arguments(sweep, SWEEP_PLAN)
    sweep.set_defaults(func=_sweep)

    again = sub.add_parser("report", help="redraw docs/benchmarks.md from a results JSON")
    again.add_argument("results_json", type=Path)
    _output_arguments(again)
    again.set_defaults(func=_report)

    precision.register(sub)
    spin.register(sub)
    gpu_check.register(sub)
    frontend.register(sub)
    shared_memory.register(sub)
    tracing.register(sub)
    engine_load.register(sub)
    return parser


def _plan_arguments(parser: argparse.ArgumentParser, plan: Plan) -> None:
    add = parser.add_argument
    add("--models", type=cli.names, default=plan.models, help="architectures (default %(default)s)")
    add(
        "--repo",
        type=Path,
        default=WORK / "models",
        help="built model repository; models missing here are built with "
        "`resnet-serve build ARCH --input uint8` (default %(default)s)",
    )
    add("--no-build", action="store_true", help="fail instead of building a missing model")
    add(
        "--variants",
        type=cli.names,
        default=plan.variants,
        help=f"server variants, of {','.join(VARIANT_KEYS)} (default %(default)s)",
    )
    add(
        "--concurrency",
        type=cli.ints,
        default=plan.concurrencies,
        help="requests in flight, a comma list (default %(default)s)",
    )
    add(
        "--batch-sizes",
        type=cli.ints,
        default=plan.batch_sizes,
        help="raw ORT batch sizes (default %(default)s)",
    )
    add(
        "--warmup",
        type=float,
        default=plan.warmup,
        help="unrecorded seconds before each slice of a server level (default %(default)s)",
    )
    add(
        "--seconds",
        type=float,
        default=plan.seconds,
        help="measured seconds per server level, over all rounds (default %(default)s)",
    )
    add(
        "--rounds",
        type=int,
        default=plan.rounds,
        help="slices each level is measured in, alternating with the other variants and raw "
        "ORT (default %(default)s)",
    )
    add(
        "--reference-seconds",
        type=float,
        default=plan.reference_seconds,
        help="raw ORT at batch 1 and its best batch next to each level, seconds per round "
        "(default %(default)s)",
    )
    add(
        "--raw-seconds",
        type=float,
        default=plan.raw_seconds,
        help="measured seconds per raw batch size (default %(default)s)",
    )
    add(
        "--photos",
        type=Path,
        default=photos.DEFAULT_SOURCE,
        help="JPEG photos, re-encoded at ~1 MP for the jpeg variant (default %(default)s)",
    )
    cli.add_work(parser, WORK)
    cli.add_results(parser)
    _output_arguments(parser)


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_doc(parser)
    parser.add_argument("--plots", type=Path, default=cli.DOC.parent / "benchmarks",
                        help="where the PNGs go (default %(default)s)")  # fmt: skip


def _plan(args: argparse.Namespace, knobs: Knobs, profile: bool = False) -> Plan:
    unknown = set(args.variants) - set(VARIANT_KEYS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANT_KEYS)}")
    return Plan(
        models=args.models,
        variants=args.variants,
        concurrencies=args.concurrency,
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        seconds=args.seconds,
        raw_seconds=args.raw_seconds,
        rounds=args.rounds,
        reference_seconds=args.reference_seconds,
        knobs=knobs,
        profile=profile,
    )


def _prepare(args: argparse.Namespace, plan: Plan) -> list[Path]:
    """Build missing models; the ~1 MP JPEGs."""
    if not args.no_build:
        build_missing(args.repo, list(plan.models))
    return photos.one_megapixel(args.photos, args.work / "photos")


def _run(args: argparse.Namespace) -> int:
    knobs = Knobs(
        intra_op_threads=args.intra_op_threads,
        instances=args.instances,
        decode_workers=args.decode_workers,
        allow_spinning=args.allow_spinning,
        spin_duration_us=args.spin_duration_us,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        refill_wait=args.refill_wait,
    )
    plan = _plan(args, knobs, args.profile)
    results = run.execute(plan, args.repo, _prepare(args, plan), args.work)
    return _finish(results, args)


def _sweep(args: argparse.Namespace) -> int:
    plan = _plan(args, Knobs())
    results = run.execute_sweep(plan, SWEEP, args.repo, _prepare(args, plan), args.work)
    return _finish(results, args)


def _finish(results: dict[str, Any], args: argparse.Namespace) -> int:
    render = functools.partial(report.render, plots_dir=args.plots)
    cli.finish(results, args, cli.stamped(""), render)
    return 0


def _report(args: argparse.Namespace) -> int:
    results = json.loads(args.results_json.read_text())
    report.render(results, args.results_json, args.doc, args.plots)
    cli.say(f"wrote {args.doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
