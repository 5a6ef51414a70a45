"""Data integrity against a real PostgreSQL: least-privilege roles (what a service's
own connection can and cannot do), the append-only, hash-chained audit log that
`vigil audit verify` checks, and a backup restored into a fresh database with
everything in it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from vigil import testing as harness
from vigil.core import roles
from vigil.core.embedded import bin_dir
from vigil.testing import LocalServer, local_server
from vigil.v1 import tasks_pb2 as tpb

# Spawns real processes (servers, agents, the CLI, pg_dump): not in `make test-fast`.
pytestmark = pytest.mark.slow

TIMINGS = harness.fast_timings(task_ack_timeout_ms=400, task_pending_timeout_ms=400)


def as_role(url: str, role: str) -> str:
    return roles.service_url(url, role, login=True)


async def refused(conn: asyncpg.Connection, sql: str) -> str:
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.execute(sql)
    return err.value.sqlstate or ""


@pytest.fixture
async def srv(db_url: str) -> AsyncIterator[LocalServer]:
    async with local_server(db_url, TIMINGS) as s:
        yield s


async def _some_work(srv: LocalServer, tmp: Path) -> dict[str, str]:
    """Tasks in every status, by real agents and people: {status: task id}."""
    await harness.make_room(srv, "room", "a", "b", "c", "d", "e")
    ids: dict[str, str] = {}
    async with harness.client(srv.addr) as admin:
        # completed (claimed by wait-for-task, completed by a person)
        done = await admin.send("room", "a", "finish me")
        agent = harness.spawn_agent(srv.addr, "room", "a", tmp)
        assert await asyncio.to_thread(agent.proc.wait, 15) == 0
        await admin.complete_task(done.id, 0)
        ids["completed"] = done.id
        # closed
        closed = await admin.send("room", "b", "never mind")
        await admin.cancel_task(closed.id, "duplicate")
        ids["closed"] = closed.id
        # acknowledged: claimed, and released and claimed again (attempt 1)
        acked = await admin.send("room", "c", "take me twice")
        for _ in range(2):
            agent = harness.spawn_agent(srv.addr, "room", "c", tmp)
            assert await asyncio.to_thread(agent.proc.wait, 15) == 0
            if _ == 0:
                await admin.release_task(acked.id, "not now")
        ids["acknowledged"] = acked.id
        # in_progress
        started = await admin.send("room", "d", "start me")
        agent = harness.spawn_agent(srv.addr, "room", "d", tmp)
        assert await asyncio.to_thread(agent.proc.wait, 15) == 0
        await admin.start_task(started.id, 0)
        ids["in_progress"] = started.id
        ids["queued"] = (await admin.send("room", "d", "wait your turn")).id  # behind it
        # pending, past its timeout with nobody live: a notification
        ids["pending"] = (await admin.send("room", "e", "anyone?")).id

        async def noticed() -> bool:
            return any(n.role == "e" for n in await admin.list_notifications())

        await harness.wait_for(noticed, 10, what="the pending_timeout notification")
        for status, task_id in ids.items():
            task = await admin.get_task(task_id)
            assert tpb.TaskStatus.Name(task.status) == f"TASK_STATUS_{status.upper()}"
    return ids


async def vigil_run(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI, without blocking the event loop (which may host the server)."""
    return await asyncio.to_thread(
        subprocess.run,
        harness.vigil_cmd(*args),
        env=harness.child_env({"VIGIL_ADDR": addr}),
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- roles -----------------------------------------------------------------------------


async def test_each_service_connects_as_a_role_that_cannot_rewrite_history(
    srv: LocalServer, db_url: str, tmp: Path
) -> None:
    ids = await _some_work(srv, tmp)
    admin = await asyncpg.connect(db_url)
    try:
        # The running services hold connections as their own roles, not as the owner.
        users = {
            r["usename"]
            for r in await admin.fetch(
                "SELECT usename FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        }
        assert {"vigil_tasks", "vigil_liveness"} <= users and "postgres" not in users
        # Even the owner cannot edit the audit log without disabling its trigger.
        assert await refused(admin, "DELETE FROM tasks.transitions") == "VG002"
        assert await refused(admin, "UPDATE tasks.transitions SET actor = 'x'") == "VG002"
        assert await refused(admin, "TRUNCATE tasks.transitions") == "VG002"
    finally:
        await admin.close()

    tasks = await asyncpg.connect(as_role(db_url, roles.TASKS))
    try:
        assert await tasks.fetchval("SELECT count(*) FROM tasks.transitions") > 0
        for sql in (
            "DELETE FROM tasks.transitions",
            "UPDATE tasks.transitions SET actor = 'admin:mallory'",
            "TRUNCATE tasks.transitions",
            "DELETE FROM tasks.tasks",
            "UPDATE tasks.fsm_rules SET increments_attempt = false",
            "CREATE TABLE tasks.evil (x int)",
            "ALTER TABLE tasks.tasks DROP COLUMN text",
            "DROP TABLE tasks.notifications",
            "SELECT * FROM liveness.participants",
            "DELETE FROM public.vigil_migrations",
        ):
            assert await refused(tasks, sql) == "42501", sql  # insufficient privilege
        # A status change outside the FSM is refused by the FSM's trigger.
        sql = f"UPDATE tasks.tasks SET status = 'completed' WHERE id = '{ids['pending']}'"
        assert await refused(tasks, sql) == "VG001"
    finally:
        await tasks.close()

    live = await asyncpg.connect(as_role(db_url, roles.LIVENESS))
    try:
        assert await live.fetchval("SELECT count(*) FROM liveness.participants") > 0
        for sql in (
            "SELECT * FROM tasks.tasks",
            "UPDATE auth.tokens SET revoked_at = NULL",
            "DELETE FROM liveness.participants",
            "CREATE TABLE liveness.evil (x int)",
        ):
            assert await refused(live, sql) == "42501", sql
    finally:
        await live.close()

    reader = await asyncpg.connect(as_role(db_url, roles.READONLY))
    try:
        assert await reader.fetchval("SELECT count(*) FROM tasks.tasks") == 6
        assert await reader.fetchval("SELECT count(*) FROM auth.tokens") >= 1
        for sql in (
            "SELECT secret_sha256 FROM auth.tokens",
            "INSERT INTO tasks.chatrooms (chatroom) VALUES ('x')",
            "UPDATE liveness.participants SET status = 'offline'",
        ):
            assert await refused(reader, sql) == "42501", sql
    finally:
        await reader.close()


# -- the audit log -----------------------------------------------------------------------


async def by_hand(owner: asyncpg.Connection, sql: str, *args: object) -> None:
    """What only the owner can do, deliberately: switch the guard off, edit, switch on."""
    async with owner.transaction():
        await owner.execute("ALTER TABLE tasks.transitions DISABLE TRIGGER append_only")
        await owner.execute(sql, *args)
        await owner.execute("ALTER TABLE tasks.transitions ENABLE TRIGGER append_only")


async def test_audit_verify_passes_then_names_the_row_the_owner_edited(
    srv: LocalServer, db_url: str, tmp: Path
) -> None:
    ids = await _some_work(srv, tmp)
    ok = await vigil_run(srv.addr, "audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("audit log whole: 6 task(s), ")
    verified = json.loads((await vigil_run(srv.addr, "audit", "verify", "--json")).stdout)
    assert verified["ok"] and verified["transitions_checked"] >= 8
    assert srv.registry.get_sample_value("vigil_audit_verified") == 1

    owner = await asyncpg.connect(db_url)
    try:
        row = await owner.fetchrow(
            "SELECT id, actor FROM tasks.transitions WHERE task_id = $1 ORDER BY id LIMIT 1",
            ids["acknowledged"],
        )
        assert row is not None
        # The owner edits one audit row by hand (it has to disable the guard first).
        await by_hand(
            owner, "UPDATE tasks.transitions SET actor = 'admin:mallory' WHERE id = $1", row["id"]
        )
        broken = await vigil_run(srv.addr, "audit", "verify")
        assert broken.returncode == 1
        assert broken.stderr.strip().splitlines() == [
            f"vigil: error: audit log broken at row {row['id']} of task {ids['acknowledged']}: "
            "its content does not match its hash (edited)"
        ]
        assert srv.registry.get_sample_value("vigil_audit_verified") == 0
        # Another task's chain alone is still whole.
        one = await vigil_run(srv.addr, "audit", "verify", "--task", ids["completed"])
        assert one.returncode == 0 and "1 task(s)" in one.stdout

        # Put it back: whole again. Then remove the last row of a chain instead.
        await by_hand(
            owner, "UPDATE tasks.transitions SET actor = $1 WHERE id = $2", row["actor"], row["id"]
        )
        assert (await vigil_run(srv.addr, "audit", "verify")).returncode == 0
        await by_hand(
            owner,
            "DELETE FROM tasks.transitions WHERE id = "
            "(SELECT max(id) FROM tasks.transitions WHERE task_id = $1)",
            uuid.UUID(ids["in_progress"]),
        )
        tail = await vigil_run(srv.addr, "audit", "verify")
        assert tail.returncode == 1 and ids["in_progress"] in tail.stderr
        assert "later rows were removed" in tail.stderr
    finally:
        await owner.close()


# -- backup and restore --------------------------------------------------------------------


def _lasting(t: tpb.Task) -> tuple[object, ...]:
    """What a task is, without its deadline (a running scheduler re-arms it)."""
    return (t.status, t.attempt, t.recoveries, t.text, t.sent_by, t.claimed_by, t.created_at)


async def test_a_backup_restores_into_a_fresh_database_whole_and_verified(
    db_url: str, pg_admin_url: str, tmp: Path
) -> None:
    dump = tmp / "vigil.dump"
    async with local_server(db_url, TIMINGS) as srv:
        ids = await _some_work(srv, tmp)
        async with harness.client(srv.addr) as admin:
            before_tasks = {t.id: _lasting(t) for t in await admin.list_tasks()}
            before_history = {i: len(await admin.task_history(i)) for i in ids.values()}
            before_notes = [n.id for n in await admin.list_notifications()]
        # The documented backup, taken while Vigil runs.
        subprocess.run(
            [str(bin_dir() / "pg_dump"), "--format=custom", f"--file={dump}", db_url],
            check=True,
            capture_output=True,
        )

    # The documented restore: a new database, pg_restore as the owner, `vigil migrate`.
    fresh = await harness.create_database_from(pg_admin_url, "template0")
    subprocess.run(
        [str(bin_dir() / "pg_restore"), "--no-owner", "--no-acl", f"--dbname={fresh}", str(dump)],
        check=True,
        capture_output=True,
    )
    env = harness.child_env({"DATABASE_URL": fresh})
    migrated = subprocess.run(
        harness.vigil_cmd("migrate"), env=env, capture_output=True, text=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "migrations applied: none" in migrated.stdout  # the dump had them all
    server = harness.start_server_process(
        ["up", "--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--no-ui"],
        {**env, "VIGIL_MIGRATE": "0"},
        tmp / "restored.log",
    )
    try:
        async with harness.client(server.addr) as admin:
            after = {t.id: _lasting(t) for t in await admin.list_tasks()}
            assert after == before_tasks
            for task_id, n in before_history.items():
                assert len(await admin.task_history(task_id)) == n
            assert [n.id for n in await admin.list_notifications()] == before_notes
        verified = await vigil_run(server.addr, "audit", "verify")
        assert verified.returncode == 0, verified.stderr
        assert "6 task(s)" in verified.stdout
    finally:
        assert server.stop(signal.SIGTERM) == 0
