"""Triton's logging extension: LogSettings over gRPC and ``/v2/logging`` over HTTP, through
tritonclient, change the server's log level at run time, behind the bearer token."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.errors import InvalidInput
from server.logs import log_settings, update_log_settings
from tests.fixtures.servers import InProcessServer
from tests.reliability.repos import derive

TOKEN = "log-settings-token-7c1d"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def root_level() -> Iterator[None]:
    """The in-process server shares this process's root logger: INFO, as `resnet-serve
    serve` starts, then put back."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    yield
    logging.getLogger().setLevel(level)


@pytest.fixture
def server(
    model_repo: Path, tmp_path: Path, inprocess_factory: Callable[..., InProcessServer],
    root_level: None,
) -> InProcessServer:  # fmt: skip
    repo = tmp_path / "repo"
    derive(repo, model_repo / "cifar")
    return inprocess_factory(repo, "--auth-token", TOKEN)


def test_grpc_reads_and_changes_the_level(server: InProcessServer) -> None:
    with grpcclient.InferenceServerClient(server.address) as client:
        settings = client.get_log_settings(headers=AUTH, as_json=True)["settings"]
        assert settings["log_info"]["bool_param"] is True
        assert "logging" in client.get_server_metadata(headers=AUTH).extensions
        client.update_log_settings({"log_verbose_level": 1}, headers=AUTH)
        assert logging.getLogger().level == logging.DEBUG
        client.update_log_settings({"log_verbose_level": 0, "log_info": False}, headers=AUTH)
        assert logging.getLogger().level == logging.WARNING
        with pytest.raises(InferenceServerException, match="unknown log setting 'log_colour'"):
            client.update_log_settings({"log_colour": True}, headers=AUTH)
        with pytest.raises(InferenceServerException, match="missing bearer token"):
            client.update_log_settings({"log_info": True})
    assert logging.getLogger().level == logging.WARNING  # the refused calls changed nothing


def test_http_reads_and_changes_the_level(server: InProcessServer) -> None:
    assert server.http_url is not None
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        assert client.get_log_settings(headers=AUTH)["log_error"] is True
        answer = client.update_log_settings({"log_warning": False, "log_info": False},
                                            headers=AUTH)  # fmt: skip
        assert answer["log_warning"] is False and answer["log_error"] is True
        assert logging.getLogger().level == logging.ERROR
        with pytest.raises(InferenceServerException, match="must be true or false"):
            client.update_log_settings({"log_error": "yes"}, headers=AUTH)
        with pytest.raises(InferenceServerException, match="missing bearer token"):
            client.get_log_settings()
    finally:
        client.close()


def test_nothing_applies_unless_every_setting_is_valid(root_level: None) -> None:
    logging.getLogger().setLevel(logging.INFO)
    with pytest.raises(InvalidInput, match="'log_file' is '/tmp/x'"):
        update_log_settings({"log_verbose_level": 1, "log_file": "/tmp/x"})
    assert logging.getLogger().level == logging.INFO
    assert update_log_settings({"log_error": False, "log_warning": False, "log_info": False})[
        "log_error"] is False  # fmt: skip
    assert logging.getLogger().level == logging.CRITICAL
    assert log_settings()["log_verbose_level"] == 0
