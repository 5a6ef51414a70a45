"""Every RPC by every kind of caller, against a real server: the status each gets is the
one the declared rule table (`vigil.core.auth.rules.RULES`) and the ownership rules
say. A call "passes" authorization when it ends with anything but UNAUTHENTICATED or
PERMISSION_DENIED (the requests are shaped so that a permitted call changes nothing:
an invalid field, a stale attempt, an unknown id)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from vigil import testing as harness
from vigil.core.auth.principal import SYSTEM
from vigil.core.auth.rules import RULES, Scope
from vigil.core.timefmt import to_proto
from vigil.core.vocab import AgentKind, TokenKind
from vigil.task_service.model import Role
from vigil.v1 import common_pb2, liveness_pb2, machines_pb2, tasks_pb2, tokens_pb2
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc
from vigil.v1 import tokens_pb2 as kpb
from vigil.v1 import tokens_pb2_grpc as kpb_grpc

DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
NOBODY = ("no token", "forged", "expired", "revoked")
IDENTITIES = (
    *NOBODY,
    "admin",
    "read-only",
    "chatroom A",
    "chatroom B",
    "agent A/builder",
    "agent A/reviewer",
    "machine m1",
    "machine m2",
)
# Who may read chatroom A (its tasks, its listing).
READERS_OF_A = {"admin", "read-only", "chatroom A", "agent A/builder", "agent A/reviewer"}


def descriptor_rpcs() -> list[str]:
    """Every RPC of every Vigil service, from the generated descriptors."""
    found = []
    for module in (liveness_pb2, tasks_pb2, machines_pb2, tokens_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            found += [f"{service.full_name}/{m.name}" for m in service.methods]
    return found


def test_every_rpc_has_exactly_one_rule() -> None:
    assert sorted(descriptor_rpcs()) == sorted(RULES)


@dataclass
class Who:
    token: str | None
    kind: TokenKind | None


def expected_allowed(method: str, who: str, kinds: Mapping[str, TokenKind | None]) -> bool:
    """What the declared table says, for requests aimed at chatroom A, role builder,
    machine m1, the participant and the task held by agent A/builder."""
    if who in NOBODY:
        return False
    rule = RULES[method]
    if kinds[who] not in rule.kinds:
        return False
    name = method.rsplit("/", 1)[1]
    match rule.scope:
        case Scope.NONE | Scope.LISTED:
            return True
        case Scope.CHATROOM:
            return who in READERS_OF_A
        case Scope.ROLE | Scope.PARTICIPANT:
            return who in {"admin", "chatroom A", "agent A/builder"}
        case Scope.MACHINE:
            return who in {"admin", "machine m1"}
        case Scope.OWNER if name in ("GetTask", "TaskHistory"):
            return who in READERS_OF_A
        case Scope.OWNER if method.startswith("vigil.v1.Machines/"):
            return who == "machine m1"
        case Scope.OWNER:
            return who in {"admin", "agent A/builder"}
    raise AssertionError(f"no expectation for {method}")


Call = Callable[[grpc.aio.Channel], Awaitable[Any]]


async def _first(call: Any, timeout: float = 0.5) -> None:
    """Read a stream's first message; a stream still open after `timeout` was let in."""
    try:
        await asyncio.wait_for(call.read(), timeout)
    except TimeoutError:
        pass
    finally:
        call.cancel()


async def _bidi(call: Any, first: Any) -> None:
    await call.write(first)
    await _first(call)


async def _one_on_stream(call: Any, request: Any) -> None:
    """A stream of requests (SendMessages, CompleteAndClaimNextStream): a request's
    refusal is its answer (the stream goes on); raised here as the status a unary call
    of it would have ended with."""
    try:
        await call.write(request)
        result = await asyncio.wait_for(call.read(), 5)
    finally:
        call.cancel()
    if result.WhichOneof("result") == "error":
        code = {c.value[0]: c for c in grpc.StatusCode}[result.error.code]
        raise grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(), grpc.aio.Metadata(), result.error.message
        )


