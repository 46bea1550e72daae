"""The generated reference tables (docs/reference.py) match the code they copy."""

from __future__ import annotations

import re

import pytest

from docs import reference
from server.config import Settings, env_var


@pytest.fixture(scope="module")
def generated() -> dict:
    return reference.generate()


def test_documents_are_what_make_docs_writes(generated: dict) -> None:
    stale = [
        str(path.relative_to(reference.ROOT))
        for path, (current, text) in generated.items()
        if current != text
    ]
    assert not stale, f"stale generated tables in {stale}: run `make docs`"


def test_every_setting_has_a_row_with_its_env_var() -> None:
    table = reference.settings_table()
    rows = re.findall(r"^\| `--([a-z-]+)`.*? \| `(RESNET_SERVE_[A-Z_]+)` \|", table, re.M)
    assert [env for _, env in rows] == [env_var(name) for name in Settings.model_fields]
    for flag, env in rows:
        assert env == env_var(flag.replace("-", "_"))


def test_boolean_settings_show_both_flags() -> None:
    table = reference.settings_table()
    assert "| `--reflection` / `--no-reflection` | `RESNET_SERVE_REFLECTION` | `true` |" in table


def test_every_family_of_ours_is_listed() -> None:
    table = reference.metrics_table()
    for family in ("resnet_serve_requests_total", "resnet_serve_build_info",
                   "resnet_serve_thread_cpu_seconds", "resnet_serve_batch_size"):  # fmt: skip
        assert f"| `{family}` |" in table
    assert "| `resnet_serve_requests_total` | counter | `model`, `version`, `code` |" in table
    assert "process_cpu_seconds" not in table


def test_a_block_needs_its_markers() -> None:
    begin, end = reference.markers("settings")
    assert reference.replace(f"a\n{begin}\nold\n{end}\nb", "settings", "new") == (
        f"a\n{begin}\nnew\n{end}\nb"
    )
    with pytest.raises(ValueError):
        reference.replace("no markers here", "settings", "new")
    with pytest.raises(ValueError):
        reference.replace(f"{end}\n{begin}", "settings", "new")
