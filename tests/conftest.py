"""Shared test set-up. Real services (redis-server, PostgreSQL, Prometheus) are started by
fixtures in `tests/fixtures/`, each on a free loopback port in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.redis_cluster",
    "tests.fixtures.postgres_server",
    "tests.fixtures.prometheus_server",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _tokenizer_dir() -> Path:
    """The official tokenizer files shared beside the project (or MAAS_TEST_TOKENIZER_DIR)."""
    configured = os.environ.get("MAAS_TEST_TOKENIZER_DIR")
    return Path(configured) if configured else PROJECT_ROOT.parent / "shared" / "tokenizers"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    path = _tokenizer_dir()
    if not (path / "o200k_base.tiktoken").exists():
        pytest.fail(f"tokenizer files not found in {path}; set MAAS_TEST_TOKENIZER_DIR")
    return path
