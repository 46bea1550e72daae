"""Fixtures of the client tests: the scripted fake (fault injection only) and test images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.fake_classifier import FakeServer
from tests.shared_data import PHOTOS


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def photos() -> Path:
    return PHOTOS
