"""``resnet-serve-client``: classify files, check health, list models, generate load."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from .aio import AsyncClient
from .bench import Level, LevelResult, Stop, run_level
from .client import DEFAULT_TIMEOUT, Client
from .errors import ResnetServeError
from .options.channel import ChannelOptions, aio_channel
from .options.tls import TLS
from .payloads import Inputs, classify_requests, find_images, make_inputs, v2_requests
from .progress import Progress
from .proto.inference import grpc_service_pb2 as v2
from .proto.inference import grpc_service_pb2_grpc as v2_grpc
from .proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from .resize import Resize
from .results import Classification, HealthStatus, ModelInfo

MANY_FILES = 10  # from this many files on, a terminal gets a progress bar
EXIT_FAILED = 1
EXIT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.command(args)
    except ResnetServeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, ImportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _connection(suppress_defaults: bool) -> argparse.ArgumentParser:
    """The connection flags, accepted before or after the command. After it they carry no
    defaults (SUPPRESS), so they never overwrite a value given before it."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress_defaults else value

    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--server",
                       default=default(os.environ.get("RESNET_SERVE_SERVER", "localhost:8001")),
                       help="host:port, dns:///host:port (round-robin over its addresses) or any "
                       "gRPC target (env RESNET_SERVE_SERVER; default localhost:8001)")
    group.add_argument("--tls", action="store_true", default=default(False),
                       help="connect with TLS")
    group.add_argument("--ca", type=Path, default=default(None),
                       help="CA certificate (PEM) to verify the server; implies --tls "
                       "(default: the system's trust store)")
    group.add_argument("--cert", type=Path, default=default(None),
                       help="client certificate (PEM) for mutual TLS")
    group.add_argument("--key", type=Path, default=default(None),
                       help="client private key (PEM) for mutual TLS")
    group.add_argument("--server-name", default=default(None),
                       help="name to verify the server's certificate against")
    group.add_argument("--token", default=default(os.environ.get("RESNET_SERVE_TOKEN")),
                       help="bearer token (env RESNET_SERVE_TOKEN)")
    group.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT),
                       help=f"deadline of each call in seconds (default {DEFAULT_TIMEOUT:g})")
    group.add_argument("--wait-for-ready", action="store_true", default=default(False),
                       help="wait (up to the deadline) for an unreachable server instead of "
                       "failing at once")
    return parent


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="resnet-serve-client", parents=[_connection(suppress_defaults=False)],
        description="Classify images with a resnet-serve server, check its health, list its "
        "models, and generate load.",
    )
    connection = _connection(suppress_defaults=True)
    commands = main_parser.add_subparsers(required=True, metavar="COMMAND")

    classify = commands.add_parser(
        "classify", parents=[connection], help="classify image files (folders are recursed)"
    )
    classify.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    classify.add_argument("--model", help="model name (default: the server's only model)")
    classify.add_argument("--version", default="", help="model version (default: latest ready)")
    classify.add_argument("--top-k", type=int, default=1, help="classes per image (default 1)")
    classify.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    classify.add_argument("--concurrency", type=int, default=8,
                          help="requests in flight (default %(default)s)")
    classify.add_argument("--resize", choices=("jpeg", "uint8"),
                          help="shrink images on this side first (needs Pillow)")
    classify.add_argument("--no-progress", action="store_true", help="no progress bar")
    classify.set_defaults(command=classify_command)

    health = commands.add_parser("health", parents=[connection],
                                 help="grpc.health.v1 status; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="a service or model name (default: server)")
    health.set_defaults(command=health_command)

    models = commands.add_parser("models", parents=[connection], help="list the server's models")
    models.add_argument("--json", action="store_true", help="JSON instead of a table")
    models.set_defaults(command=models_command)

    bench = commands.add_parser("bench", parents=[connection], help="generate load and measure")
    bench.add_argument("--model", help="model name (default: the server's only model)")
    bench.add_argument("--api", choices=("classify", "v2"), default="classify",
                       help="resnet_serve.v1 Classify or the v2 protocol's ModelInfer")
    bench.add_argument("--concurrency", type=_int_list, default=[1],
                       help="requests in flight; a list (1,4,16) runs one level each")
    stop = bench.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, default=10.0,
                      help="seconds per level (default %(default)s)")
    stop.add_argument("--requests", type=int, help="requests per level instead of a duration")
    bench.add_argument("--rate", type=_float_list,
                       help="open loop: requests/s (a list runs one level each); --concurrency "
                       "then caps requests in flight")
    bench.add_argument("--warmup", type=float, default=1.0,
                       help="unrecorded seconds before each level (default %(default)s)")
    bench.add_argument("--input", choices=("jpeg", "uint8", "float", "files"), default="jpeg",
                       help="synthetic JPEG (needs Pillow), uint8 HWC or float32 CHW tensors, "
                       "or --files")
    bench.add_argument("--size", type=int, default=224, help="synthetic image side (default 224)")
    bench.add_argument("--files", type=Path, nargs="+", default=[], help="for --input files")
    bench.add_argument("--batch-size", type=int, default=1, help="images per request")
    bench.add_argument("--top-k", type=int, default=1, help="classes per image (default 1)")
    output = bench.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON on stdout")
    output.add_argument("--csv", action="store_true", help="CSV on stdout")
    bench.add_argument("--plot", type=Path, metavar="PNG",
                       help="latency-vs-throughput chart (needs matplotlib)")
    bench.set_defaults(command=bench_command)
    return main_parser


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"each value must be >= 1: {text}")
    return values


