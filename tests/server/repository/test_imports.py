"""The contract stands apart: it imports no grpc or ONNX Runtime, and the builder reaches
the server through it alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CONTRACT = "server.repository"
THIRD_PARTY = {"numpy", "PIL", "pydantic"}  # all the contract may import besides the stdlib


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_importing_the_contract_loads_no_grpc_onnxruntime_torch_or_server_internals() -> None:
    probe = (
        "import sys, server.repository\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'onnxruntime', 'torch', 'resnet_serve_client', 'server'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    loaded = result.stdout.split()
    assert CONTRACT in loaded
    assert [m for m in loaded if m != "server" and not within(m, CONTRACT)] == []


def test_the_contract_imports_only_the_stdlib_pydantic_numpy_pillow_and_itself() -> None:
    allowed = set(sys.stdlib_module_names) | THIRD_PARTY
    for path in sorted((ROOT / "server" / "repository").glob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            assert top in allowed or within(module, CONTRACT), f"{path.name} imports {module}"


def test_the_builder_reaches_the_server_only_through_the_contract() -> None:
    paths = sorted((ROOT / "builder").rglob("*.py"))
    assert paths
    offending = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in paths
        for module in imported_modules(path)
        if within(module, "server") and not within(module, CONTRACT)
    ]
    assert offending == []
