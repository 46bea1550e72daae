"""``resnet-serve build | verify | models | train``.

Nothing here imports torch at module level: the runtime image has no torch, and
``resnet-serve models`` must work there. ``build`` and ``verify`` import it when they run.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from builder.options import BuildOptions, architecture_argument, default_note
from builder.precision import Precision
from builder.registry import UnknownArchitectureError
from builder.repository import RepositoryError, list_models
from builder.tables import format_table
from server.repository import ModelConfig, flags

_DEFAULT_REPO = Path("models")


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser(
        "build",
        help="export an architecture to a verified ONNX model version",
        description="Export ARCH (seeded random weights, or --weights) to ONNX, verify it, and "
        "publish it as <repo>/<name>/<version>/ with config.json and labels.txt.",
    )
    flags.add_arguments(build, BuildOptions, default_note)
    build.set_defaults(func=_build)

    verify = subparsers.add_parser(
        "verify",
        help="re-run the checks on a model version",
        description="Re-run the export checks on PATH (<repo>/<name>/<version>). The PyTorch model "
        "is rebuilt from the recorded seed or weights; if it cannot be, only what the ONNX file "
        "allows is checked, and the output says so.",
    )
    verify.add_argument("path", type=Path, help="a version directory, e.g. models/resnet50/1")
    verify.set_defaults(func=_verify)

    train = subparsers.add_parser(
        "train",
        help="train a CIFAR-style ResNet on scikit-learn's digits and build it",
        description="Train ARCH on scikit-learn's handwritten digits (8x8 upscaled to 32x32, a "
        "fixed 80/20 split) on the CPU, save the checkpoint and the split as PNGs in --out, "
        "and build the model into --repo through the normal build path.",
    )
    train.add_argument(
        "--arch", type=architecture_argument, default="resnet20", help="default: resnet20"
    )
    train.add_argument("--repo", type=Path, default=_DEFAULT_REPO, help="default: models")
    train.add_argument("--name", default="digits", help="model name (default: digits)")
    train.add_argument(
        "--out",
        type=Path,
        default=Path("digits"),
        help="checkpoint and PNG folders train/, held_out/ (default: digits)",
    )
    train.add_argument("--epochs", type=_positive, default=8, help="default: 8")
    train.add_argument("--seed", type=int, default=0, help="default: 0")
    train.add_argument(
        "--stochastic-depth",
        type=_probability,
        nargs="?",
        const=0.5,
        metavar="P_L",
        help="train with stochastic depth, last block surviving with P_L (default 0.5)",
    )
    train.add_argument(
        "--precision",
        choices=[p.value for p in Precision],
        nargs="+",
        default=[Precision.FP32.value],
        help="versions to build: fp32 as NAME, the others as NAME_fp16 and NAME_int8 "
        "(int8 calibrated on the training images); default: fp32",
    )
    train.set_defaults(func=_train)

    models = subparsers.add_parser("models", help="list a repository's models and versions")
    models.add_argument("--repo", type=Path, default=_DEFAULT_REPO, help="default: models")
    models.set_defaults(func=_models)


def _missing_extra(exc: ImportError) -> int:
    print(
        f"error: this command needs the builder's dependencies ({exc.name} is not installed): "
        "pip install 'resnet-serve[builder,cpu]' (or [builder,gpu] on an NVIDIA GPU)",
        file=sys.stderr,
    )
    return 2


def _build(args: argparse.Namespace) -> int:
    try:
        options = BuildOptions(**flags.given(args, BuildOptions))
    except ValidationError as exc:
        problems = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        print(f"error: {problems}", file=sys.stderr)
        return 2
    try:
        from builder.build import VerificationFailed, build
        from builder.calibration import CalibrationError
        from builder.weights import WeightsError
    except ImportError as exc:
        return _missing_extra(exc)

    try:
        result = build(options)
    except VerificationFailed as exc:
        print(exc.report.table())
        print(f"error: {exc}; nothing was written to {options.repo}", file=sys.stderr)
        return 1
    except (WeightsError, CalibrationError, RepositoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {_disk_full(options.repo, exc)}", file=sys.stderr)
        return 1
    for removed in result.removed:
        print(f"removed {removed}, left by a build that did not finish")
    print(result.report.table())
    stages = ", ".join(f"{stage} {value:.1f} s" for stage, value in result.seconds.items())
    print(f"built {result.version_dir} ({stages})")
    return 0


def _disk_full(repo: Path, exc: OSError) -> str:
    """What a build that ran out of disk (or quota) says: the file system, by its mount
    point, and that nothing was published (the staging directory is gone already)."""
    mount = repo.resolve()
    while not mount.exists() or not os.path.ismount(mount):
        mount = mount.parent
    return (
        f"{exc.strerror} on the file system mounted at {mount}, which holds the model "
        f"repository {repo}; nothing was published: free space there and build again"
    )


def _train(args: argparse.Namespace) -> int:
    try:
        from builder.build import VerificationFailed
        from builder.train import TrainRequest, train
    except ImportError as exc:
        return _missing_extra(exc)

    request = TrainRequest(
        out=args.out,
        repo=args.repo,
        name=args.name,
        arch=args.arch,
        epochs=args.epochs,
        seed=args.seed,
        stochastic_depth=args.stochastic_depth,
        precisions=tuple(Precision(p) for p in args.precision),
    )
    try:
        result = train(request)
    except VerificationFailed as exc:
        print(exc.report.table())
        print(f"error: {exc}; nothing was written to {args.repo}", file=sys.stderr)
        return 1
    except (RepositoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"trained {args.arch} in {result.train_seconds:.0f} s: held-out accuracy "
        f"{result.accuracy:.2%}; checkpoint {result.checkpoint}"
    )
    for precision, version_dir in result.versions.items():
        print(f"built {version_dir} ({precision})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        from builder.build import verify_version
    except ImportError as exc:
        return _missing_extra(exc)

    try:
        report = verify_version(args.path)
    except (RepositoryError, FileNotFoundError, UnknownArchitectureError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    if report.scope != "full":
        print(f"note: {report.scope}; the PyTorch comparison and parameter count were skipped")
    if not report.passed:
        print(f"error: verification failed: {report.failure_summary()}", file=sys.stderr)
        return 1
    print(f"verified {args.path}")
    return 0


def _models(args: argparse.Namespace) -> int:
    try:
        entries = list_models(args.repo)
    except RepositoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not entries:
        print(f"{args.repo}: no models")
        return 0
    # Instances as config.json asks for them; the provider each runs on is the server's choice
    # at start-up (--device), shown by GetModel, v2 ModelConfig and its /metrics.
    rows = [
        ("model", "arch", "input", "classes", "instances", "version", "precision", "weights",
         "status", "serves")
    ]  # fmt: skip
    for entry in entries:
        if entry.config is None:
            error = f"invalid config.json: {entry.config_error}"
            rows.append((entry.name, "-", "-", "-", "-", "-", "-", "-", error, "no"))
            continue
        spec = entry.config.input
        shape = f"{spec.dtype} {spec.layout} {spec.size}"
        model = (
            entry.name,
            entry.config.arch,
            shape,
            str(entry.config.num_classes),
            _instances(entry.config),
        )
        for status in entry.versions:
            detail = f" ({status.detail})" if status.detail else ""
            why = entry.why_not_served(status)
            serves = f"no: {why}" if why else "yes"
            weights = status.weights or "-"
            if status.record is not None and status.record.random_weights:
                weights += ", untrained"
            rows.append(
                (*model, str(status.version), status.precision, weights,
                 status.status + detail, serves)
            )  # fmt: skip
        if not entry.versions:
            rows.append((*model, "-", "-", "-", "no versions", "no"))
    print(format_table(rows))
    return 0


def _instances(config: ModelConfig) -> str:
    """config.json's instance count and the GPU options it asks for, e.g. ``2 (tensorrt fp16)``."""
    gpu = []
    if config.optimization.tensorrt is not None:
        gpu.append(f"tensorrt {config.optimization.tensorrt.precision}")
    if config.optimization.cuda.graphs:
        gpu.append("cuda graphs")
    buckets = config.batch_buckets()
    if buckets:
        gpu.append("buckets " + ",".join(map(str, buckets)))
    if config.optimization.cuda.use_tf32:
        gpu.append("tf32")
    return str(config.instances.count) + (f" ({'; '.join(gpu)})" if gpu else "")
