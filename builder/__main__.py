"""``python -m builder build|verify|models`` — the builder's half of ``resnet-serve``."""

from __future__ import annotations

import argparse
import sys

from builder import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder", description=__doc__)
    cli.register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
