"""SendMessages: a client's sends over one stream, against real PostgreSQL and a real
server on loopback — each send answered by its request id, a refusal answering only its
send, the sends in flight when the stream breaks sent again and made once, and unary
calls to a server without the stream."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from vigil import testing as harness
from vigil.client import RPCError
from vigil.client import _client as client_module
from vigil.core.limits import Limits
from vigil.core.vocab import TokenKind
from vigil.testing import local_server
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc


async def test_concurrent_sends_of_one_client_share_one_stream_each_with_its_task(
    db_url: str,
) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder", "reviewer")
        async with harness.client(srv.addr) as client:
            streams, unary = harness.count_calls(client, "SendMessages", "SendMessage")
            roles = ["builder", "reviewer"]
            got = await asyncio.gather(
                *(client.send("room", roles[k % 2], f"task {k}") for k in range(40))
            )
            assert [(t.role, t.text) for t in got] == [
                (roles[k % 2], f"task {k}") for k in range(40)
            ]
            assert len({t.id for t in got}) == 40
            # A refused send is answered with its own error; the stream goes on.
            with pytest.raises(RPCError) as err:
                await client.send("room", "nobody", "lost")
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            assert "nobody" in err.value.message
            with pytest.raises(RPCError) as err:
                await client.send("room", "builder", "")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            after = await client.send("room", "builder", "after the refusals")
            assert after.text == "after the refusals"
            assert (streams.calls, unary.calls) == (1, 0)
        conn = await asyncpg.connect(db_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM tasks.tasks") == 41
        finally:
            await conn.close()


async def test_sends_whose_callers_are_cancelled_leave_the_others_on_the_stream(
    db_url: str,
) -> None:
    # A caller that gives up (cancelled while its send is queued or being written)
    # must not end the stream the other sends share: they all get their tasks.
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
        async with harness.client(srv.addr) as client:
            streams, unary = harness.count_calls(client, "SendMessages", "SendMessage")
            sends = [
                asyncio.create_task(client.send("room", "builder", f"t{k}")) for k in range(30)
            ]
            await asyncio.sleep(0)  # every send queued, some being written
            for k in range(0, 30, 3):
                sends[k].cancel()
            done = await asyncio.gather(*sends, return_exceptions=True)
            kept = [t for k, t in enumerate(done) if k % 3 and isinstance(t, tpb.Task)]
            assert len(kept) == 20, done
            assert sorted(t.text for t in kept) == sorted(f"t{k}" for k in range(30) if k % 3)
            after = await client.send("room", "builder", "after")
            assert after.text == "after" and (streams.calls, unary.calls) == (1, 0)


async def test_a_message_without_request_id_is_refused_and_the_stream_answers_the_next(
    db_url: str,
) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
        async with harness.channel(srv.addr) as ch:
            call = tpb_grpc.TasksStub(ch).SendMessages()
            await call.write(tpb.SendMessageRequest(chatroom="room", role="builder", text="a"))
            await call.write(
                tpb.SendMessageRequest(chatroom="room", role="builder", text="b", request_id="r2")
            )
            await call.done_writing()
            results = {r.request_id: r async for r in call}
            assert await call.code() == grpc.StatusCode.OK
        assert results[""].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "request_id is required" in results[""].error.message
        assert results["r2"].task.text == "b"


async def test_a_chatroom_token_sends_only_to_its_own_chatroom_on_the_stream(
    db_url: str,
) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
        await harness.make_room(srv, "other", "builder")
        async with harness.client(srv.addr) as admin:
            made = await admin.create_token(TokenKind.CHATROOM, "sender", chatroom="room")
        async with harness.client(srv.addr, made.secret) as client:
            streams, _unary = harness.count_calls(client, "SendMessages", "SendMessage")
            with pytest.raises(RPCError) as err:
                await client.send("other", "builder", "not mine")
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            mine = await client.send("room", "builder", "mine")
            assert mine.chatroom == "room" and streams.calls == 1


async def test_sends_in_flight_when_the_stream_breaks_are_sent_again_and_made_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server commits ten sends and stops before answering them (a replica that
    # dies): the client sends the ten again, the same, on a new stream to the server
    # that comes back, and gets the tasks the first sends made.
    monkeypatch.setattr(client_module, "SEND_ATTEMPTS", 60)  # room for the restart
    addr = f"127.0.0.1:{harness.free_port()}"
    committed: list[str] = []
    all_committed = asyncio.Event()
    async with local_server(db_url, harness.fast_timings(), addr) as srv:
        await harness.make_room(srv, "room", "builder")
        real_send = srv.tasks.svc.send

        async def commit_then_never_answer(*args: Any) -> Any:
            await real_send(*args)
            committed.append(args[4])
            if len(committed) == 10:
                all_committed.set()
            await asyncio.Event().wait()

        srv.tasks.svc.send = commit_then_never_answer  # type: ignore[method-assign,assignment]
        client = harness.client(addr)
        streams, _unary = harness.count_calls(client, "SendMessages", "SendMessage")
        sends = [asyncio.create_task(client.send("room", "builder", f"t{k}")) for k in range(10)]
        await asyncio.wait_for(all_committed.wait(), 10)
        assert not any(s.done() for s in sends)
    try:
        async with local_server(db_url, harness.fast_timings(), addr):
            got = await asyncio.wait_for(asyncio.gather(*sends), 30)
    finally:
        await client.close()
    assert sorted(t.text for t in got) == sorted(f"t{k}" for k in range(10))
    assert streams.calls >= 2  # the first stream broke; a new one carried the repeats
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT id::text, request_id FROM tasks.tasks")
    finally:
        await conn.close()
    assert len(rows) == 10  # made once each
    assert {r["id"] for r in rows} == {t.id for t in got}
    assert {r["request_id"] for r in rows} == set(committed)


class _Unary(tpb_grpc.TasksServicer):
    """A server of an earlier version: SendMessage and CompleteAndClaimNext, but not
    their streams."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def SendMessage(self, request: tpb.SendMessageRequest, context: Any) -> tpb.Task:
        self.sent.append(request.request_id)
        return tpb.Task(id=str(uuid.uuid4()), chatroom=request.chatroom, text=request.text)

    async def CompleteAndClaimNext(
        self, request: tpb.CompleteAndClaimNextRequest, context: Any
    ) -> tpb.CompleteAndClaimNextResponse:
        return tpb.CompleteAndClaimNextResponse(completed=tpb.Task(id=request.id))


