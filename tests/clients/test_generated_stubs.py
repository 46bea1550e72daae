"""The committed stubs are what protos/generate.py makes of protos/ today."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "clients" / "python" / "resnet_serve_client" / "proto"


def _generate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    _generate_module().generate(tmp_path)
    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert sorted(fresh) == sorted(committed)
    changed = [name for name in fresh if fresh[name] != committed[name]]
    assert not changed, f"run `make protos` and commit: {changed}"


def test_inference_stubs_use_their_own_pool() -> None:
    for name in ("grpc_service_pb2.py", "model_config_pb2.py"):
        text = (COMMITTED / "inference" / name).read_text()
        assert "_pool.POOL.AddSerializedFile(" in text
        assert "_descriptor_pool.Default()" not in text
