"""What the bench's subcommands share on their command lines.

- comma lists as flag types: `ints`, `names`, `floats` (empty items skipped);
- the flags every measuring subcommand declares alike: ``--server-flag``
  (`add_server_flags`), ``--work``, ``--results``, ``--doc`` (`add_work`, `add_results`,
  `add_doc`; the three at once: `add_outputs`), and where they point by default;
- progress on stderr (`say`);
- the end of a run (`finish`): the results JSON into ``--results`` under a time-stamped
  name (`stamped`), the subcommand's block of ``--doc`` rendered, each file said.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # every run's JSON, committed
TMP = RESULTS / "tmp"  # git-ignored scratch: built models, photos, server logs, profiles
DOC = HERE.parent / "docs" / "benchmarks.md"


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def names(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """``--server-flag`` (repeated) into ``args.server_flags``."""
    parser.add_argument(
        "--server-flag",
        action="append",
        default=[],
        dest="server_flags",
        help="a flag for resnet-serve serve (repeat; e.g. --server-flag=--intra-op-threads=1)",
    )


def add_work(
    parser: argparse.ArgumentParser, default: Path, what: str = "scratch directory"
) -> None:
    parser.add_argument("--work", type=Path, default=default, help=f"{what} (default %(default)s)")


def add_results(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON goes (default %(default)s)")  # fmt: skip


def add_doc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--doc", type=Path, default=DOC,
                        help="the report to update (default %(default)s)")  # fmt: skip


def add_outputs(
    parser: argparse.ArgumentParser, work: Path, what: str = "scratch directory"
) -> None:
    """``--work`` (default `work`), ``--results`` and ``--doc``."""
    add_work(parser, work, what)
    add_results(parser)
    add_doc(parser)


def stamped(prefix: str) -> str:
    """A results file name for now: ``<prefix>%Y%m%d-%H%M%S.json``, local time."""
    return time.strftime(f"{prefix}%Y%m%d-%H%M%S.json")


def save(results: dict[str, Any], directory: Path, name: str) -> Path:
    """`results` as JSON into ``directory/name`` (the directory made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


Render = Callable[[dict[str, Any], Path, Path], None]
"""A subcommand's report: ``render(results, saved JSON, doc)`` rewrites its block of doc."""


def finish(results: dict[str, Any], args: argparse.Namespace, name: str, render: Render) -> Path:
    """The end of a run: `results` saved as ``args.results/name``, `render` into
    ``args.doc``, each said; the JSON's path."""
    path = save(results, args.results, name)
    say(f"wrote {path}")
    render(results, path, args.doc)
    say(f"wrote {args.doc}")
    return path
