"""A long-lived session's steps (0010_session_steps.sql): `AgentSession.tasks()` claims
and starts in one step and claims the next task with each completion, one transaction
each, with every guarantee of the separate steps: one audit row per transition, the
attempt fence, claims bound to the live participant, recovery when the session dies."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from vigil import testing as harness
from vigil.client import RPCError
from vigil.core.vocab import TaskStatus
from vigil.testing import local_server
from vigil.testing.agent import COMPLETE
from vigil.v1 import common_pb2
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

PENDING = TaskStatus.PENDING.to_pb()
IN_PROGRESS = TaskStatus.IN_PROGRESS.to_pb()
COMPLETED = TaskStatus.COMPLETED.to_pb()


async def _room(addr: str, *roles: str) -> None:
    async with harness.channel(addr) as ch:
        await tpb_grpc.TasksStub(ch).CreateChatroom(
            tpb.CreateChatroomRequest(
                name="room",
                roles=[
                    tpb.Role(role=r, kind=common_pb2.AGENT_KIND_CUSTOM)
                    for r in roles or ("builder",)
                ],
            )
        )


async def _send(addr: str, text: str, role: str = "builder") -> tpb.Task:
    async with harness.channel(addr) as ch:
        return await tpb_grpc.TasksStub(ch).SendMessage(
            tpb.SendMessageRequest(chatroom="room", role=role, text=text)
        )


async def _history(url: str, task_id: str) -> list[asyncpg.Record]:
    """(trigger, attempt, transaction id) of each audit row of the task, in order."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT trigger, attempt, xmin::text AS tx FROM tasks.transitions "
            "WHERE task_id = $1 ORDER BY id",
            uuid.UUID(task_id),
        )
    finally:
        await conn.close()


async def _verify_audit(addr: str) -> None:
    async with harness.channel(addr) as ch:
        reply = await tpb_grpc.TasksStub(ch).VerifyAudit(tpb.VerifyAuditRequest())
    assert reply.ok, reply.problem


async def test_a_pipelined_session_takes_each_task_in_one_step(db_url: str) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr)
        sent = [await _send(srv.addr, f"t{i}") for i in range(4)]  # 1 pending, 3 queued
        taken: list[tuple[str, int, int]] = []
        async with harness.client(srv.addr) as client:
            streams, unary = harness.count_calls(
                client, "CompleteAndClaimNextStream", "CompleteAndClaimNext"
            )
            async with client.agent("room", "builder", handle_signals=False) as session:
                async for task in session.tasks():
                    taken.append((task.id, task.attempt, task.message.status))
                    await task.start()  # it arrived in progress: nothing left to do
                    await task.complete()
                    if len(taken) == len(sent):
                        break
        # Every step on the client's one CompleteAndClaimNextStream, none unary.
        assert (streams.calls, unary.calls) == (1, 0)
        assert [t[0] for t in taken] == [s.id for s in sent]  # in order, each once
        assert all(attempt == 0 and status == IN_PROGRESS for _, attempt, status in taken)
        histories = [await _history(db_url, s.id) for s in sent]
        assert [h["trigger"] for h in histories[0]] == ["claimTask", "startTask", "completeTask"]
        for before, h in itertools.pairwise(histories):
            assert [r["trigger"] for r in h] == [
                "promoteNextTask",
                "claimTask",
                "startTask",
                "completeTask",
            ]
            # Completing the previous task promoted, claimed and started this one, in the
            # same transaction.
            assert {r["tx"] for r in h[:3]} == {before[-1]["tx"]}
        await _verify_audit(srv.addr)


async def test_a_session_ending_hands_back_the_task_it_claimed_ahead(db_url: str) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr)
        first = await _send(srv.addr, "first")
        second = await _send(srv.addr, "second")
        async with (
            harness.client(srv.addr) as client,
            client.agent("room", "builder", handle_signals=False) as session,
        ):
            async for task in session.tasks():
                assert task.id == first.id
                await task.complete()  # claims `second` for this session
                break
            async with harness.channel(srv.addr) as ch:
                held = await tpb_grpc.TasksStub(ch).GetTask(tpb.GetTaskRequest(id=second.id))
            assert held.status == IN_PROGRESS and held.attempt == 0
        # The session left: the task it never handed out is pending again, released (a
        # hand-back, not a recovery), for whoever comes next.
        async with harness.channel(srv.addr) as ch:
            back = await tpb_grpc.TasksStub(ch).GetTask(tpb.GetTaskRequest(id=second.id))
        assert (back.status, back.attempt, back.recoveries) == (PENDING, 1, 0)
        assert [r["trigger"] for r in await _history(db_url, second.id)] == [
            "promoteNextTask",
            "claimTask",
            "startTask",
            "releaseTask",
        ]
        await _verify_audit(srv.addr)