def requests(fx: dict[str, Any]) -> dict[str, Call]:
    """For every RPC, a call aimed at chatroom A / role builder / machine m1 that a
    permitted caller can make without changing anything."""
    conn, epoch, task_id = fx["connection_id"], fx["epoch"], fx["task_id"]
    stale = epoch + 5
    now = to_proto(datetime.now(UTC))
    live = lambda ch: lpb_grpc.LivenessStub(ch)  # noqa: E731
    tasks = lambda ch: tpb_grpc.TasksStub(ch)  # noqa: E731
    machines = lambda ch: mpb_grpc.MachinesStub(ch)  # noqa: E731
    tokens = lambda ch: kpb_grpc.TokensStub(ch)  # noqa: E731
    done = tpb.TaskRef(id=task_id, attempt=7)  # completed, attempt 0: stale
    report = mpb.ExitReport(
        machine_id="m1",
        child=mpb.Child(chatroom="A", role="worker", pid=4242, started_at=now),
        exited_at=now,
        classification=mpb.EXIT_CLASSIFICATION_CRASHED,
    )
    step = tpb.CompleteAndClaimNextRequest(
        chatroom="A",
        role="builder",
        connection_id=conn,
        epoch=epoch,
        id=task_id,
        attempt=7,
        start=True,
    )
    resume = lpb.SessionRequest(
        resume=lpb.HeartbeatRequest(chatroom="A", role="builder", epoch=stale, connection_id=conn)
    )
    return {
        "vigil.v1.Liveness/Session": lambda ch: _bidi(live(ch).Session(), resume),
        "vigil.v1.Liveness/Join": lambda ch: live(ch).Join(
            lpb.JoinRequest(
                chatroom="A",
                role="builder",
                kind=common_pb2.AGENT_KIND_CUSTOM,
                connection_id="not-a-uuid",
            )
        ),
        "vigil.v1.Liveness/Heartbeat": lambda ch: live(ch).Heartbeat(
            lpb.HeartbeatRequest(chatroom="A", role="builder", epoch=stale, connection_id=conn)
        ),
        "vigil.v1.Liveness/Leave": lambda ch: live(ch).Leave(
            lpb.LeaveRequest(
                chatroom="A",
                role="builder",
                epoch=stale,
                connection_id=conn,
                reason=lpb.OFFLINE_REASON_LEFT,
            )
        ),
        "vigil.v1.Liveness/ListParticipants": lambda ch: live(ch).ListParticipants(
            lpb.ListParticipantsRequest()
        ),
        "vigil.v1.Liveness/WatchParticipants": lambda ch: _first(
            live(ch).WatchParticipants(lpb.WatchParticipantsRequest())
        ),
        "vigil.v1.Tasks/CreateChatroom": lambda ch: tasks(ch).CreateChatroom(
            tpb.CreateChatroomRequest(
                name="A", roles=[tpb.Role(role="x", kind=common_pb2.AGENT_KIND_CUSTOM)]
            )
        ),
        "vigil.v1.Tasks/UpdateChatroom": lambda ch: tasks(ch).UpdateChatroom(
            tpb.UpdateChatroomRequest(name="A")  # nothing to change
        ),
        "vigil.v1.Tasks/DeleteChatroom": lambda ch: tasks(ch).DeleteChatroom(
            tpb.DeleteChatroomRequest(name="nosuch")
        ),
        "vigil.v1.Tasks/GetChatroom": lambda ch: tasks(ch).GetChatroom(
            tpb.GetChatroomRequest(name="A")
        ),
        "vigil.v1.Tasks/ListChatrooms": lambda ch: tasks(ch).ListChatrooms(
            tpb.ListChatroomsRequest()
        ),
        "vigil.v1.Tasks/SendMessage": lambda ch: tasks(ch).SendMessage(
            tpb.SendMessageRequest(chatroom="A", role="builder", text="")
        ),
        "vigil.v1.Tasks/SendMessages": lambda ch: _one_on_stream(
            tasks(ch).SendMessages(),
            tpb.SendMessageRequest(chatroom="A", role="builder", text="", request_id="m-1"),
        ),
        "vigil.v1.Tasks/AwaitTask": lambda ch: _first(
            tasks(ch).AwaitTask(
                tpb.AwaitTaskRequest(
                    chatroom="A", role="builder", connection_id=str(uuid.uuid4()), epoch=1
                )
            )
        ),
        "vigil.v1.Tasks/StartTask": lambda ch: tasks(ch).StartTask(done),
        "vigil.v1.Tasks/CompleteTask": lambda ch: tasks(ch).CompleteTask(done),
        # The participant's own claimer only (its token): a stale attempt changes nothing.
        "vigil.v1.Tasks/CompleteAndClaimNext": lambda ch: tasks(ch).CompleteAndClaimNext(step),
        "vigil.v1.Tasks/CompleteAndClaimNextStream": lambda ch: _one_on_stream(
            tasks(ch).CompleteAndClaimNextStream(), step
        ),
        "vigil.v1.Tasks/ReleaseTask": lambda ch: tasks(ch).ReleaseTask(done),
        "vigil.v1.Tasks/CancelTask": lambda ch: tasks(ch).CancelTask(
            tpb.TaskRef(id=str(uuid.uuid4()))
        ),
        "vigil.v1.Tasks/GetTask": lambda ch: tasks(ch).GetTask(tpb.GetTaskRequest(id=task_id)),
        "vigil.v1.Tasks/TaskHistory": lambda ch: tasks(ch).TaskHistory(
            tpb.TaskHistoryRequest(id=task_id)
        ),
        "vigil.v1.Tasks/ListTasks": lambda ch: tasks(ch).ListTasks(tpb.ListTasksRequest()),
        "vigil.v1.Tasks/CountTasks": lambda ch: tasks(ch).CountTasks(tpb.CountTasksRequest()),
        "vigil.v1.Tasks/ListNotifications": lambda ch: tasks(ch).ListNotifications(
            tpb.ListNotificationsRequest()
        ),
        "vigil.v1.Tasks/WatchNotifications": lambda ch: _first(
            tasks(ch).WatchNotifications(tpb.WatchNotificationsRequest())
        ),
        "vigil.v1.Tasks/VerifyAudit": lambda ch: tasks(ch).VerifyAudit(
            tpb.VerifyAuditRequest(task_id=str(uuid.uuid4()))
        ),
        "vigil.v1.Machines/RegisterMachine": lambda ch: machines(ch).RegisterMachine(
            mpb.RegisterMachineRequest(machine_id="m1", hostname="h" * 10_000)
        ),
        "vigil.v1.Machines/UnregisterMachine": lambda ch: machines(ch).UnregisterMachine(
            mpb.UnregisterMachineRequest(machine_id="m9")
        ),
        "vigil.v1.Machines/DaemonSession": lambda ch: _bidi(
            machines(ch).DaemonSession(),
            mpb.DaemonMessage(hello=mpb.DaemonMessage.Hello(machine_id="m1")),
        ),
        "vigil.v1.Machines/ReportExit": lambda ch: machines(ch).ReportExit(report),
        "vigil.v1.Machines/ListMachines": lambda ch: machines(ch).ListMachines(
            mpb.ListMachinesRequest()
        ),
        "vigil.v1.Machines/ListAgents": lambda ch: machines(ch).ListAgents(mpb.ListAgentsRequest()),
        "vigil.v1.Machines/ListCommands": lambda ch: machines(ch).ListCommands(
            mpb.ListCommandsRequest()
        ),
        "vigil.v1.Machines/ListExits": lambda ch: machines(ch).ListExits(mpb.ListExitsRequest()),
        "vigil.v1.Machines/StartAgent": lambda ch: machines(ch).StartAgent(
            mpb.AgentRef(chatroom="A", role="nobody")
        ),
        "vigil.v1.Machines/StopAgent": lambda ch: machines(ch).StopAgent(
            mpb.AgentRef(chatroom="A", role="nobody")
        ),
        "vigil.v1.Tokens/CreateToken": lambda ch: tokens(ch).CreateToken(
            kpb.CreateTokenRequest(name="x")
        ),
        "vigil.v1.Tokens/ListTokens": lambda ch: tokens(ch).ListTokens(kpb.ListTokensRequest()),
        "vigil.v1.Tokens/RevokeToken": lambda ch: tokens(ch).RevokeToken(
            kpb.RevokeTokenRequest(id="0" * 16)
        ),
    }


