"""Security end to end, with real daemon, agent and CLI processes against a real server
and PostgreSQL: what a chatroom token may not do, what a machine refuses to run, the
credential each agent gets and loses with its process, revocation reaching open streams
within a second, and audits that name the authenticated principal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from vigil import testing as harness
from vigil.client import RPCError
from vigil.core.auth.principal import SYSTEM
from vigil.core.vocab import CommandStatus, NotificationKind, TokenKind
from vigil.testing import LocalServer, local_server
from vigil.v1 import common_pb2
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow

TIMINGS = harness.fast_timings()


async def vigil(addr: str, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """Run the CLI against `addr` (as its admin unless `token` says otherwise)."""
    env = harness.child_env({"VIGIL_ADDR": addr, **({"VIGIL_TOKEN": token} if token else {})})
    proc = await asyncio.create_subprocess_exec(
        *harness.vigil_cmd(*args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vigil: error: "), err
    assert "Traceback" not in err
    return lines[0]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


async def chatroom_token(srv: LocalServer, room: str, name: str, role: str = "") -> str:
    async with harness.client(srv.addr) as admin:
        made = await admin.create_token(TokenKind.CHATROOM, name, chatroom=room, role=role)
    return made.secret


async def remote_room(srv: LocalServer, machine: str, **roles: str) -> None:
    """Chatroom `room`: each role runs harness NAME on `machine` (or `cmd:LINE`, a
    command line)."""
    async with harness.client(srv.addr) as admin:
        made = []
        for role, what in roles.items():
            r = tpb.Role(role=role, kind=common_pb2.AGENT_KIND_REMOTE, machine=machine)
            if what.startswith("cmd:"):
                r.command = what.removeprefix("cmd:")
            else:
                r.harness = what
            made.append(r)
        await admin.create_chatroom("room", made)


async def wait_command(srv: LocalServer, role: str, status: CommandStatus) -> object:
    async def found() -> object:
        async with harness.client(srv.addr) as admin:
            for c in await admin.list_commands():
                if c.role == role and c.type == 1 and c.status == status.to_pb():
                    return c
        return None

    return await harness.wait_for(found, 20, what=f"a start of {role} {status}")


async def agent_pid(srv: LocalServer, role: str) -> int:
    async def running() -> int:
        async with harness.client(srv.addr) as admin:
            for a in await admin.list_agents("room"):
                if a.role == role and a.pid:
                    return a.pid
        return 0

    pid: int = await harness.wait_for(running, 20, what=f"{role}'s agent running")
    return pid


# -- what a chatroom token may not do ------------------------------------------------


async def test_a_chatroom_token_can_neither_create_roles_nor_start_agents(db_url: str) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv, "room", "builder")
        token = await chatroom_token(srv, "room", "alice")
        for args in (
            ("chatroom", "create", "evil", "--role", "x=remote:m1:example"),
            ("agent", "start", "--chatroom", "room", "--role", "builder"),
            ("machine", "register", "--machine-id", "m1"),
            ("token", "create", "--admin"),
        ):
            rc, _out, err = await vigil(srv.addr, *args, token=token)
            line = one_line_error(err)
            assert rc == 1 and "chatroom:room:alice may not call" in line, (args, err)
        # What it may do: send to its chatroom, and nothing outside it.
        rc, _out, err = await vigil(
            srv.addr, "send", "--chatroom", "room", "--role", "builder", "hi", token=token
        )
        assert rc == 0, err
        rc, _out, err = await vigil(
            srv.addr, "send", "--chatroom", "other", "--role", "builder", "hi", token=token
        )
        assert rc == 1 and "may not act in chatroom 'other'" in one_line_error(err)


# -- a machine runs only what it allows ----------------------------------------------


async def test_a_harness_the_machine_does_not_define_is_refused_and_nothing_runs(
    db_url: str, tmp: Path
) -> None:
    pwned = tmp / "pwned"
    async with local_server(db_url, TIMINGS) as srv:
        m1 = await harness.register_machine(srv.addr, "m1", tmp)
        m1.start()
        try:
            await remote_room(srv, "m1", builder="nosuch", shell=f"cmd:sh -c 'touch {pwned}'")
            async with harness.client(srv.addr) as admin:
                await admin.send("room", "builder", "build it")
                await admin.send("room", "shell", "run it")
            for role, why in (("builder", "nosuch"), ("shell", "allow_any_command")):
                cmd = await wait_command(srv, role, CommandStatus.FAILED)
                assert why in cmd.outcome_message, cmd  # type: ignore[attr-defined]
            assert m1.proc is not None
            assert children_of(m1.proc.pid) == []  # no process was spawned
            assert not pwned.exists()
            # Visible: `vigil commands`, `vigil agents` and a notification per refusal.
            rc, out, _ = await vigil(srv.addr, "commands", "--machine", "m1")
            assert rc == 0 and "refused" in out and "nosuch" in out
            rc, out, _ = await vigil(srv.addr, "agents", "--chatroom", "room")
            assert rc == 0 and "failed" in out and "nosuch" in out
            async with harness.client(srv.addr) as admin:
                notes = [
                    n
                    for n in await admin.list_notifications()
                    if n.kind == NotificationKind.COMMAND_FAILED.to_pb()
                ]
            assert {n.role for n in notes} == {"builder", "shell"}
            assert all(n.actor == "machine:m1" for n in notes)
        finally:
            await m1.stop()

        # The same command line runs where the machine's owner opted in.
        m2 = await harness.register_machine(srv.addr, "m2", tmp)
        harness.write_harness_file(m2.harnesses, allow_any_command=True)
        m2.start()
        try:
            async with harness.client(srv.addr) as admin:
                await admin.create_chatroom(
                    "opted",
                    [
                        tpb.Role(
                            role="shell",
                            kind=common_pb2.AGENT_KIND_REMOTE,
                            machine="m2",
                            command=f"sh -c 'touch {pwned}; sleep 30'",
                        )
                    ],
                )
                await admin.send("opted", "shell", "run it")
            await harness.wait_for(
                lambda: asyncio.sleep(0, pwned.exists()), 20, what="the opted-in command ran"
            )
        finally:
            await m2.stop()


# -- each agent's own credential -----------------------------------------------------


async def _stream_until_refused(addr: str, token: str) -> tuple[grpc.StatusCode, float]:
    """Hold a WatchNotifications stream with `token`; (its final status, when it ended)."""
    async with harness.channel(addr, token) as ch:
        call = tpb_grpc.TasksStub(ch).WatchNotifications(tpb.WatchNotificationsRequest())
        try:
            async for _ in call:
                pass
            return grpc.StatusCode.OK, time.time()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), time.time()


async def _refused(addr: str, token: str) -> str:
    async with harness.channel(addr, token) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await tpb_grpc.TasksStub(ch).ListChatrooms(tpb.ListChatroomsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return err.value.details() or ""


async def test_an_agent_works_with_its_own_credential_which_dies_with_it(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        m1 = await harness.register_machine(srv.addr, "m1", tmp)
        m1.start()
        try:
            await remote_room(srv, "m1", builder="work")
            async with harness.client(srv.addr) as admin:
                sent = await admin.send("room", "builder", "build it")

                async def started() -> bool:
                    t = await admin.get_task(sent.id)
                    return t.status == tpb.TASK_STATUS_IN_PROGRESS

                await harness.wait_for(started, 20, what="the agent started the task")
                history = await admin.task_history(sent.id)
            pid = await agent_pid(srv, "builder")
            env = environ(pid)
            token = env["VIGIL_TOKEN"]
            # Its own credential and nothing else: not the daemon's, not the admin's.
            assert token not in (m1.credential, srv.admin_token)
            assert "VIGIL_TOKEN_FILE" not in env and srv.admin_token not in env.values()
            assert m1.credential not in env.values()
            assert token not in cmdline(pid)
            actors = {h.trigger: h.actor for h in history}
            assert actors["startTask"].startswith("agent:room/builder@m1#")
            assert actors["claimTask"] == actors["startTask"]

            watch = asyncio.create_task(_stream_until_refused(srv.addr, token))
            await asyncio.sleep(0.5)
            assert not watch.done()  # its stream is open
            os.kill(pid, signal.SIGKILL)
            code, ended = await asyncio.wait_for(watch, 10)
            # Refused no later than a second after the exit was recorded (it may be
            # earlier: the dropped stream gives its task back and the role is restarted).
            conn = await asyncpg.connect(db_url)
            try:

                async def exit_recorded() -> datetime | None:
                    at: datetime | None = await conn.fetchval(
                        "SELECT recorded_at FROM tasks.agent_exits WHERE pid = $1", pid
                    )
                    return at

                recorded = await harness.wait_for(exit_recorded, 10, what="the exit recorded")
            finally:
                await conn.close()
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert ended - recorded.timestamp() <= 1.0
            assert "revoked" in await _refused(srv.addr, token)
        finally:
            await m1.stop()


async def test_unregistering_a_machine_refuses_its_daemon_and_agents_within_a_second(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        m1 = await harness.register_machine(srv.addr, "m1", tmp)
        m1.start()
        try:
            await remote_room(srv, "m1", builder="idle")
            rc, _out, _err = await vigil(
                srv.addr, "agent", "start", "--chatroom", "room", "--role", "builder"
            )
            assert rc == 0
            pid = await agent_pid(srv, "builder")
            token = environ(pid)["VIGIL_TOKEN"]
            await harness.wait_live(db_url, "room", "builder")
            watch = asyncio.create_task(_stream_until_refused(srv.addr, token))
            await asyncio.sleep(0.3)
            rc, out, err = await vigil(
                srv.addr, "machine", "unregister", "--machine-id", "m1", "--reason", "stolen"
            )
            done = time.time()
            assert rc == 0, err
            assert "unregistered machine m1" in out
            code, ended = await asyncio.wait_for(watch, 5)
            assert code == grpc.StatusCode.UNAUTHENTICATED and ended - done <= 1.0
            for secret in (token, m1.credential):
                assert "unregistered" in await _refused(srv.addr, secret)
            assert m1.proc is not None
            assert await asyncio.to_thread(m1.proc.wait, 10) == 1  # the daemon was refused
            row = await harness.wait_offline(db_url, "room", "builder", 5)
            assert row["offline_reason"] == "revoked"
        finally:
            await m1.stop()
            for child in children_of(os.getpid()):
                if "VIGIL_ROLE" in environ(child):
                    os.kill(child, signal.SIGKILL)


# -- revoked tokens ------------------------------------------------------------------


async def test_a_revoked_chatroom_token_ends_wait_for_task_at_once_in_one_line(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv, "room", "builder")
        async with harness.client(srv.addr) as admin:
            made = await admin.create_token(TokenKind.CHATROOM, "ci", chatroom="room")
            agent = harness.spawn_agent(
                srv.addr, "room", "builder", tmp, env={"VIGIL_TOKEN": made.secret}
            )
            await harness.wait_live(db_url, "room", "builder")
            await admin.revoke_token(made.token.id, "leaked")
            revoked = time.monotonic()
        rc = await asyncio.to_thread(agent.proc.wait, 5)
        took = time.monotonic() - revoked
        assert rc == 1 and took <= 1.0, (rc, took)
        line = one_line_error(agent.stderr().splitlines()[-1])
        assert "UNAUTHENTICATED" in line and "revoked" in line
        assert made.secret not in agent.stderr()
        row = await harness.wait_offline(db_url, "room", "builder", 5)
        assert row["offline_reason"] == "revoked"


# -- audits name the principal -------------------------------------------------------


def _with_unknown_field(msg: tpb.SendMessageRequest, number: int, value: str) -> bytes:
    """`msg` on the wire plus a string field `number` it no longer has (what a client
    built from an older contract, or a forger, would send)."""
    data = value.encode()
    return msg.SerializeToString() + bytes([(number << 3) | 2, len(data)]) + data


async def test_audits_name_the_authenticated_principal_not_a_claimed_one(
    db_url: str, tmp: Path
) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv, "room", "builder")
        token = await chatroom_token(srv, "room", "alice")
        # A forged `sender` (the old field 4) is ignored; the sender is alice's token.
        raw = _with_unknown_field(
            tpb.SendMessageRequest(chatroom="room", role="builder", text="hi"), 4, "cli:mallory"
        )
        async with harness.channel(srv.addr, token) as ch:
            sent = await tpb_grpc.TasksStub(ch).SendMessage(tpb.SendMessageRequest.FromString(raw))
        assert sent.sent_by == "chatroom:room:alice"
        agent = harness.spawn_agent(srv.addr, "room", "builder", tmp, env={"VIGIL_TOKEN": token})
        assert await asyncio.to_thread(agent.proc.wait, 15) == 0  # took the task and left
        async with harness.client(srv.addr) as admin:
            task = await admin.get_task(sent.id)
            assert task.claimed_by == "chatroom:room:alice"
            await admin.cancel_task(sent.id, "done by hand")
            history = await admin.task_history(sent.id)
        assert [(h.trigger, h.actor) for h in history] == [
            ("claimTask", "chatroom:room:alice"),
            ("cancelTask", "admin:bootstrap"),
        ]
        # Commands name who asked; notifications whose action raised them.
        m1 = await harness.register_machine(srv.addr, "m1", tmp)
        async with harness.client(srv.addr) as admin:
            await admin.create_chatroom(
                "remote",
                [
                    tpb.Role(
                        role="r", kind=common_pb2.AGENT_KIND_REMOTE, machine="m1", harness="nosuch"
                    )
                ],
            )
            await admin.start_agent("remote", "r")
            commands = await admin.list_commands("m1")
        assert [c.requested_by for c in commands] == ["admin:bootstrap"]
        m1.start()
        try:

            async def refused() -> list[tpb.Notification]:
                async with harness.client(srv.addr) as admin:
                    return [
                        n
                        for n in await admin.list_notifications()
                        if n.kind == NotificationKind.COMMAND_FAILED.to_pb()
                    ]

            notes = await harness.wait_for(refused, 20, what="the start_failed notification")
            assert notes[0].actor == "machine:m1"
        finally:
            await m1.stop()


async def test_the_client_finds_no_token_and_says_how_to_get_one(db_url: str, tmp: Path) -> None:
    async with local_server(db_url, TIMINGS) as srv:
        env = harness.child_env({"VIGIL_ADDR": srv.addr, "VIGIL_DATA_DIR": str(tmp / "none")})
        env.pop("VIGIL_TOKEN")
        proc = await asyncio.create_subprocess_exec(
            *harness.vigil_cmd("chatrooms"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _out, err = await proc.communicate()
        line = one_line_error(err.decode())
        assert proc.returncode == 1 and "UNAUTHENTICATED" in line and "VIGIL_TOKEN" in line
        with pytest.raises(RPCError) as exc:
            async with harness.client(srv.addr, "vigil_0123456789abcdef_" + "x" * 43) as c:
                await c.list_chatrooms()
        assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_the_open_streams_check_returns_only_tokens_without_rights(db_url: str) -> None:
    """The statement every replica runs each second over its open streams' tokens
    (Authenticator._check_streams): unknown, revoked and expired ones come back; the
    active ones, whatever their number, do not."""
    async with local_server(db_url, TIMINGS) as srv:
        store = srv.auth.store
        now = datetime.now(UTC)
        active = [
            (await store.create(TokenKind.READONLY, f"active {i}", SYSTEM))[0].id for i in range(3)
        ]
        later = (
            await store.create(
                TokenKind.READONLY, "expires later", SYSTEM, expires_at=now + timedelta(hours=1)
            )
        )[0].id
        expired = (
            await store.create(
                TokenKind.READONLY, "expired", SYSTEM, expires_at=now - timedelta(seconds=1)
            )
        )[0].id
        revoked = (await store.create(TokenKind.READONLY, "revoked", SYSTEM))[0].id
        await store.revoke(revoked, now, "test")
        ids = [*active, later, expired, revoked, "unknown"]
        assert sorted(await store.inactive(ids, now)) == sorted([expired, revoked, "unknown"])
        # The same tokens two hours on: the one that expires later has expired too.
        in_two_hours = await store.inactive(ids, now + timedelta(hours=2))
        assert sorted(in_two_hours) == sorted([later, expired, revoked, "unknown"])
        assert await store.inactive([], now) == []