async def test_a_killed_pipelined_session_gives_the_task_it_claimed_ahead_back_once(
    db_url: str,
) -> None:
    """SIGKILL of a long-lived session's process while it holds a task claimed (and
    started) by its last completion: the task is recovered once, and taken again."""
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr)
        first = await _send(srv.addr, f"{COMPLETE} first")
        second = await _send(srv.addr, "second")  # queued behind the first
        agent = subprocess.Popen(
            [sys.executable, "-m", "vigil.testing.agent", "work"],
            env=harness.child_env(
                {"VIGIL_ADDR": srv.addr, "VIGIL_CHATROOM": "room", "VIGIL_ROLE": "builder"}
            ),
            stdout=subprocess.PIPE,
        )
        try:
            assert agent.stdout is not None
            for expected in (first, second):
                line = await asyncio.wait_for(asyncio.to_thread(agent.stdout.readline), 15)
                assert line.decode().startswith(f"working on {expected.id} attempt 0")
            agent.kill()  # mid-task: its session drops with the process
            await asyncio.to_thread(agent.wait, 10)

            async def back() -> tpb.Task | None:
                async with harness.channel(srv.addr) as ch:
                    t = await tpb_grpc.TasksStub(ch).GetTask(tpb.GetTaskRequest(id=second.id))
                return t if t.status == PENDING else None

            task = await harness.wait_for(back, 5, what="the task recovered")
            assert task.attempt == 1 and task.recoveries == 1
            await asyncio.sleep(0.5)  # nothing recovers it a second time
            async with (
                harness.client(srv.addr) as client,
                client.agent("room", "builder", handle_signals=False) as session,
            ):
                async for again in session.tasks():
                    assert (again.id, again.attempt) == (second.id, 1)
                    await again.complete()
                    break
        finally:
            if agent.poll() is None:
                agent.kill()
        first_h = await _history(db_url, first.id)
        assert [r["trigger"] for r in first_h] == ["claimTask", "startTask", "completeTask"]
        second_h = await _history(db_url, second.id)
        assert [r["trigger"] for r in second_h] == [
            "promoteNextTask",
            "claimTask",
            "startTask",
            "recoverOrphaned",
            "claimTask",
            "startTask",
            "completeTask",
        ]
        # The first task's completion claimed the second, in one transaction.
        assert {r["tx"] for r in second_h[:3]} == {first_h[-1]["tx"]}
        async with harness.channel(srv.addr) as ch:
            done = await tpb_grpc.TasksStub(ch).GetTask(tpb.GetTaskRequest(id=second.id))
        assert done.status == COMPLETED and done.recoveries == 1
        await _verify_audit(srv.addr)


