"""The `tasks` schema on a real PostgreSQL: the database refuses every status change
that is not an FSM rule declared by the transaction, and audits every one it allows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from vigil import testing as harness
from vigil.core import migrations
from vigil.task_service import fsm

pytestmark = pytest.mark.asyncio(loop_scope="module")

MIGRATIONS = Path(fsm.__file__).with_name("migrations")
NOW = datetime(2026, 1, 1, tzinfo=UTC)

SET_FSM = """SELECT set_config('vigil.fsm_trigger', $1, true),
                    set_config('vigil.fsm_actor', $2, true),
                    set_config('vigil.fsm_reason', $3, true)"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(pg_admin_url: str) -> AsyncIterator[asyncpg.Pool]:
    name = f"vigil_tasks_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    db_pool = await asyncpg.create_pool(
        harness.with_database(pg_admin_url, name), min_size=1, max_size=4
    )
    assert db_pool is not None
    try:
        every = migrations.discover("tasks", MIGRATIONS)
        applied = await migrations.apply(db_pool, every)
        assert [(m.service, m.version) for m in applied] == [("tasks", m.version) for m in every]
        yield db_pool
    finally:
        await db_pool.close()
        admin = await asyncpg.connect(pg_admin_url)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def new_task(
    conn: asyncpg.Connection, *, status: str = "pending", kind: str = "remote"
) -> uuid.UUID:
    """A fresh chatroom with one role and one task in it; returns the task id."""
    chatroom = f"room-{uuid.uuid4().hex[:8]}"
    await conn.execute("INSERT INTO tasks.chatrooms (chatroom) VALUES ($1)", chatroom)
    await conn.execute(
        "INSERT INTO tasks.roles (chatroom, role, kind, machine, command) "
        "VALUES ($1, 'builder', $2, $3, $4)",
        chatroom,
        kind,
        "machine-1" if kind == "remote" else None,
        "claude" if kind == "remote" else None,
    )
    deadline = NOW + timedelta(minutes=5) if status == "pending" else None
    task_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO tasks.tasks (chatroom, role, text, status, deadline_at) "
        "VALUES ($1, 'builder', 'build it', $2, $3) RETURNING id",
        chatroom,
        status,
        deadline,
    )
    return task_id


async def fire(
    conn: asyncpg.Connection,
    task_id: uuid.UUID,
    trigger: str | None,
    to_status: str,
    *,
    attempt_delta: int = 0,
    assigned_to: str | None = "conn-1",
    deadline_at: datetime | None = None,
    actor: str = "agent:builder",
    reason: str = "test",
) -> None:
    """One status change the way the FSM writer does it: declare, then one UPDATE."""
    async with conn.transaction():
        if trigger is not None:
            await conn.execute(SET_FSM, trigger, actor, reason)
        await conn.execute(
            "UPDATE tasks.tasks SET status = $2, attempt = attempt + $3, assigned_to = $4, "
            "deadline_at = $5 WHERE id = $1",
            task_id,
            to_status,
            attempt_delta,
            assigned_to,
            deadline_at,
        )


async def status_of(conn: asyncpg.Connection, task_id: uuid.UUID) -> tuple[str, int]:
    row = await conn.fetchrow("SELECT status, attempt FROM tasks.tasks WHERE id = $1", task_id)
    assert row is not None
    return row["status"], row["attempt"]


async def audit_of(conn: asyncpg.Connection, task_id: uuid.UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT * FROM tasks.transitions WHERE task_id = $1 ORDER BY id", task_id
    )
    return rows


def refused(info: pytest.ExceptionInfo[asyncpg.PostgresError]) -> str:
    assert info.value.sqlstate == fsm.DB_REFUSED_SQLSTATE, info.value
    return str(info.value)


async def test_fsm_rules_equal_the_python_table(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        "SELECT from_status, to_status, trigger, increments_attempt FROM tasks.fsm_rules"
    )
    assert sorted(fsm.Rule(*r) for r in rows) == sorted(fsm.RULES)


async def test_a_pending_task_can_be_created(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        row = await conn.fetchrow("SELECT * FROM tasks.tasks WHERE id = $1", task_id)
        assert row is not None
        assert (row["status"], row["attempt"], row["recoveries"]) == ("pending", 0, 0)
        assert row["deadline_at"] == NOW + timedelta(minutes=5)
        # Creation is not a transition.
        assert await audit_of(conn, task_id) == []


async def test_a_queued_task_can_be_created(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn, status="queued")
        assert await status_of(conn, task_id) == ("queued", 0)


@pytest.mark.parametrize("status", ["acknowledged", "in_progress", "completed", "closed"])
async def test_a_task_cannot_be_created_past_waiting(pool: asyncpg.Pool, status: str) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError) as info:
            await new_task(conn, status=status)
        assert status in refused(info)


