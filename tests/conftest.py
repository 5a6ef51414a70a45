"""Fixtures: one embedded PostgreSQL per test session, a migrated template database,
and a fresh database per test cloned from it."""

from __future__ import annotations

import os

# Tests fork agent processes while gRPC is active; the fork handlers only add noise.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
import shutil
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.core.embedded import EmbeddedPostgres

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

TEMPLATE = "vigil_template"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="vigil-test-pg-"))
    server = EmbeddedPostgres(root)
    url = server.start()
    # Throwaway data: durability buys the tests nothing (both settings reload live).
    asyncio.run(harness.not_durable(url))
    asyncio.run(harness.create_template(url, TEMPLATE))
    yield url
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def db_url(pg_admin_url: str) -> AsyncIterator[str]:
    yield await harness.create_database_from(pg_admin_url, TEMPLATE)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(autouse=True)
def nothing_left_running() -> Iterator[None]:
    """A test that fails half-way leaves no server, daemon or agent behind."""
    yield
    harness.kill_leftovers()