async def test_a_server_without_the_streams_gets_unary_calls() -> None:
    server = grpc.aio.server()
    old = _Unary()  # type: ignore[abstract]
    tpb_grpc.add_TasksServicer_to_server(old, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with harness.client(f"127.0.0.1:{port}", "t") as client:
            streams, unary, step_streams, steps = harness.count_calls(
                client,
                "SendMessages",
                "SendMessage",
                "CompleteAndClaimNextStream",
                "CompleteAndClaimNext",
            )
            first = await client.send("room", "builder", "one")
            second = await client.send("room", "builder", "two")
            for task in (first, second):
                step = await client.complete_and_claim_next(
                    "room", "builder", str(uuid.uuid4()), 1, task.id, 0
                )
                assert step.completed.id == task.id
        assert (first.text, second.text) == ("one", "two")
        assert streams.calls == 1 and unary.calls == 2  # tried once, then unary only
        assert step_streams.calls == 1 and steps.calls == 2
        assert len(set(old.sent)) == 2
    finally:
        await server.stop(None)


async def test_a_credential_at_its_stream_limit_still_sends_unary(db_url: str) -> None:
    # The replica holds as many streams of this credential as it allows (1 here: a
    # watch): the send stream is refused RESOURCE_EXHAUSTED, and each send goes unary.
    limits = Limits(streams_per_token=1)
    async with local_server(db_url, harness.fast_timings(), limits=limits) as srv:
        await harness.make_room(srv, "room", "builder")
        async with harness.client(srv.addr) as watcher, harness.client(srv.addr) as client:
            watch = watcher.watch_participants(0)
            first_event = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.3)  # the watch holds the one stream
            streams, unary = harness.count_calls(client, "SendMessages", "SendMessage")
            got = [await client.send("room", "builder", f"t{k}") for k in range(2)]
            assert [t.text for t in got] == ["t0", "t1"]
            assert (streams.calls, unary.calls) == (2, 2)  # tried each time, then unary
            first_event.cancel()
