"""`python -m server`: `resnet-serve serve` without the builder's subcommands."""

from __future__ import annotations

import argparse
import sys

from server import config, serve

parser = argparse.ArgumentParser(prog="python -m server", description=serve.__doc__)
config.add_arguments(parser)
sys.exit(serve.run(parser.parse_args()))
