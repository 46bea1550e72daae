"""The adapters' import rule: nothing outside `server.protocols` imports an adapter, and
the adapters don't import each other: gRPC v1 (`protocols.v1`), gRPC v2
(`protocols.v2.servicer`) and HTTP (`protocols.http` with `protocols.v2.rest`) share only
the v2 codec (`protocols.v2.request`, `tensors`, `describe`, `stats`), `protocols.calls`
(the gRPC streams) and `protocols.shared`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.test_layers import SERVER, _imports, _name

ADAPTERS = {
    "server.protocols.v1": "v1",
    "server.protocols.v2.servicer": "v2",
    "server.protocols.http": "http",
    "server.protocols.http_gate": "http",
    "server.protocols.http_body": "http",
    "server.protocols.http_answers": "http",
    "server.protocols.v2.rest": "http",
}


MODULES = sorted(SERVER.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_adapter_imports_another_and_nothing_imports_an_adapter(path: Path) -> None:
    module = _name(path)
    own = ADAPTERS.get(module)
    allowed = {"server.app"}  # the app registers every adapter
    for imported in _imports(path):
        other = ADAPTERS.get(imported)
        if other is None or other == own or module in allowed:
            continue
        pytest.fail(f"{module} imports the {other} adapter ({imported})")
