"""Fixtures shared by the integration tests that need more than the common ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.core.embedded import EmbeddedPostgres


@pytest.fixture
def stream_failures() -> Iterator[harness.StreamFailures]:
    """When this process's clients noticed their session stream fail."""
    with harness.stream_failures() as recorded:
        yield recorded


@pytest.fixture
async def own_pg(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL of the test's own (to stop and start), and a migrated database on it."""
    pg = EmbeddedPostgres(tmp_path / "own")
    url = await asyncio.to_thread(pg.start)
    await harness.not_durable(url)
    await harness.create_template(url, "vigil_outage")
    try:
        yield pg, harness.with_database(url, "vigil_outage")
    finally:
        await asyncio.to_thread(pg.stop)