async def _identities(srv: harness.LocalServer) -> dict[str, Who]:
    store = srv.auth.store
    m1 = await harness.register_machine_direct(srv, "m1")
    m2 = await harness.register_machine_direct(srv, "m2")

    async def make(kind: TokenKind, **scope: Any) -> str:
        _record, secret = await store.create(kind, "matrix", SYSTEM, **scope)
        return secret

    expired = await make(TokenKind.ADMIN, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    revoked_record, revoked = await store.create(TokenKind.ADMIN, "matrix", SYSTEM)
    await store.revoke(revoked_record.id, datetime.now(UTC), "test")
    forged = srv.admin_token[:-6] + ("AAAAAA" if not srv.admin_token.endswith("A") else "BBBBBB")
    agent = dict(chatroom="A", machine="m1")
    return {
        "no token": Who(None, None),
        "forged": Who(forged, None),
        "expired": Who(expired, None),
        "revoked": Who(revoked, None),
        "admin": Who(srv.admin_token, TokenKind.ADMIN),
        "read-only": Who(await make(TokenKind.READONLY), TokenKind.READONLY),
        "chatroom A": Who(await make(TokenKind.CHATROOM, chatroom="A"), TokenKind.CHATROOM),
        "chatroom B": Who(await make(TokenKind.CHATROOM, chatroom="B"), TokenKind.CHATROOM),
        "agent A/builder": Who(
            await make(TokenKind.AGENT, role="builder", **agent), TokenKind.AGENT
        ),
        "agent A/reviewer": Who(
            await make(TokenKind.AGENT, role="reviewer", **agent), TokenKind.AGENT
        ),
        "machine m1": Who(m1, TokenKind.MACHINE),
        "machine m2": Who(m2, TokenKind.MACHINE),
    }


async def _fixtures(srv: harness.LocalServer, builder: str) -> dict[str, Any]:
    """A participant A/builder joined by agent A/builder, and a task it claimed and
    completed."""
    async with harness.channel(srv.addr, builder) as ch:
        joined = await lpb_grpc.LivenessStub(ch).Join(harness.join_request("A", "builder"))
        p = joined.participant
        sent = await tpb_grpc.TasksStub(ch).SendMessage(
            tpb.SendMessageRequest(chatroom="A", role="builder", text="matrix")
        )
        call = tpb_grpc.TasksStub(ch).AwaitTask(
            tpb.AwaitTaskRequest(
                chatroom="A", role="builder", connection_id=p.connection_id, epoch=p.epoch
            )
        )
        claimed = [r async for r in call][-1].task
        assert claimed.id == sent.id
        await tpb_grpc.TasksStub(ch).CompleteTask(tpb.TaskRef(id=sent.id, attempt=0))
    return {"connection_id": p.connection_id, "epoch": p.epoch, "task_id": sent.id}


async def test_authz_matrix(db_url: str) -> None:
    timings = harness.fast_timings(heartbeat_ttl_ms=120_000, heartbeat_interval_ms=30_000)
    async with harness.local_server(db_url, timings) as srv:
        ids = await _identities(srv)
        await srv.tasks.svc.create_chatroom(
            "A",
            [
                Role("builder", AgentKind.CUSTOM),
                Role("reviewer", AgentKind.CUSTOM),
                Role("worker", AgentKind.REMOTE, "m1", "idle"),
            ],
        )
        await srv.tasks.svc.create_chatroom("B", [Role("builder", AgentKind.CUSTOM)])
        fx = await _fixtures(srv, ids["agent A/builder"].token or "")
        calls = requests(fx)
        assert sorted(calls) == sorted(descriptor_rpcs())
        kinds = {name: who.kind for name, who in ids.items()}
        wrong: list[str] = []
        for method, call in calls.items():
            for name, who in ids.items():
                async with harness.channel(srv.addr, who.token or "") as ch:
                    try:
                        await call(ch)
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code()
                allowed = expected_allowed(method, name, kinds)
                if name in NOBODY and code != grpc.StatusCode.UNAUTHENTICATED:
                    wrong.append(f"{method} as {name}: {code.name}, expected UNAUTHENTICATED")
                elif name not in NOBODY and allowed and code in DENIED:
                    wrong.append(f"{method} as {name}: {code.name}, expected to be let in")
                elif (
                    name not in NOBODY
                    and not allowed
                    and code != (grpc.StatusCode.PERMISSION_DENIED)
                ):
                    wrong.append(f"{method} as {name}: {code.name}, expected PERMISSION_DENIED")
        assert not wrong, "\n".join(wrong)
        # Nothing the permitted calls did changed the participant or the task.
        async with harness.client(srv.addr) as admin:
            task = await admin.get_task(fx["task_id"])
            assert task.status == tpb.TASK_STATUS_COMPLETED
            listed = await admin.list_participants("A")
            held = [p for p in listed.participants if p.role == "builder"]
            assert held[0].epoch == fx["epoch"] and held[0].status == lpb.PARTICIPANT_STATUS_LIVE


@pytest.mark.parametrize("who", ["chatroom A", "agent A/builder"])
def test_the_expectations_are_not_all_yes(who: str) -> None:
    """The matrix checks something: scoped callers are refused most RPCs."""
    kinds = {who: TokenKind.CHATROOM if who.startswith("chatroom") else TokenKind.AGENT}
    refused = [m for m in RULES if not expected_allowed(m, who, kinds)]
    assert len(refused) >= len(RULES) // 3
