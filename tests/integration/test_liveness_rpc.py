"""The liveness RPCs against a real server and PostgreSQL: sessions, fencing,
self-healing, expiry, batching, watches and bad input."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest

from vigil import testing as harness
from vigil.core.timefmt import from_proto
from vigil.testing import join_request, local_server, stub
from vigil.v1 import common_pb2
from vigil.v1 import liveness_pb2 as pb

TIMINGS = harness.fast_timings()


async def _stream_join(
    st: object, chatroom: str, role: str
) -> tuple[grpc.aio.StreamStreamCall, pb.JoinResponse]:
    call = st.Session()  # type: ignore[attr-defined]
    await call.write(pb.SessionRequest(join=join_request(chatroom, role)))
    first = await call.read()
    assert first.WhichOneof("msg") == "joined"
    return call, first.joined


async def test_every_heartbeat_refreshes_ready_until(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        ch, st = stub(srv.addr)
        call, joined = await _stream_join(st, "room", "builder")
        assert joined.participant.epoch == 1
        assert joined.heartbeat_interval_ms == 200 and joined.ttl_ms == 1000
        last = from_proto(joined.participant.ready_until)
        for _ in range(5):
            await asyncio.sleep(0.05)
            await call.write(pb.SessionRequest(heartbeat=pb.SessionRequest.Beat()))
            reply = await call.read()
            assert reply.heartbeat.status == pb.HEARTBEAT_STATUS_OK
            ready_until = from_proto(reply.heartbeat.ready_until)
            assert ready_until > last
            last = ready_until
        # The newest deadline reaches the database (batched) well before it matters.
        await asyncio.sleep(TIMINGS.heartbeat_flush_ms / 1000 + 0.1)
        row = await harness.participant_row(db_url, "room", "builder")
        assert row is not None and row["ready_until"] == last
        call.cancel()
        await ch.close()


async def test_client_drop_marks_stream_dropped_at_once(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        ch, st = stub(srv.addr)
        _call, _ = await _stream_join(st, "room", "builder")
        await ch.close()  # the client side vanishes without a leave
        row = await harness.wait_offline(db_url, "room", "builder", timeout=0.5)
        assert row["offline_reason"] == "stream_dropped"


async def test_leave_on_stream_records_the_reason(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        ch, st = stub(srv.addr)
        for reason, name in [
            (pb.OFFLINE_REASON_TASK_RECEIVED, "task_received"),
            (pb.OFFLINE_REASON_ERROR, "error"),
        ]:
            call, _ = await _stream_join(st, "room", name)
            await call.write(pb.SessionRequest(leave=pb.SessionRequest.Leave(reason=reason)))
            reply = await call.read()
            assert reply.left.participant.offline_reason == reason
            row = await harness.participant_row(db_url, "room", name)
            assert row is not None and row["offline_reason"] == name
        await ch.close()


async def test_new_join_supersedes_and_fences_the_old_epoch(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        ch, st = stub(srv.addr)
        old_call, old = await _stream_join(st, "room", "builder")
        new_call, new = await _stream_join(st, "room", "builder")
        assert new.participant.epoch == old.participant.epoch + 1
        pushed = await asyncio.wait_for(old_call.read(), 2)
        assert pushed.heartbeat.status == pb.HEARTBEAT_STATUS_SUPERSEDED
        # Unary heartbeat and leave with the old epoch: FAILED_PRECONDITION, nothing changes.
        for rpc, req in [
            (
                st.Heartbeat,
                pb.HeartbeatRequest(
                    chatroom="room",
                    role="builder",
                    epoch=old.participant.epoch,
                    connection_id=old.participant.connection_id,
                ),
            ),
            (
                st.Leave,
                pb.LeaveRequest(
                    chatroom="room",
                    role="builder",
                    epoch=old.participant.epoch,
                    connection_id=old.participant.connection_id,
                    reason=pb.OFFLINE_REASON_LEFT,
                ),
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc(req)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "superseded by epoch 2" in (err.value.details() or "")
        row = await harness.participant_row(db_url, "room", "builder")
        assert row is not None and row["status"] == "live" and row["epoch"] == 2
        old_call.cancel()
        new_call.cancel()
        await ch.close()


async def test_expired_participant_is_told_to_rejoin(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        ch, st = stub(srv.addr)
        call, joined = await _stream_join(st, "room", "builder")
        # No heartbeats: the sweeper expires it at its deadline and the stream is told.
        pushed = await asyncio.wait_for(call.read(), TIMINGS.heartbeat_ttl + 1)
        assert pushed.heartbeat.status == pb.HEARTBEAT_STATUS_REJOIN_REQUIRED
        row = await harness.participant_row(db_url, "room", "builder")
        assert row is not None and row["offline_reason"] == "ttl_expired"
        lag = (row["offline_at"] - from_proto(joined.participant.ready_until)).total_seconds()
        assert 0 <= lag < 1.0
        # A unary heartbeat of the expired epoch is answered rejoin_required, not an error.
        reply = await st.Heartbeat(
            pb.HeartbeatRequest(
                chatroom="room",
                role="builder",
                epoch=1,
                connection_id=joined.participant.connection_id,
            )
        )
        assert reply.status == pb.HEARTBEAT_STATUS_REJOIN_REQUIRED
        call.cancel()
        await ch.close()


async def test_unary_join_heartbeat_leave(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        ch, st = stub(srv.addr)
        req = join_request("room", "reviewer", common_pb2.AGENT_KIND_REMOTE)
        joined = await st.Join(req)
        hb = pb.HeartbeatRequest(
            chatroom="room", role="reviewer", epoch=1, connection_id=req.connection_id
        )
        for _ in range(3):
            reply = await st.Heartbeat(hb)
            assert reply.status == pb.HEARTBEAT_STATUS_OK
            assert from_proto(reply.ready_until) > from_proto(joined.participant.ready_until)
        left = await st.Leave(
            pb.LeaveRequest(
                chatroom="room",
                role="reviewer",
                epoch=1,
                connection_id=req.connection_id,
                reason=pb.OFFLINE_REASON_LEFT,
            )
        )
        assert left.participant.status == pb.PARTICIPANT_STATUS_OFFLINE
        # Leaving twice is harmless.
        again = await st.Leave(
            pb.LeaveRequest(
                chatroom="room",
                role="reviewer",
                epoch=1,
                connection_id=req.connection_id,
                reason=pb.OFFLINE_REASON_LEFT,
            )
        )
        assert again.participant.offline_reason == pb.OFFLINE_REASON_LEFT
        await ch.close()


async def test_heartbeats_are_batched(db_url: str) -> None:
    timings = harness.fast_timings(heartbeat_interval_ms=100, heartbeat_ttl_ms=2000)
    async with local_server(db_url, timings) as srv:
        ch, st = stub(srv.addr)
        calls = [await _stream_join(st, "room", f"r{i}") for i in range(50)]
        before = srv.app.metrics.flush_statements._value.get()
        beats = 0
        for _ in range(10):
            for call, _j in calls:
                await call.write(pb.SessionRequest(heartbeat=pb.SessionRequest.Beat()))
            for call, _j in calls:
                assert (await call.read()).heartbeat.status == pb.HEARTBEAT_STATUS_OK
            beats += len(calls)
            await asyncio.sleep(0.05)
        await asyncio.sleep(timings.heartbeat_flush_ms / 1000 + 0.05)
        statements = srv.app.metrics.flush_statements._value.get() - before
        assert beats == 500
        assert 0 < statements <= 500 / 10, f"{statements} statements for {beats} beats"
        for call, _j in calls:
            call.cancel()
        await ch.close()


async def test_heartbeats_racing_expiry_never_lose_an_acknowledged_deadline(db_url: str) -> None:
    """Beats arrive right at their deadlines while the sweeper runs: a deadline the
    server acknowledged is never cut short, and whoever expires is past it."""
    timings = harness.fast_timings(
        heartbeat_interval_ms=200, heartbeat_ttl_ms=300, heartbeat_flush_ms=50, sweep_max_sleep_ms=5
    )
    async with local_server(db_url, timings) as srv:
        ch, st = stub(srv.addr)
        acked: dict[tuple[str, int], datetime] = {}

        async def hammer(role: str) -> None:
            call, joined = await _stream_join(st, "race", role)
            epoch = joined.participant.epoch
            acked[(role, epoch)] = from_proto(joined.participant.ready_until)
            for i in range(12):
                # Sleep until just before (or just after) the acknowledged deadline.
                remaining = (acked[(role, epoch)] - datetime.now(UTC)).total_seconds()
                await asyncio.sleep(max(0.0, remaining + (0.004 if i % 4 == 3 else -0.004)))
                try:
                    await call.write(pb.SessionRequest(heartbeat=pb.SessionRequest.Beat()))
                    reply = await call.read()
                except grpc.aio.AioRpcError:
                    return
                if reply.heartbeat.status != pb.HEARTBEAT_STATUS_OK:
                    call.cancel()
                    call, joined = await _stream_join(st, "race", role)
                    epoch = joined.participant.epoch
                    acked[(role, epoch)] = from_proto(joined.participant.ready_until)
                    continue
                acked[(role, epoch)] = from_proto(reply.heartbeat.ready_until)
            call.cancel()

        await asyncio.gather(*(hammer(f"r{i}") for i in range(20)))
        conn = await asyncpg.connect(db_url)
        expiries = await conn.fetch(
            "SELECT role, epoch, offline_at FROM liveness.events "
            "WHERE type = 'offline' AND offline_reason = 'ttl_expired'"
        )
        await conn.close()
        await ch.close()
        assert expiries, "the test must make the sweeper race the beats"
        for e in expiries:
            deadline = acked[(e["role"], e["epoch"])]
            assert e["offline_at"] >= deadline, (
                f"{e['role']} epoch {e['epoch']} expired at {e['offline_at']} "
                f"before its acknowledged deadline {deadline}"
            )


async def test_list_then_watch_misses_nothing(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        ch, st = stub(srv.addr)
        for i in range(3):
            await st.Join(join_request("w", f"pre{i}"))
        listed = await st.ListParticipants(pb.ListParticipantsRequest(chatroom="w"))
        assert len(listed.participants) == 3
        watch = st.WatchParticipants(pb.WatchParticipantsRequest(from_revision=listed.revision))
        # Changes made after the listing, some before the watch is even read.
        reqs = [join_request("w", f"post{i}") for i in range(10)]
        for req in reqs:
            await st.Join(req)
        for req in reqs[:5]:
            await st.Leave(
                pb.LeaveRequest(
                    chatroom="w",
                    role=req.role,
                    epoch=1,
                    connection_id=req.connection_id,
                    reason=pb.OFFLINE_REASON_LEFT,
                )
            )
        seen = []
        async for ev in watch:
            seen.append(ev)
            if len(seen) == 15:
                break
        watch.cancel()
        revisions = [e.revision for e in seen]
        assert revisions == list(range(listed.revision + 1, listed.revision + 16))
        assert [e.type for e in seen[:10]] == [pb.PRESENCE_EVENT_TYPE_JOINED] * 10
        assert [e.participant.offline_reason for e in seen[10:]] == [pb.OFFLINE_REASON_LEFT] * 5
        await ch.close()


# -- bad input -------------------------------------------------------------------

_GOOD_ID = str(uuid.uuid4())


def _bad_cases() -> list[tuple[str, str, object, grpc.StatusCode, str]]:
    inv, fp = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    kind = common_pb2.AGENT_KIND_CUSTOM
    return [
        (
            "Join",
            "empty chatroom",
            pb.JoinRequest(chatroom="", role="r", kind=kind, connection_id=_GOOD_ID),
            inv,
            "chatroom is required",
        ),
        (
            "Join",
            "long role",
            pb.JoinRequest(chatroom="c", role="r" * 65, kind=kind, connection_id=_GOOD_ID),
            inv,
            "limit is 64",
        ),
        (
            "Join",
            "bad chars",
            pb.JoinRequest(chatroom="c d", role="r", kind=kind, connection_id=_GOOD_ID),
            inv,
            "may contain only",
        ),
        (
            "Join",
            "no kind",
            pb.JoinRequest(chatroom="c", role="r", connection_id=_GOOD_ID),
            inv,
            "kind must be",
        ),
        (
            "Join",
            "bad id",
            pb.JoinRequest(chatroom="c", role="r", kind=kind, connection_id="nope"),
            inv,
            "is not a UUID",
        ),
        (
            "Heartbeat",
            "before join",
            pb.HeartbeatRequest(chatroom="c", role="never", epoch=1, connection_id=_GOOD_ID),
            fp,
            "before join",
        ),
        (
            "Heartbeat",
            "zero epoch",
            pb.HeartbeatRequest(chatroom="c", role="r", epoch=0, connection_id=_GOOD_ID),
            inv,
            "epoch",
        ),
        (
            "Heartbeat",
            "bad id",
            pb.HeartbeatRequest(chatroom="c", role="r", epoch=1, connection_id="x"),
            inv,
            "not a UUID",
        ),
        (
            "Leave",
            "server reason",
            pb.LeaveRequest(
                chatroom="c",
                role="r",
                epoch=1,
                connection_id=_GOOD_ID,
                reason=pb.OFFLINE_REASON_TTL_EXPIRED,
            ),
            inv,
            "leave reason must be",
        ),
        (
            "Leave",
            "before join",
            pb.LeaveRequest(
                chatroom="c",
                role="never",
                epoch=1,
                connection_id=_GOOD_ID,
                reason=pb.OFFLINE_REASON_LEFT,
            ),
            fp,
            "before join",
        ),
        (
            "ListParticipants",
            "bad chatroom",
            pb.ListParticipantsRequest(chatroom="a/b"),
            inv,
            "may contain only",
        ),
    ]


async def _snapshot(url: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int]:
    conn = await asyncpg.connect(url)
    try:
        parts = [
            tuple(r) for r in await conn.fetch("SELECT * FROM liveness.participants ORDER BY 1, 2")
        ]
        events = [tuple(r) for r in await conn.fetch("SELECT * FROM liveness.events ORDER BY 1")]
        rev = await conn.fetchval("SELECT value FROM liveness.revision")
        return parts, events, rev
    finally:
        await conn.close()


async def test_bad_input_gets_the_right_status_and_changes_nothing(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        ch, st = stub(srv.addr)
        await st.Join(join_request("c", "r"))  # something to leave untouched
        before = await _snapshot(db_url)
        for rpc, what, req, code, text in _bad_cases():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(st, rpc)(req)
            assert err.value.code() == code, f"{rpc} {what}: {err.value.code()}"
            assert text in (err.value.details() or ""), f"{rpc} {what}: {err.value.details()}"
        # Streaming RPCs: watch ahead of time, session without join.
        for req, code in [
            (pb.WatchParticipantsRequest(from_revision=-1), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.WatchParticipantsRequest(from_revision=10_000), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in st.WatchParticipants(req):
                    pass
            assert err.value.code() == code
        for first, code in [
            (
                pb.SessionRequest(heartbeat=pb.SessionRequest.Beat()),
                grpc.StatusCode.FAILED_PRECONDITION,
            ),
            (pb.SessionRequest(), grpc.StatusCode.INVALID_ARGUMENT),
            (
                pb.SessionRequest(join=pb.JoinRequest(chatroom="c", role="")),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]:
            call = st.Session()
            await call.write(first)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == code
        assert await _snapshot(db_url) == before
        await ch.close()
