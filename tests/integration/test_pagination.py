"""Pages and caps against a real server and PostgreSQL: 30,000 participants and 20,000
tasks listed completely by the CLI through pages (and the task service's presence view
syncing over them), oversized fields refused with INVALID_ARGUMENT, and one credential
held to its caps on streams and participants."""

from __future__ import annotations

import asyncio
import json
import subprocess

import asyncpg
import grpc
import pytest

from vigil import testing as harness
from vigil.core import paging
from vigil.core.limits import Limits
from vigil.core.vocab import TokenKind
from vigil.testing import local_server
from vigil.v1 import common_pb2
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc
from vigil.v1 import tokens_pb2 as kpb
from vigil.v1 import tokens_pb2_grpc as kpb_grpc

# Lists tens of thousands of rows through a CLI process: not in `make test-fast`.
pytestmark = pytest.mark.slow

PARTICIPANTS = 30_000
TASKS = 20_000


async def _fill(url: str) -> None:
    """30,000 live participants (in 300 chatrooms) and 20,000 queued tasks, written
    directly: this test is about reading them."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO liveness.participants
                 (chatroom, role, kind, status, epoch, connection_id, ready_until, joined_at,
                  revision)
               SELECT 'room-' || (g % 300), 'r' || g, 'custom', 'live', 1,
                      gen_random_uuid(), now() + interval '1 hour', now(), 0
               FROM generate_series(1, $1) g""",
            PARTICIPANTS,
        )
        await conn.execute("INSERT INTO tasks.chatrooms (chatroom) VALUES ('big')")
        await conn.execute(
            "INSERT INTO tasks.roles (chatroom, role, kind) VALUES ('big', 'builder', 'custom')"
        )
        await conn.execute(
            """INSERT INTO tasks.tasks (chatroom, role, text, status)
               SELECT 'big', 'builder', 'task ' || g, 'queued' FROM generate_series(1, $1) g""",
            TASKS,
        )
    finally:
        await conn.close()


async def _cli_json(addr: str, *args: str) -> list[dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        *harness.vigil_cmd(*args, "--json"),
        env=harness.child_env({"VIGIL_ADDR": addr}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    listed: list[dict[str, object]] = json.loads(out)
    return listed


async def test_tens_of_thousands_are_listed_completely_through_pages(db_url: str) -> None:
    await _fill(db_url)
    # A fresh server's presence view syncs over all of them (it pages too).
    async with local_server(db_url, harness.fast_timings(heartbeat_ttl_ms=3_600_000)) as srv:
        assert srv.tasks.svc.presence.role_is_live("room-7", "r29707")
        participants = await _cli_json(srv.addr, "participants")
        assert len(participants) == PARTICIPANTS
        assert len({(p["chatroom"], p["role"]) for p in participants}) == PARTICIPANTS
        tasks = await _cli_json(srv.addr, "tasks", "--chatroom", "big")
        assert len(tasks) == TASKS and len({t["id"] for t in tasks}) == TASKS
        # Pages are at most 1000, each says where the next begins, and a page token
        # belongs to its listing.
        async with harness.channel(srv.addr) as ch:
            live = lpb_grpc.LivenessStub(ch)
            page = await live.ListParticipants(lpb.ListParticipantsRequest())
            assert len(page.participants) == paging.DEFAULT and page.next_page_token
            big = await live.ListParticipants(lpb.ListParticipantsRequest(page_size=1000))
            assert len(big.participants) == 1000
            for bad in (
                lpb.ListParticipantsRequest(page_size=1001),
                lpb.ListParticipantsRequest(page_token="not a token"),
                lpb.ListParticipantsRequest(page_token=paging.encode("tasks", ("x",))),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await live.ListParticipants(bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "page" in (err.value.details() or "")


async def test_oversized_fields_are_invalid_argument(db_url: str) -> None:
    async with local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "room", "builder")
        await harness.register_machine_direct(srv, "m1")
        async with harness.client(srv.addr) as admin:
            sent = await admin.send("room", "builder", "ok")
        long_reason = "r" * 1025
        async with harness.channel(srv.addr) as ch:
            tasks, machines = tpb_grpc.TasksStub(ch), mpb_grpc.MachinesStub(ch)
            tokens = kpb_grpc.TokensStub(ch)
            role = tpb.Role(
                role="x", kind=common_pb2.AGENT_KIND_REMOTE, machine="m1", command="c" * 4097
            )
            calls = {
                "task text": tasks.SendMessage(
                    tpb.SendMessageRequest(chatroom="room", role="builder", text="t" * 65_537)
                ),
                "role command": tasks.CreateChatroom(
                    tpb.CreateChatroomRequest(name="other", roles=[role])
                ),
                "cancel reason": tasks.CancelTask(tpb.TaskRef(id=sent.id, reason=long_reason)),
                "hostname": machines.RegisterMachine(
                    mpb.RegisterMachineRequest(machine_id="m2", hostname="h" * 256)
                ),
                "chatroom name": tasks.GetChatroom(tpb.GetChatroomRequest(name="c" * 65)),
                "token name": tokens.CreateToken(
                    kpb.CreateTokenRequest(kind=TokenKind.READONLY.to_pb(), name="n" * 129)
                ),
            }
            for what, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            # Nothing was changed by the refused calls.
            assert (await tasks.GetTask(tpb.GetTaskRequest(id=sent.id))).status == (
                tpb.TASK_STATUS_PENDING
            )


async def test_one_credential_is_held_to_its_stream_and_participant_caps(db_url: str) -> None:
    limits = Limits(streams_per_token=3, participants_per_token=2)
    async with local_server(db_url, harness.fast_timings(), limits=limits) as srv:
        await harness.make_room(srv, "room", "a", "b", "c")
        async with harness.client(srv.addr) as admin:
            made = await admin.create_token(TokenKind.CHATROOM, "capped", chatroom="room")
        async with harness.channel(srv.addr, made.secret) as ch:
            tasks = tpb_grpc.TasksStub(ch)
            streams = [tasks.WatchNotifications(tpb.WatchNotificationsRequest()) for _ in range(3)]
            await asyncio.sleep(0.3)
            extra = tasks.WatchNotifications(tpb.WatchNotificationsRequest())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.read()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit is 3" in (err.value.details() or "")
            streams.pop().cancel()
            await asyncio.sleep(0.3)
            again = tasks.WatchNotifications(tpb.WatchNotificationsRequest())
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(again.read(), 0.3)  # let in: a slot was freed
            for s in [*streams, again]:
                s.cancel()

            live = lpb_grpc.LivenessStub(ch)
            for role in ("a", "b"):
                await live.Join(harness.join_request("room", role))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await live.Join(harness.join_request("room", "c"))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            rejoined = await live.Join(harness.join_request("room", "a"))  # not a new one
            assert rejoined.participant.epoch == 2
        # An admin is not capped.
        async with harness.channel(srv.addr) as ch:
            await lpb_grpc.LivenessStub(ch).Join(harness.join_request("room", "c"))
