"""A send is exactly once across retries: SendMessage's request id makes a repeat (its
answer was lost) return the task the first send created, against real PostgreSQL and a
real server on loopback."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from vigil import testing as harness
from vigil.client import RPCError
from vigil.core.errors import StorageError
from vigil.core.vocab import TaskStatus, TokenKind
from vigil.testing import local_server
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc


async def _send(
    addr: str, text: str, request_id: str, role: str = "builder", token: str | None = None
) -> tpb.Task:
    async with harness.channel(addr, token) as ch:
        return await tpb_grpc.TasksStub(ch).SendMessage(
            tpb.SendMessageRequest(chatroom="room", role=role, text=text, request_id=request_id)
        )


async def _rows(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _tasks_with(url: str, request_id: str) -> list[asyncpg.Record]:
    return await _rows(url, "SELECT * FROM tasks.tasks WHERE request_id = $1", request_id)


async def test_a_repeated_request_id_returns_the_first_task_whatever_its_status(
    db_url: str,
) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder", "reviewer")
        rid = str(uuid.uuid4())
        first = await _send(srv.addr, "fix the flaky test", rid)
        again = await _send(srv.addr, "fix the flaky test", rid)
        assert again.id == first.id and again.status == first.status
        assert again.created_at == first.created_at
        rows = await _tasks_with(db_url, rid)
        assert [str(r["id"]) for r in rows] == [first.id]
        # A task is born unaudited (its first status change writes the first row), and a
        # repeat writes nothing: still no audit row, and the task's chain is whole.
        audit = await _rows(
            db_url, "SELECT * FROM tasks.transitions WHERE task_id = $1", rows[0]["id"]
        )
        assert audit == []
        # Without a request id every send is a task of its own, as before.
        plain = [await _send(srv.addr, "fix the flaky test", "") for _ in range(2)]
        assert plain[0].id != plain[1].id != first.id
        # Whatever happened since: cancelled, its chatroom deleted — the same task.
        async with harness.client(srv.addr) as client:
            await client.delete_chatroom("room", cancel_open=True, reason="done")
            closed = await client.send("room", "builder", "fix the flaky test", request_id=rid)
            assert closed.id == first.id and closed.status == TaskStatus.CLOSED.to_pb()
            verified = await client.verify_audit()
        assert verified.ok, verified
        assert len(await _tasks_with(db_url, rid)) == 1


async def test_twenty_concurrent_identical_sends_make_one_task(db_url: str) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
        rid = str(uuid.uuid4())
        got = await asyncio.gather(*(_send(srv.addr, "once", rid) for _ in range(20)))
        assert len({t.id for t in got}) == 1
        rows = await _tasks_with(db_url, rid)
        assert len(rows) == 1 and rows[0]["status"] == "pending"
        assert (await _rows(db_url, "SELECT count(*) AS n FROM tasks.tasks"))[0]["n"] == 1


async def test_a_request_id_reused_for_another_message_is_refused(db_url: str) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder", "reviewer")
        rid = "job-42:step-3"
        first = await _send(srv.addr, "build it", rid)
        for text, role in (("build it again", "builder"), ("build it", "reviewer")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _send(srv.addr, text, rid, role=role)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "already used for a different message" in (err.value.details() or "")
        assert [str(r["id"]) for r in await _tasks_with(db_url, rid)] == [first.id]
        # Ids are unique per sender: another principal's same id is its own task.
        async with harness.client(srv.addr) as admin:
            other = await admin.create_token(TokenKind.CHATROOM, "other", chatroom="room")
        theirs = await _send(srv.addr, "build it again", rid, token=other.secret)
        assert theirs.id != first.id and theirs.sent_by != first.sent_by
        assert len(await _tasks_with(db_url, rid)) == 2


@pytest.mark.parametrize(
    "bad", ["x" * 129, "-starts-with-a-dash", "has space", "a\x00b", "é", "line\nbreak"]
)
async def test_a_malformed_request_id_is_invalid_argument(db_url: str, bad: str) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _send(srv.addr, "t", bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in (err.value.details() or "")
        assert await _rows(db_url, "SELECT 1 FROM tasks.tasks") == []


async def test_a_send_whose_answer_is_lost_is_retried_with_its_id_and_made_once(
    db_url: str,
) -> None:
    # The replica commits the task, then its answer never arrives (it died): the client
    # sees UNAVAILABLE and sends the same request again, to whichever replica answers.
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
        svc = srv.tasks.svc
        real_send = svc.send
        seen: list[str] = []

        async def commit_then_lose_the_answer(*args: Any) -> Any:
            seen.append(args[4])
            task = await real_send(*args)
            if len(seen) == 1:
                raise StorageError("the replica died after its commit")
            return task

        svc.send = commit_then_lose_the_answer  # type: ignore[method-assign,assignment]
        async with harness.client(srv.addr) as client:
            task = await client.send("room", "builder", "exactly once")
        assert len(seen) == 2 and seen[0] == seen[1] and uuid.UUID(seen[0])
        rows = await _rows(db_url, "SELECT * FROM tasks.tasks")
        assert [str(r["id"]) for r in rows] == [task.id]
        assert rows[0]["request_id"] == seen[0]


async def test_a_send_retried_across_a_server_restart_makes_one_task(db_url: str) -> None:
    # A caller that got an error (the server was down) and sends again with its own id
    # once the server is back gets the first task if it was made, a new one if not.
    port = harness.free_port()
    addr = f"127.0.0.1:{port}"
    rid = str(uuid.uuid4())
    async with local_server(db_url, harness.fast_timings(), addr) as srv:
        await harness.make_room(srv, "room", "builder")
        first = await _send(srv.addr, "survive a restart", rid)
    async with harness.client(addr) as client:
        with pytest.raises(RPCError) as err:
            await client.send("room", "builder", "survive a restart", request_id=rid)
        assert err.value.retryable
    async with local_server(db_url, harness.fast_timings(), addr):
        async with harness.client(addr) as client:
            again = await client.send("room", "builder", "survive a restart", request_id=rid)
    assert again.id == first.id
    assert len(await _tasks_with(db_url, rid)) == 1


@pytest.mark.parametrize("role", ["builder", "reviewer"])
async def test_a_send_racing_an_uncommitted_one_with_its_id_waits_and_gets_its_task(
    db_url: str, role: str
) -> None:
    # The function's race, made deterministic: the first send's transaction is open
    # (its task inserted, not committed) when the second arrives, for the same role (it
    # waits on the role's lock) or another (it waits on the unique index).
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder", "reviewer")
    send = (
        "SELECT (s.task).id, (s.task).role, s.created FROM tasks.send_task("
        "'room', $1, 't', now(), NULL, 'user:x', 'rid-1') s"
    )
    first, second = await asyncpg.connect(db_url), await asyncpg.connect(db_url)
    try:
        tx = first.transaction()
        await tx.start()
        made = await first.fetchrow(send, "builder")
        assert made["created"]
        racing = asyncio.create_task(second.fetchrow(send, role))
        await asyncio.sleep(0.5)
        assert not racing.done()  # waiting for the first to end
        await tx.commit()
        got = await asyncio.wait_for(racing, 10)
        assert not got["created"] and got["id"] == made["id"] and got["role"] == "builder"
        count = await second.fetchval("SELECT count(*) FROM tasks.tasks")
        assert count == 1
    finally:
        await first.close()
        await second.close()


async def test_the_previous_signature_still_sends_during_a_rolling_upgrade(db_url: str) -> None:
    # A replica of the previous version calls the six-argument function.
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
    rows = await _rows(
        db_url,
        "SELECT * FROM tasks.send_task('room', 'builder', 't', now(), NULL, 'user:x')",
    )
    assert len(rows) == 1 and rows[0]["status"] == "pending" and rows[0]["request_id"] is None


async def test_concurrent_sends_share_a_statement_and_each_gets_its_own_answer(
    db_url: str,
) -> None:
    # Sends that arrive while others are in the database go as one statement (a group
    # commit): each still gets exactly its own task, repeat or refusal.
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder", "reviewer", "tester")
        batches: list[int] = []
        sends = srv.tasks.svc.store._sends
        many = sends._many

        async def counted(items: list[Any]) -> Any:
            batches.append(len(items))
            return await many(items)

        sends._many = counted
        roles = ["builder", "reviewer", "tester"]
        firsts = [(roles[k % 3], f"task {k}", str(uuid.uuid4())) for k in range(30)]
        repeats = firsts[:6]  # the same requests again, concurrently
        calls = [*firsts, *repeats, ("nobody", "lost", str(uuid.uuid4()))]
        got = await asyncio.gather(
            *(_send(srv.addr, text, rid, role) for role, text, rid in calls),
            return_exceptions=True,
        )
        assert max(batches) > 1, batches  # they did share statements
        missing = got[-1]
        assert isinstance(missing, grpc.aio.AioRpcError)
        assert missing.code() == grpc.StatusCode.NOT_FOUND, missing
        tasks = got[:-1]
        assert all(isinstance(t, tpb.Task) for t in tasks), tasks
        by_rid: dict[str, set[str]] = {}
        for (role, text, rid), task in zip(calls[:-1], tasks, strict=True):
            assert isinstance(task, tpb.Task)
            assert (task.role, task.text) == (role, text)
            by_rid.setdefault(rid, set()).add(task.id)
        assert all(len(ids) == 1 for ids in by_rid.values()), by_rid  # a repeat: its task
        rows = await _rows(
            db_url,
            "SELECT role, status, count(*) AS n FROM tasks.tasks "
            "WHERE chatroom = 'room' GROUP BY role, status ORDER BY role, status",
        )
        # 30 tasks, once each; one active per role, the rest queued behind it.
        assert [(r["role"], r["status"], r["n"]) for r in rows] == [
            ("builder", "pending", 1),
            ("builder", "queued", 9),
            ("reviewer", "pending", 1),
            ("reviewer", "queued", 9),
            ("tester", "pending", 1),
            ("tester", "queued", 9),
        ]


async def test_sends_to_one_idle_role_at_once_make_one_pending_and_queue_the_rest(
    db_url: str,
) -> None:
    # Sends share the role's lock (0014): twenty separate transactions racing for one
    # idle role — one task comes out pending, the others queued behind it, each once.
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
        store = srv.tasks.svc.store
        clock = srv.tasks.svc.clock

        async def one(k: int) -> Any:
            t = clock.now()
            return await store._send_one(
                ("room", "builder", f"t{k}", t, t, "admin:test", str(uuid.uuid4()))
            )

        # Hold the role as a completion would, so that the sends all wait, then all go
        # at the moment it is let go: each finds the role idle.
        holder = await asyncpg.connect(db_url)
        try:
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM tasks.roles WHERE chatroom = 'room' AND role = 'builder' "
                    "FOR UPDATE"
                )
                sends = [asyncio.create_task(one(k)) for k in range(20)]
                await asyncio.sleep(0.5)
                assert not any(s.done() for s in sends)  # a completion holds sends back
        finally:
            await holder.close()
        got = await asyncio.gather(*sends)
        assert all(g is not None and g[1] for g in got)  # each made its own task
        statuses = sorted(str(g[0].status) for g in got)
        assert statuses == ["pending"] + ["queued"] * 19, statuses
        rows = await _rows(
            db_url, "SELECT status, count(*) AS n FROM tasks.tasks GROUP BY status ORDER BY 1"
        )
        assert [(r["status"], r["n"]) for r in rows] == [("pending", 1), ("queued", 19)]
