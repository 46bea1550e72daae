"""The server's import rule, as docs/architecture.md states it: a module imports only
modules of its own layer or below, and the request path imports no wire format."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"

# docs/architecture.md, "Import rule": keep the two tables the same.
LAYERS = {
    "server.repository": 0,
    "server.config": 1,
    "server.errors": 1,
    "server.logs": 1,
    "server.tracing": 1,
    "server.drain": 1,
    "server.request": 1,
    "server.tensors": 1,
    "server.validation": 2,
    "server.postprocess": 1,
    "server.tls": 1,
    "server.threads": 1,
    "server.shm": 1,
    "server.shared_memory": 2,
    "server.ipc": 1,
    "server.metrics": 2,
    "server.sessions": 2,
    "server.providers": 2,
    "server.preprocess": 2,
    "server.handlers": 2,
    "server.core": 3,
    "server.core.registry": 3,
    "server.core.instances": 3,
    "server.core.health": 3,
    "server.core.batcher": 4,
    "server.core.loader": 5,
    "server.core.policy": 6,
    "server.core.manager": 6,
    "server.request_path": 7,
    "server.context": 7,
    "server.protocols": 8,
    "server.auth": 8,
    "server.interceptors": 8,
    "server.reflection_pool": 8,
    "server.app": 9,
    "server.engine": 9,
    "server.frontend": 9,
    "server.serve": 10,
    "server.cli": 10,
    "server.__main__": 10,
    "server.healthcheck": 10,
}
WIRE = ("grpc", "google.protobuf", "resnet_serve_client.proto")


def _name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    """The layer of `module`: its own entry, or its package's."""
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = sorted(p for p in SERVER.rglob("*.py") if _name(p) != "server")


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_a_module_imports_only_its_layer_or_below(path: Path) -> None:
    module = _name(path)
    own = _layer(module)
    assert own is not None, f"{module} has no layer: add it to docs/architecture.md and LAYERS"
    upward = sorted(
        name
        for name in _imports(path)
        if name.startswith("server.") and (_layer(name) or 0) > own
    )
    assert not upward, f"{module} (layer {own}) imports from a higher layer: {upward}"


def test_the_request_path_imports_no_wire_format() -> None:
    imported = _imports(SERVER / "request_path.py")
    wire = sorted(n for n in imported if n.startswith(WIRE))
    assert not wire, f"server.request_path imports {wire}; messages belong to the adapters"
