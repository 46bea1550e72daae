"""The `resnet-serve` command: build | verify | models | serve.

Subcommands register themselves; nothing here imports torch, so the
torch-less runtime image runs `resnet-serve serve` and `resnet-serve models`.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from builder import cli as builder_cli
    from server import serve

    parser = argparse.ArgumentParser(
        prog="resnet-serve",
        description="Build verified ONNX ResNets into a model repository and serve them over gRPC.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    builder_cli.register(sub)
    serve.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