def _float_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"each rate must be > 0: {text}")
    return values


def channel_options(args: argparse.Namespace) -> ChannelOptions:
    tls = None
    if args.tls or args.ca or args.cert or args.key:
        tls = TLS(root_certificates=args.ca, certificate_chain=args.cert, private_key=args.key,
                  server_name=args.server_name)
    return ChannelOptions(tls=tls, token=args.token, wait_for_ready=args.wait_for_ready)


def only_model(models: list[ModelInfo]) -> str:
    if len(models) == 1:
        return models[0].name
    names = ", ".join(m.name for m in models) or "none"
    raise ValueError(f"the server has {len(models)} models ({names}); choose one with --model")


# classify -------------------------------------------------------------------------------


def classify_command(args: argparse.Namespace) -> int:
    files = find_images(args.paths)
    if not files:
        raise ValueError("no image files found under the given paths")
    resize = Resize(args.resize) if args.resize else None
    show_progress = not args.no_progress and len(files) >= MANY_FILES and sys.stderr.isatty()
    client = Client(args.server, options=channel_options(args), timeout=args.timeout,
                    resize=resize)
    with client:
        model = args.model or only_model(client.list_models())
        _warn_if_untrained(client, model, args.version)
        results = client.classify_many(
            files, model=model, version=args.version, top_k=args.top_k,
            concurrency=args.concurrency, return_exceptions=True,
        )
        writer = _Writer(sys.stdout, files, args.json)
        start = time.monotonic()
        failed = 0
        with Progress(len(files), sys.stderr) if show_progress else nullcontext() as progress:
            for path, result in zip(files, results, strict=True):
                failed += isinstance(result, Exception)
                writer.write(path, result, progress)
                if progress:
                    progress.update()
    seconds = time.monotonic() - start
    done = len(files) - failed
    summary = (f"classified {done} of {len(files)} images with {model} in {seconds:.2f} s "
               f"({done / seconds:.1f} images/s)")
    print(summary + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return EXIT_FAILED if failed else 0


def _warn_if_untrained(client: Client, model: str, version: str) -> None:
    """One line on stderr when the version that will answer has random weights."""
    try:
        info = client.get_model(model, version)
    except ResnetServeError:
        return  # the classify calls report what is wrong
    for v in info.versions:
        if v.random_weights:
            print(f"note: {model} version {v.version} has {v.weights} weights: an untrained "
                  f"model, its classes mean nothing", file=sys.stderr)  # fmt: skip


class _Writer:
    """A readable table, or JSON lines, one entry per file, errors in their place."""

    def __init__(self, stream: TextIO, files: list[Path], as_json: bool) -> None:
        self.stream, self.as_json = stream, as_json
        self.width = max(len(str(f)) for f in files)
        if not as_json:
            self._emit(f"{'PATH':<{self.width}}  {'SCORE':>6}  CLASS", None)

    def write(self, path: Path, result: Classification | Exception,
              progress: Progress | None) -> None:
        if self.as_json:
            self._emit(json.dumps(_json_result(path, result)), progress)
        elif isinstance(result, Exception):
            self._emit(f"{path!s:<{self.width}}  {'-':>6}  error: {_describe(result)}", progress)
        else:
            best, *rest = result.classes
            others = "".join(f", {c.label} {c.score:.3f}" for c in rest)
            self._emit(f"{path!s:<{self.width}}  {best.score:6.3f}  {best.label}{others}", progress)

    def _emit(self, line: str, progress: Progress | None) -> None:
        sharing_terminal = progress is not None and self.stream.isatty()
        if sharing_terminal:
            progress.clear()
        self.stream.write(line + "\n")
        self.stream.flush()
        if sharing_terminal:
            progress.draw()


def _describe(error: Exception) -> str:
    if isinstance(error, ResnetServeError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _json_result(path: Path, result: Classification | Exception) -> dict[str, Any]:
    if isinstance(result, Exception):
        code = result.code.name if isinstance(result, ResnetServeError) else type(result).__name__
        message = result.message if isinstance(result, ResnetServeError) else str(result)
        return {"path": str(path), "error": {"code": code, "message": message}}
    return {
        "path": str(path), "model": result.model, "version": result.version,
        "classes": [{"index": c.index, "label": c.label, "score": round(c.score, 6)}
                    for c in result.classes],
    }


# health, models ---------------------------------------------------------------------------


def health_command(args: argparse.Namespace) -> int:
    with Client(args.server, options=channel_options(args), timeout=args.timeout) as client:
        try:
            status = client.health(args.service)
        except ResnetServeError as error:
            print(f"{args.server}: {error}")
            return EXIT_FAILED
    print(status.name)
    return 0 if status is HealthStatus.SERVING else EXIT_FAILED


def models_command(args: argparse.Namespace) -> int:
    with Client(args.server, options=channel_options(args), timeout=args.timeout) as client:
        models = client.list_models()
    if args.json:
        print(json.dumps([_model_json(m) for m in models], indent=2))
        return 0
    print(f"{'NAME':<20} {'ARCH':<18} {'INPUT':<32} {'BATCH':>5}  VERSIONS")
    for m in models:
        spec = f"{m.input.dtype} {m.input.layout} {list(m.input.shape)}"
        versions = ", ".join(f"{v.version} {v.state.value}" + (f" ({v.reason})" if v.reason else "")
                             + (f" [weights: {v.weights}]" if v.weights else "")
                             for v in m.versions)
        print(f"{m.name:<20} {m.arch:<18} {spec:<32} {m.max_batch_size:>5}  {versions}")
    return 0


def _model_json(model: ModelInfo) -> dict[str, Any]:
    return {
        "name": model.name, "arch": model.arch, "platform": model.platform,
        "num_classes": model.num_classes, "max_batch_size": model.max_batch_size,
        "input": {"name": model.input.name, "dtype": model.input.dtype,
                  "layout": model.input.layout, "shape": list(model.input.shape)},
        "versions": [{"version": v.version, "state": v.state.value, "reason": v.reason,
                      "providers": list(v.providers), "weights": v.weights}
                     for v in model.versions],
    }


# bench --------------------------------------------------------------------------------------


def bench_command(args: argparse.Namespace) -> int:
    from . import report

    inputs = make_inputs(args.input, args.size, args.files)
    results, config = asyncio.run(_bench(args, inputs))
    if args.json:
        print(report.as_json(config, results))
    elif args.csv:
        print(report.as_csv(results), end="")
    else:
        print(report.as_table(config, results))
    if args.plot:
        from .plot import plot

        plot(results, args.plot, " ".join(f"{k}={v}" for k, v in config.items()
                                          if k in ("api", "model", "input", "batch")))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


async def _bench(
    args: argparse.Namespace, inputs: Inputs
) -> tuple[list[LevelResult], dict[str, Any]]:
    options = channel_options(args)
    async with AsyncClient(args.server, options=options, timeout=args.timeout) as client:
        model = args.model or only_model(await client.list_models())
    channel = aio_channel(args.server, options)
    call_kwargs = {"timeout": args.timeout, "metadata": options.call_metadata(),
                   "wait_for_ready": options.wait_for_ready}
    async with channel:
        if args.api == "classify":
            stub = pb_grpc.ClassifierStub(channel)
            requests: list[Any] = classify_requests(
                inputs, model=model, batch=args.batch_size, top_k=args.top_k)
            method = stub.Classify
        else:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            metadata = await stub.ModelMetadata(v2.ModelMetadataRequest(name=model), **call_kwargs)
            requests = v2_requests(
                inputs, model=model, input_name=metadata.inputs[0].name,
                output_name=metadata.outputs[0].name, batch=args.batch_size, top_k=args.top_k)
            method = stub.ModelInfer

        async def call(number: int) -> object:
            return await method(requests[number % len(requests)], **call_kwargs)

        levels = ([Level(args.concurrency[0], rate) for rate in args.rate] if args.rate
                  else [Level(c) for c in args.concurrency])
        stop = Stop(requests=args.requests) if args.requests else Stop(seconds=args.duration)
        results = []
        for level in levels:
            results.append(await run_level(call, level, stop, warmup=args.warmup,
                                           images_per_request=args.batch_size))
    config = {
        "server": args.server, "api": args.api, "model": model, "input": inputs.description,
        "batch": args.batch_size, "top_k": args.top_k,
        "stop": f"{args.requests} requests" if args.requests else f"{args.duration:g} s",
        "warmup_s": args.warmup, "client_cpus": os.cpu_count(),
    }
    return results, config