async def test_a_task_is_created_on_its_first_attempt(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        chatroom_task = await new_task(conn)
        chatroom = await conn.fetchval(
            "SELECT chatroom FROM tasks.tasks WHERE id = $1", chatroom_task
        )
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(
                "INSERT INTO tasks.tasks (chatroom, role, text, status, attempt, deadline_at) "
                "VALUES ($1, 'builder', 'x', 'pending', 2, $2)",
                chatroom,
                NOW,
            )
        refused(info)


async def test_a_remote_role_needs_a_machine(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO tasks.chatrooms (chatroom) VALUES ('no-machine')")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "INSERT INTO tasks.roles (chatroom, role, kind) VALUES "
                "('no-machine', 'builder', 'remote')"
            )
        await conn.execute(
            "INSERT INTO tasks.roles (chatroom, role, kind) VALUES "
            "('no-machine', 'builder', 'custom')"
        )


async def test_a_direct_status_update_is_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(
                "UPDATE tasks.tasks SET status = 'completed', deadline_at = NULL WHERE id = $1",
                task_id,
            )
        message = refused(info)
        assert "pending" in message and "completed" in message
        assert await status_of(conn, task_id) == ("pending", 0)
        assert await audit_of(conn, task_id) == []


async def test_a_valid_pair_without_declared_trigger_is_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        with pytest.raises(asyncpg.PostgresError) as info:
            await fire(conn, task_id, None, "closed")
        message = refused(info)
        assert "vigil.fsm_trigger" in message
        assert "pending" in message and "closed" in message
        assert await status_of(conn, task_id) == ("pending", 0)


async def test_a_valid_transition_is_audited_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        ack_deadline = NOW + timedelta(minutes=2)
        await fire(
            conn,
            task_id,
            "claimTask",
            "acknowledged",
            deadline_at=ack_deadline,
            actor="participant:conn-1",
            reason="delivered to wait-for-task",
        )
        assert await status_of(conn, task_id) == ("acknowledged", 0)
        audit = await audit_of(conn, task_id)
        assert len(audit) == 1
        row = audit[0]
        assert (row["from_status"], row["to_status"], row["trigger"]) == (
            "pending",
            "acknowledged",
            "claimTask",
        )
        assert row["actor"] == "participant:conn-1"
        assert row["reason"] == "delivered to wait-for-task"
        assert row["attempt"] == 0
        assert row["at"] is not None


async def test_a_whole_lifecycle_is_audited_step_by_step(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        await fire(conn, task_id, "claimTask", "acknowledged", deadline_at=NOW)
        await fire(conn, task_id, "startTask", "in_progress")
        await fire(conn, task_id, "recoverOrphaned", "pending", attempt_delta=1, deadline_at=NOW)
        await fire(conn, task_id, "claimTask", "acknowledged", deadline_at=NOW)
        await fire(conn, task_id, "completeTask", "completed")
        assert await status_of(conn, task_id) == ("completed", 1)
        audit = await audit_of(conn, task_id)
        assert [(r["trigger"], r["attempt"]) for r in audit] == [
            ("claimTask", 0),
            ("startTask", 0),
            ("recoverOrphaned", 1),
            ("claimTask", 1),
            ("completeTask", 1),
        ]


async def fire_steps(
    conn: asyncpg.Connection,
    task_id: uuid.UUID,
    steps: list[tuple[str, str, str]],
    to_status: str,
    *,
    attempt_delta: int = 0,
    deadline_at: datetime | None = None,
) -> None:
    """Several status changes in one UPDATE, declared as steps (tasks.declare_fsm_steps)."""
    async with conn.transaction():
        await conn.execute("SELECT tasks.declare_fsm_steps($1::text[])", [list(s) for s in steps])
        await conn.execute(
            "UPDATE tasks.tasks SET status = $2, attempt = attempt + $3, assigned_to = 'conn-1', "
            "deadline_at = $4 WHERE id = $1",
            task_id,
            to_status,
            attempt_delta,
            deadline_at,
        )


async def test_declared_steps_are_checked_and_audited_one_by_one(pool: asyncpg.Pool) -> None:
    # One UPDATE takes a queued task through three rules; each is audited as if it had
    # been its own UPDATE, chained in order, with its own actor and reason.
    async with pool.acquire() as conn:
        task_id = await new_task(conn, status="queued")
        await fire_steps(
            conn,
            task_id,
            [
                ("promoteNextTask", "vigil", "the role's active task ended"),
                ("claimTask", "agent:builder", "claimed by c"),
                ("startTask", "agent:builder", "started"),
            ],
            "in_progress",
        )
        assert await status_of(conn, task_id) == ("in_progress", 0)
        audit = await audit_of(conn, task_id)
        assert [
            (r["from_status"], r["to_status"], r["trigger"], r["actor"], r["reason"])
            for r in audit
        ] == [
            ("queued", "pending", "promoteNextTask", "vigil", "the role's active task ended"),
            ("pending", "acknowledged", "claimTask", "agent:builder", "claimed by c"),
            ("acknowledged", "in_progress", "startTask", "agent:builder", "started"),
        ]  # fmt: skip
        assert audit[0]["prev_hash"] is None
        assert [r["prev_hash"] for r in audit[1:]] == [r["hash"] for r in audit[:-1]]
        assert audit[0]["at"] < audit[1]["at"] < audit[2]["at"]
        # The next single change chains on the last step.
        await fire(conn, task_id, "completeTask", "completed")
        assert (await audit_of(conn, task_id))[3]["prev_hash"] == audit[2]["hash"]


@pytest.mark.parametrize(
    ("steps", "to_status", "words"),
    [
        # startTask is no rule from queued.
        ([("startTask", "a", "r")], "in_progress", ["queued", "startTask", "step 1 of 1"]),
        # Each step leaves from where the last one left the task.
        (
            [("promoteNextTask", "vigil", "r"), ("startTask", "a", "r")],
            "in_progress",
            ["pending", "startTask", "step 2 of 2"],
        ),
        # The steps must end where the UPDATE puts the task.
        (
            [("promoteNextTask", "vigil", "r"), ("claimTask", "a", "r")],
            "in_progress",
            ["acknowledged", "in_progress"],
        ),
        # Every step names an actor.
        ([("promoteNextTask", "", "r")], "pending", ["vigil.fsm_actor"]),
        # Declared steps do not let a status stand still with its attempt moved.
        ([("promoteNextTask", "vigil", "r")], "queued", ["pending", "queued"]),
    ],
)
async def test_declared_steps_that_are_not_the_fsm_are_refused(
    pool: asyncpg.Pool, steps: list[tuple[str, str, str]], to_status: str, words: list[str]
) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn, status="queued")
        with pytest.raises(asyncpg.PostgresError) as info:
            await fire_steps(conn, task_id, steps, to_status)
        message = refused(info)
        assert all(w in message for w in words), message
        assert await status_of(conn, task_id) == ("queued", 0)
        assert await audit_of(conn, task_id) == []


async def test_declared_steps_must_make_the_attempt_they_write(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        await fire(conn, task_id, "claimTask", "acknowledged", deadline_at=NOW)
        await fire(conn, task_id, "startTask", "in_progress")
        steps = [("recoverOrphaned", "vigil", "gone"), ("claimTask", "agent:b", "again")]
        with pytest.raises(asyncpg.PostgresError) as info:
            await fire_steps(conn, task_id, steps, "acknowledged", deadline_at=NOW)
        assert "attempt must go from 0 to 1" in refused(info)
        await fire_steps(conn, task_id, steps, "acknowledged", attempt_delta=1, deadline_at=NOW)
        assert await status_of(conn, task_id) == ("acknowledged", 1)
        audit = await audit_of(conn, task_id)
        assert [(r["trigger"], r["attempt"]) for r in audit] == [
            ("claimTask", 0),
            ("startTask", 0),
            ("recoverOrphaned", 1),
            ("claimTask", 1),
        ]


async def test_declared_steps_are_the_next_statement_exactly(pool: asyncpg.Pool) -> None:
    declare = "SELECT tasks.declare_fsm_steps($1::text[])"
    promote = [["promoteNextTask", "vigil", "r"]]
    to_pending = "UPDATE tasks.tasks SET status = 'pending', deadline_at = $2 WHERE id = $1"
    async with pool.acquire() as conn:
        task_id = await new_task(conn, status="queued")
        # Declared steps are made by the next UPDATE or refused: one that moves no
        # status does not pass them by (a recovery, claim and start ends where it began).
        with pytest.raises(asyncpg.PostgresError) as info:
            async with conn.transaction():
                await conn.execute(declare, promote)
                await conn.execute("UPDATE tasks.tasks SET text = 'x' WHERE id = $1", task_id)
        assert "writes queued" in refused(info)
        # And they cover that one statement only.
        with pytest.raises(asyncpg.PostgresError) as info:
            async with conn.transaction():
                await conn.execute(declare, promote)
                await conn.execute(to_pending, task_id, NOW)
                await conn.execute(
                    "UPDATE tasks.tasks SET status = 'closed', deadline_at = NULL WHERE id = $1",
                    task_id,
                )
        assert "vigil.fsm_trigger" in refused(info)
        assert await status_of(conn, task_id) == ("queued", 0)


async def test_an_invalid_pair_with_a_trigger_is_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        with pytest.raises(asyncpg.PostgresError) as info:
            await fire(conn, task_id, "startTask", "completed")
        message = refused(info)
        assert "pending" in message and "completed" in message
        assert await status_of(conn, task_id) == ("pending", 0)
        assert await audit_of(conn, task_id) == []


async def test_a_trigger_naming_another_rule_is_refused(pool: asyncpg.Pool) -> None:
    # pending -> acknowledged is a rule, but not cancelTask's.
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        with pytest.raises(asyncpg.PostgresError) as info:
            await fire(conn, task_id, "cancelTask", "acknowledged", deadline_at=NOW)
        assert "cancelTask" in refused(info)


async def test_a_transition_must_name_an_actor(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        with pytest.raises(asyncpg.PostgresError) as info:
            await fire(conn, task_id, "cancelTask", "closed", actor="")
        assert "vigil.fsm_actor" in refused(info)


async def test_recovery_must_increment_the_attempt(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        await fire(conn, task_id, "claimTask", "acknowledged", deadline_at=NOW)
        with pytest.raises(asyncpg.PostgresError) as info:
            await fire(conn, task_id, "recoverStuckAcknowledged", "pending", deadline_at=NOW)
        assert "attempt" in refused(info)
        await fire(
            conn,
            task_id,
            "recoverStuckAcknowledged",
            "pending",
            attempt_delta=1,
            deadline_at=NOW,
        )
        assert await status_of(conn, task_id) == ("pending", 1)


async def test_a_claim_must_not_change_the_attempt(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        with pytest.raises(asyncpg.PostgresError) as info:
            await fire(conn, task_id, "claimTask", "acknowledged", attempt_delta=1, deadline_at=NOW)
        assert "attempt" in refused(info)


async def test_the_attempt_never_moves_on_its_own(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute("UPDATE tasks.tasks SET attempt = 5 WHERE id = $1", task_id)
        refused(info)


async def test_other_columns_change_without_a_trigger(pool: asyncpg.Pool) -> None:
    # Re-arming a deadline is not a transition and needs no declaration.
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        later = NOW + timedelta(minutes=10)
        await conn.execute("UPDATE tasks.tasks SET deadline_at = $2 WHERE id = $1", task_id, later)
        assert (
            await conn.fetchval("SELECT deadline_at FROM tasks.tasks WHERE id = $1", task_id)
            == later
        )
        assert await audit_of(conn, task_id) == []


async def test_a_declared_trigger_covers_one_statement_only(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        first = await new_task(conn)
        second = await new_task(conn)
        with pytest.raises(asyncpg.PostgresError) as info:
            async with conn.transaction():
                await conn.execute(SET_FSM, "claimTask", "agent", "")
                for task_id in (first, second):
                    await conn.execute(
                        "UPDATE tasks.tasks SET status = 'acknowledged', assigned_to = 'c', "
                        "deadline_at = $2 WHERE id = $1",
                        task_id,
                        NOW,
                    )
        assert "vigil.fsm_trigger" in refused(info)
        assert await status_of(conn, first) == ("pending", 0)


async def test_one_statement_may_move_many_tasks_by_one_trigger(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        tasks = [await new_task(conn), await new_task(conn, status="queued")]
        async with conn.transaction():
            await conn.execute(SET_FSM, "cancelTask", "user:alice", "chatroom closed")
            await conn.execute(
                "UPDATE tasks.tasks SET status = 'closed', deadline_at = NULL "
                "WHERE id = ANY($1::uuid[])",
                tasks,
            )
        for task_id in tasks:
            audit = await audit_of(conn, task_id)
            assert [(r["trigger"], r["actor"], r["reason"]) for r in audit] == [
                ("cancelTask", "user:alice", "chatroom closed")
            ]


async def test_in_progress_work_has_no_clock(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        await fire(conn, task_id, "claimTask", "acknowledged", deadline_at=NOW)
        with pytest.raises(asyncpg.CheckViolationError):
            await fire(conn, task_id, "startTask", "in_progress", deadline_at=NOW)


async def test_a_claimed_task_names_its_claimer(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        task_id = await new_task(conn)
        with pytest.raises(asyncpg.CheckViolationError):
            await fire(
                conn, task_id, "claimTask", "acknowledged", assigned_to=None, deadline_at=NOW
            )


async def test_applying_the_migrations_again_changes_nothing(pool: asyncpg.Pool) -> None:
    found = migrations.discover("tasks", MIGRATIONS)
    assert await migrations.apply(pool, found) == []
    assert await migrations.apply(pool, found) == []
    assert await pool.fetchval("SELECT count(*) FROM tasks.fsm_rules") == len(fsm.RULES)
