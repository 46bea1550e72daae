"""``python -m bench run`` (what ``make bench`` does) and ``python -m bench report RESULTS``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import photos, report, run
from bench.load import VARIANT_KEYS
from bench.plan import Knobs, Plan
from bench.repository import build_missing

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "results" / "tmp"  # git-ignored: built models, photos, server log


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plan, knobs = Plan(), Knobs()

    go = sub.add_parser("run", help="measure raw ONNX Runtime and the server, save, report")
    go.add_argument(
        "--models", type=_names, default=plan.models, help="architectures (default %(default)s)"
    )
    go.add_argument(
        "--repo",
        type=Path,
        default=WORK / "models",
        help="built model repository; models missing here are built "
        "(resnet-serve build ARCH --input uint8) (default %(default)s)",
    )
    go.add_argument("--no-build", action="store_true", help="fail instead of building")
    go.add_argument(
        "--variants",
        type=_names,
        default=plan.variants,
        help=f"server variants, of {','.join(VARIANT_KEYS)} (default: all)",
    )
    go.add_argument(
        "--concurrency",
        type=_ints,
        default=plan.concurrencies,
        help="requests in flight, a comma list (default %(default)s)",
    )
    go.add_argument(
        "--batch-sizes",
        type=_ints,
        default=plan.batch_sizes,
        help="raw ORT batch sizes (default %(default)s)",
    )
    go.add_argument(
        "--warmup",
        type=float,
        default=plan.warmup,
        help="unrecorded seconds before each server level (default %(default)s)",
    )
    go.add_argument(
        "--seconds",
        type=float,
        default=plan.seconds,
        help="measured seconds per server level (default %(default)s)",
    )
    go.add_argument(
        "--raw-seconds",
        type=float,
        default=plan.raw_seconds,
        help="measured seconds per raw batch size (default %(default)s)",
    )
    go.add_argument(
        "--photos",
        type=Path,
        default=photos.DEFAULT_SOURCE,
        help="JPEG photos, re-encoded at ~1 MP for the jpeg variant",
    )
    go.add_argument(
        "--profile",
        action="store_true",
        help="sample the server with py-spy in each measured window (slows it a little)",
    )
    go.add_argument("--work", type=Path, default=WORK, help="scratch directory")
    go.add_argument(
        "--results",
        type=Path,
        default=HERE / "results",
        help="where the JSON goes (default %(default)s)",
    )
    _output_arguments(go)
    tuning = go.add_argument_group("server knobs (unset: the server's own default)")
    tuning.add_argument("--intra-op-threads", type=int, default=knobs.intra_op_threads)
    tuning.add_argument("--instances", type=int, default=knobs.instances)
    tuning.add_argument("--decode-workers", type=int, default=knobs.decode_workers)
    tuning.add_argument(
        "--allow-spinning", action=argparse.BooleanOptionalAction, default=knobs.allow_spinning
    )
    tuning.add_argument("--max-batch-size", type=int, default=knobs.max_batch_size)
    tuning.add_argument("--max-queue-delay-us", type=int, default=knobs.max_queue_delay_us)
    go.set_defaults(func=_run)

    again = sub.add_parser("report", help="render docs/benchmarks.md from a results JSON")
    again.add_argument("results_json", type=Path)
    _output_arguments(again)
    again.set_defaults(func=_report)
    return parser


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--doc",
        type=Path,
        default=ROOT / "docs" / "benchmarks.md",
        help="the report to update (default %(default)s)",
    )
    parser.add_argument(
        "--plots",
        type=Path,
        default=ROOT / "docs" / "benchmarks",
        help="where the PNGs go (default %(default)s)",
    )


def _run(args: argparse.Namespace) -> int:
    knobs = Knobs(
        intra_op_threads=args.intra_op_threads,
        instances=args.instances,
        decode_workers=args.decode_workers,
        allow_spinning=args.allow_spinning,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
    )
    plan = Plan(
        models=args.models,
        variants=args.variants,
        concurrencies=args.concurrency,
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        seconds=args.seconds,
        raw_seconds=args.raw_seconds,
        knobs=knobs,
        profile=args.profile,
    )
    unknown = set(plan.variants) - set(VARIANT_KEYS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANT_KEYS)}")
    if not args.no_build:
        build_missing(args.repo, list(plan.models))
    jpegs = photos.one_megapixel(args.photos, args.work / "photos")
    results = run.execute(plan, args.repo, jpegs, args.work)
    path = run.save(results, args.results)
    print(f"wrote {path}", file=sys.stderr)
    report.render(results, path, args.doc, args.plots)
    print(f"wrote {args.doc} and its plots in {args.plots}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    results = json.loads(args.results_json.read_text())
    report.render(results, args.results_json, args.doc, args.plots)
    print(f"wrote {args.doc} and its plots in {args.plots}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
