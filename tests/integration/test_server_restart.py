"""A server going away is not an agent dying: a graceful restart marks nobody
offline and clients resume the same participant; a SIGKILLed replica marks nobody,
and the TTL (checked by another replica) catches clients that never come back."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from vigil import testing as harness
from vigil.core.vocab import AgentKind
from vigil.v1 import tasks_pb2 as tpb

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow

N = 20
# Seconds of TTL: a server process restarts within it.
SLOW_ENV = {"VIGIL_HEARTBEAT_INTERVAL_MS": "500", "VIGIL_HEARTBEAT_TTL_MS": "5000"}


async def _rows(url: str) -> dict[str, asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT * FROM liveness.participants WHERE chatroom = 'room'")
    finally:
        await conn.close()
    return {r["role"]: r for r in rows}


async def _events_since(url: str, revision: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT * FROM liveness.events WHERE revision > $1 ORDER BY revision", revision
        )
    finally:
        await conn.close()


async def _make_room(addr: str, n: int) -> None:
    async with harness.client(addr) as client:
        roles = [tpb.Role(role=f"r{i}", kind=AgentKind.CUSTOM.to_pb()) for i in range(n)]
        await client.create_chatroom("room", roles)


async def test_graceful_restart_resumes_everyone_and_sigkill_leaves_them_to_the_ttl(
    db_url: str, tmp: Path
) -> None:
    env = harness.child_env(
        {"DATABASE_URL": db_url, "VIGIL_METRICS_ADDR": "127.0.0.1:0", **SLOW_ENV}
    )
    serve = ["up", "--addr"]
    # A second replica with no clients: its sweeper is what expires orphans later.
    sweeper = harness.start_server_process([*serve, "127.0.0.1:0"], env, tmp / "b.log")
    first = harness.start_server_process([*serve, "127.0.0.1:0"], env, tmp / "a1.log")
    second: harness.ServerProcess | None = None
    await _make_room(first.addr, N)
    agents = [harness.spawn_agent(first.addr, "room", f"r{i}", tmp, env=SLOW_ENV) for i in range(N)]
    try:

        async def all_live() -> dict[str, asyncpg.Record] | None:
            rows = await _rows(db_url)
            ok = len(rows) == N and all(r["status"] == "live" for r in rows.values())
            return rows if ok else None

        before = await harness.wait_for(all_live, timeout=60, what="20 live participants")
        conn = await asyncpg.connect(db_url)
        revision = await conn.fetchval("SELECT value FROM liveness.revision")
        await conn.close()

        # Graceful restart on the same port.
        assert first.stop(signal.SIGTERM) == 0
        second = harness.start_server_process(
            [*serve, f"127.0.0.1:{first.port}"], env, tmp / "a2.log"
        )

        async def all_resumed() -> bool:
            events = await _events_since(db_url, revision)
            return len({e["role"] for e in events if e["type"] == "resumed"}) == N

        await harness.wait_for(all_resumed, timeout=20, what="every participant resumed")
        events = await _events_since(db_url, revision)
        assert [e for e in events if e["type"] != "resumed"] == []  # no leave, no join
        after = await _rows(db_url)
        for role, row in after.items():
            assert row["status"] == "live"
            assert row["epoch"] == before[role]["epoch"]
            assert row["connection_id"] == before[role]["connection_id"]

        # Now the replica dies hard and does not come back.
        killed_at = datetime.now(UTC)
        second.stop(signal.SIGKILL)

        async def all_offline() -> dict[str, asyncpg.Record] | None:
            rows = await _rows(db_url)
            return rows if all(r["status"] == "offline" for r in rows.values()) else None

        gone = await harness.wait_for(all_offline, timeout=5 + 5, what="expiry by TTL")
        for row in gone.values():
            assert row["offline_reason"] == "ttl_expired"
            # Marked by the deadline (the other replica's sweeper), not at the kill.
            assert row["offline_at"] >= row["ready_until"]
            assert (row["offline_at"] - killed_at).total_seconds() > 5 * 0.5
    finally:
        for a in agents:
            a.proc.kill()
        for a in agents:
            await asyncio.to_thread(a.proc.wait, 10)
        sweeper.stop(signal.SIGTERM)
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop(signal.SIGKILL)