async def test_claim_and_start_asked_again_hands_back_the_same_task(db_url: str) -> None:
    """A lost answer: AwaitTask with start, asked again by the same participant, returns
    the task it holds, in progress, claimed and started once."""
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr)
        sent = await _send(srv.addr, "once")
        async with harness.channel(srv.addr) as ch:
            joined = await lpb_grpc.LivenessStub(ch).Join(harness.join_request("room", "builder"))
            p = joined.participant
            request = tpb.AwaitTaskRequest(
                chatroom="room",
                role="builder",
                connection_id=p.connection_id,
                epoch=p.epoch,
                start=True,
            )
            got = []
            for _ in range(2):
                got.append([r async for r in tpb_grpc.TasksStub(ch).AwaitTask(request)][-1].task)
        assert [(t.id, t.status, t.attempt) for t in got] == [(sent.id, IN_PROGRESS, 0)] * 2
        assert [r["trigger"] for r in await _history(db_url, sent.id)] == [
            "claimTask",
            "startTask",
        ]


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_complete_and_claim_next_refusals(db_url: str, transport: str) -> None:
    """Bad input is INVALID_ARGUMENT, a stale attempt FAILED_PRECONDITION; nothing
    changes. A participant that is not live completes but claims nothing. On
    CompleteAndClaimNextStream each refusal is its step's answer, the same status, and
    the stream goes on."""
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr, "builder", "reviewer")
        first = await _send(srv.addr, "first")
        second = await _send(srv.addr, "second")
        async with harness.channel(srv.addr) as ch:
            stub = tpb_grpc.TasksStub(ch)
            joined = await lpb_grpc.LivenessStub(ch).Join(harness.join_request("room", "builder"))
            p = joined.participant
            claim = tpb.AwaitTaskRequest(
                chatroom="room",
                role="builder",
                connection_id=p.connection_id,
                epoch=p.epoch,
                start=True,
            )
            held = [r async for r in stub.AwaitTask(claim)][-1].task
            assert held.id == first.id

            def step(**kw: object) -> tpb.CompleteAndClaimNextRequest:
                fields: dict[str, object] = dict(
                    chatroom="room",
                    role="builder",
                    connection_id=p.connection_id,
                    epoch=p.epoch,
                    id=first.id,
                    attempt=0,
                    start=True,
                )
                fields.update(kw)
                return tpb.CompleteAndClaimNextRequest(**fields)  # type: ignore[arg-type]

            steps = stub.CompleteAndClaimNextStream() if transport == "stream" else None
            codes = {c.value[0]: c for c in grpc.StatusCode}

            async def call(request: tpb.CompleteAndClaimNextRequest) -> Any:
                if transport == "unary":
                    return await stub.CompleteAndClaimNext(request)
                assert steps is not None
                await steps.write(request)
                result = await steps.read()
                assert result.id == request.id
                if result.WhichOneof("result") == "error":
                    raise grpc.aio.AioRpcError(
                        codes[result.error.code],
                        grpc.aio.Metadata(),
                        grpc.aio.Metadata(),
                        result.error.message,
                    )
                return result.done

            refusals = {
                "not a uuid": (step(id="nope"), grpc.StatusCode.INVALID_ARGUMENT),
                "no epoch": (step(epoch=0), grpc.StatusCode.INVALID_ARGUMENT),
                "bad connection": (step(connection_id="x"), grpc.StatusCode.INVALID_ARGUMENT),
                "bad role": (step(role="no such!"), grpc.StatusCode.INVALID_ARGUMENT),
                "another role's task": (step(role="reviewer"), grpc.StatusCode.INVALID_ARGUMENT),
                "stale attempt": (step(attempt=3), grpc.StatusCode.FAILED_PRECONDITION),
                "negative attempt": (step(attempt=-1), grpc.StatusCode.FAILED_PRECONDITION),
                "huge attempt": (step(attempt=2**40), grpc.StatusCode.FAILED_PRECONDITION),
                "unknown task": (step(id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND),
            }
            for what, (request, code) in refusals.items():
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await call(request)
                assert exc.value.code() == code, what
            still = await stub.GetTask(tpb.GetTaskRequest(id=first.id))
            assert still.status == IN_PROGRESS
            # Not the live participant (an old epoch): the task completes, nothing is
            # claimed (a claim is bound to a live participant).
            reply = await call(step(epoch=p.epoch + 1))
            assert reply.completed.id == first.id and reply.completed.status == COMPLETED
            assert not reply.HasField("next")
            nxt = await stub.GetTask(tpb.GetTaskRequest(id=second.id))
            assert nxt.status == PENDING
            # Completing it again: refused, already completed.
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(step())
            assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            if steps is not None:
                await steps.done_writing()
                assert await steps.code() == grpc.StatusCode.OK  # it went on to the end


async def test_waiting_for_a_role_that_takes_no_tasks_is_not_found(db_url: str) -> None:
    # AwaitTask listens before it claims; with nothing to claim it checks the role
    # once (one cheap query), and says precisely why a role it cannot serve is missing.
    async with local_server(db_url, harness.fast_timings()) as srv:
        await _room(srv.addr, "builder", "reviewer")
        async with (
            harness.client(srv.addr) as client,
            client.agent("room", "reviewer", handle_signals=False) as session,
        ):
            s = session.session
            await s.joined.wait()
            assert s.epoch is not None
            waiting = asyncio.create_task(
                client.await_task("room", "reviewer", s.connection_id, s.epoch, start=True)
            )
            await asyncio.sleep(0.3)
            assert not waiting.done()  # it waits: the role takes tasks, none is pending
            task = await _send(srv.addr, "review it", role="reviewer")
            got = await asyncio.wait_for(waiting, 10)
            assert got.id == task.id and got.status == IN_PROGRESS
            await client.complete_task(got.id, got.attempt)
            await client.update_chatroom("room", remove=["reviewer"])
            with pytest.raises(RPCError) as missing:
                await asyncio.wait_for(
                    client.await_task("room", "reviewer", s.connection_id, s.epoch), 10
                )
        assert missing.value.code == grpc.StatusCode.NOT_FOUND, missing.value
        assert "has no role 'reviewer'" in missing.value.message
