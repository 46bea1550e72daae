"""Security fixtures: test-time certificates and a one-model repository that starts fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.repos import derive
from tests.security.certs import PKI, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def cifar_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cifar-repo")
    derive(repo, model_repo / "cifar")
    return repo
