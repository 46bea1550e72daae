"""Generate the Python stubs for every .proto under protos/ into the client package.

Writes ``_pb2.py``, ``_pb2_grpc.py`` and ``.pyi`` files under
``clients/python/resnet_serve_client/proto/`` with relative imports, so the
stubs live inside the SDK's namespace and never collide with another
package's top-level ``inference`` module. ``make protos`` runs it; a test runs
it into a temporary directory and diffs the result against the committed files.

The ``inference`` package (the Open Inference Protocol) registers its
descriptors in a pool of its own instead of protobuf's default pool:
tritonclient registers the same ``inference.*`` symbols in the default pool,
and a process importing both would fail with "duplicate symbol". The wire
format does not depend on the pool.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "clients" / "python" / "resnet_serve_client" / "proto"
_IMPORT = re.compile(r"^(from|import) ([\w.]+?)(?: import (\w+_pb2))?( as \w+)?$", re.M)
PRIVATE_POOL_PACKAGES = ("inference",)
_POOL_MODULE = '''"""This package's descriptor pool, apart from protobuf's default pool."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''
_DEFAULT_POOL = "from google.protobuf import descriptor_pool as _descriptor_pool\n"


def _relative_imports(path: Path, out: Path) -> None:
    """Rewrite ``from pkg.sub import x_pb2`` into a relative import inside ``out``."""
    depth = len(path.relative_to(out).parts) - 1
    proto_packages = {p.name for p in out.iterdir() if p.is_dir()}

    def fix(m: re.Match[str]) -> str:
        kind, module, name, alias = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if kind != "from" or name is None or module.split(".")[0] not in proto_packages:
            return m.group(0)
        return f"from {'.' * (depth + 1)}{module} import {name}{alias}"

    path.write_text(_IMPORT.sub(fix, path.read_text()))


def _private_pool(package_dir: Path) -> None:
    """Make the ``_pb2`` modules of one package register in the package's own pool."""
    (package_dir / "_pool.py").write_text(_POOL_MODULE)
    for path in package_dir.glob("*_pb2.py"):
        text = path.read_text()
        text = text.replace(_DEFAULT_POOL, _DEFAULT_POOL + "from . import _pool\n", 1)
        path.write_text(text.replace("_descriptor_pool.Default()", "_pool.POOL"))


def generate(out: Path) -> list[Path]:
    protos = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out.rglob("*.py*") if p.suffix in {".py", ".pyi"})
    directories = {d for p in written for d in p.relative_to(out).parents}
    for directory in directories:
        init = out / directory / "__init__.py"
        if not init.exists():
            init.write_text("")
    for path in written:
        _relative_imports(path, out)
    for package in PRIVATE_POOL_PACKAGES:
        if (out / package).is_dir():
            _private_pool(out / package)
    return sorted(p for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
