"""What the bench's subcommands share on their command lines.

- comma lists as flag types: `ints`, `names`, `floats` (empty items skipped);
- the flags every measuring subcommand declares alike: ``--server-flag``
  (`add_server_flags`), ``--work``, ``--results``, ``--doc`` (`add_work`, `add_results`,
  `add_doc`; the three at once: `add_outputs`), and where they point by default;
- progress on stderr (`say`);
- the end of a run (`finish`): the results JSON into ``--results`` under a time-stamped
  name (`stamped`), the subcommand's block of ``--doc`` rendered, each file said;
- what every run records of itself (`meta`: when, how long, the load, the machine, the
  server files modified against the commit, the command) and the report's first line
  that says it (`header`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
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


def meta(started: float, load_before: tuple[float, ...]) -> dict[str, Any]:
    """What a run records of itself: it started at `started` (``time.time()``) with load
    averages `load_before`, and ends now."""
    from bench import run  # it imports this module

    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": run.machine(),
        "modified": modified(),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
    }


def modified() -> list[str]:
    """Files of the server and the SDK that differ from the commit measured (a run serves
    the working tree)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "diff", "--name-only", "HEAD", "--", "server", "clients"],
            capture_output=True, text=True, check=True, cwd=HERE.parent,
        ).stdout.split()  # fmt: skip
    return []


def header(results: dict[str, Any], source: Path) -> str:
    """A report's first line: the command, the machine, when, the load, the commit (and
    what was modified against it), the raw JSON."""
    meta, machine = results["meta"], results["meta"]["machine"]
    return (
        f"`{meta['command']}` on {machine['cpu']} ({machine['cores']} cores), "
        f"{meta['started']}, {meta['seconds']:.0f} s, load average "
        f"{meta['load_average_before'][0]} at the start, {meta['load_average_after'][0]} at "
        f"the end; "
        f"commit {machine['commit']}"
        + (f" with {', '.join(meta['modified'])} modified" if meta.get("modified") else "")
        + (f"; grpcio {machine['grpcio']}" if "grpcio" in machine else "")
        + f"; raw JSON: [{source.name}](../bench/results/{source.name})."
    )
