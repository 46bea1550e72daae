"""The top-level Dockerfile read as data: stages, their instructions, args, env, commands.

dockerfile-parse does the parsing; this module groups its flat instruction list
into stages and resolves the few things the tests need (ARG defaults, ENV
values, RUN flags, .dockerignore matching as Docker does it).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    name: str  # upper case: RUN, COPY, ...
    value: str  # continuation lines joined, as dockerfile-parse gives it
    line: int  # 1-based line of the instruction's first line

    def flags_and_rest(self) -> tuple[dict[str, list[str]], str]:
        """Split leading ``--flag=value`` options (RUN --mount, COPY --from) from the rest."""
        flags: dict[str, list[str]] = {}
        rest = self.value.strip()
        while match := re.match(r"--([a-z-]+)(?:=(\S+))?\s+", rest):
            flags.setdefault(match[1], []).append(match[2] or "")
            rest = rest[match.end() :]
        return flags, rest


@dataclass
class Stage:
    name: str
    base: str  # as written, e.g. ${PYTHON_IMAGE}
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction | None:
        found = self.all(name)
        return found[-1] if found else None

    def args(self) -> dict[str, str | None]:
        """ARGs declared in the stage with their default (None: no default in the stage)."""
        out: dict[str, str | None] = {}
        for arg in self.all("ARG"):
            name, eq, default = arg.value.strip().partition("=")
            out[name] = default if eq else None
        return out

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of the stage, in order (values unexpanded)."""
        out: dict[str, str] = {}
        for env in self.all("ENV"):
            for word in shlex.split(env.value):
                key, _, value = word.partition("=")
                out[key] = value
        return out

    def entrypoint(self) -> list[str]:
        inst = self.last("ENTRYPOINT")
        assert inst is not None, f"stage {self.name} has no ENTRYPOINT"
        return json.loads(inst.value)

    def cmd(self) -> list[str]:
        inst = self.last("CMD")
        return json.loads(inst.value) if inst else []


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]
    text: str

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def resolve(self, value: str, stage: Stage | None = None) -> str:
        """Expand ${ARG} / $ARG with the defaults in force (global, then the stage's)."""
        defaults = {k: v for k, v in self.global_args.items() if v is not None}
        if stage is not None:
            defaults.update({k: v for k, v in stage.args().items() if v is not None})

        def sub(match: re.Match[str]) -> str:
            name = match[1] or match[2]
            return defaults.get(name, match[0])

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, value)


@cache
def load(path: Path = DOCKERFILE) -> Dockerfile:
    with path.open("rb") as fileobj:
        parser = DockerfileParser(fileobj=fileobj)
        structure = parser.structure
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for item in structure:
        name = item["instruction"].upper()
        inst = Instruction(name, item["value"], item["startline"] + 1)
        if name == "FROM":
            words = inst.value.split()
            base = words[0]
            stage_name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(stage_name, base))
        elif name == "COMMENT":
            continue
        elif not stages:
            if name == "ARG":
                key, eq, default = inst.value.strip().partition("=")
                global_args[key] = default if eq else None
        else:
            stages[-1].instructions.append(inst)
    return Dockerfile(global_args, stages, path.read_text())


# --- .dockerignore, with Docker's semantics --------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
            continue
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out)


@cache
def ignore_patterns(path: Path = DOCKERIGNORE) -> tuple[tuple[bool, re.Pattern[str]], ...]:
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        line = str(Path(line)) if line not in ("", ".") else line
        patterns.append((negate, _pattern_regex(line)))
    return tuple(patterns)


def is_ignored(relpath: str) -> bool:
    """Whether the build context leaves out `relpath` (a file or dir, relative to the root).

    As Docker's PatternMatcher: patterns apply in order, the last one matching wins,
    and a pattern matching a parent directory matches everything below it.
    """
    parts = Path(relpath).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, regex in ignore_patterns():
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


@cache
def tracked_files() -> tuple[str, ...]:
    """Files a fresh clone has (what a CI or a user builds from), relative to the root."""
    out = subprocess.run(
        ["git", "ls-files", "--cached"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return tuple(line for line in out.stdout.splitlines() if (ROOT / line).exists())
