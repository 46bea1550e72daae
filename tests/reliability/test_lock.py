"""The lock (requirements/constraints.txt) covers every declared dependency, and the
environment the suite runs in is the one it pins."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "constraints.txt"
# pinned in pyproject.toml itself (torch), or this project's own distributions
UNLOCKED = {"torch", "resnet-serve", "resnet-serve-client"}


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            [specifier] = requirement.specifier
            assert specifier.operator == "==", line
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _declared() -> set[str]:
    names = set()
    for path in (ROOT / "pyproject.toml", ROOT / "clients/python/pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        lists = [project["dependencies"], *project.get("optional-dependencies", {}).values()]
        names.update(canonicalize_name(Requirement(r).name) for group in lists for r in group)
    return names


def test_every_declared_dependency_is_pinned() -> None:
    missing = _declared() - UNLOCKED - set(_pins())
    assert not missing, f"not in {LOCK.name}: {sorted(missing)}; run `make lock UPGRADE=`"


def test_the_environment_is_the_locked_one() -> None:
    differ = {}
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:  # another extra's (the gpu packages)
            continue
        if installed != pinned:
            differ[name] = (installed, pinned)
    assert not differ, f"installed vs locked: {differ}; `make venv` installs the lock"
