"""`resnet-serve serve`: flags from `server.config.Settings`, then `server.app.run`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pydantic import ValidationError

from server import config, logs, tracing


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description=(
            "Serve every verified model of a repository over gRPC (resnet_serve.v1.Classifier, "
            "the Open Inference Protocol v2, health, reflection) with Prometheus metrics. "
            "Each flag also reads "
            f"{config.ENV_PREFIX}<FLAG> from the environment; flags win."
        ),
    )
    config.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = config.from_arguments(args)
    except ValidationError as exc:
        print(f"resnet-serve serve: invalid settings\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    try:  # onnxruntime loads only once settings are valid
        from server import app
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        install = "pip install 'resnet-serve[cpu]', or 'resnet-serve[gpu]' on an NVIDIA GPU"
        print(f"resnet-serve serve: onnxruntime is not installed: {install}", file=sys.stderr)
        return 2

    try:
        return asyncio.run(app.run(settings))
    except app.StartupError as exc:
        logging.getLogger("server.app").error("%s", exc)
        return 1
    finally:
        tracing.shutdown()  # the spans still buffered are exported
