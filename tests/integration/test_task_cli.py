"""The task commands of `vigil` as real processes against an in-process server: chatrooms,
send, listing, one task's life and history, refusals as one line, notifications."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from vigil import testing as harness
from vigil.core.vocab import TaskStatus
from vigil.testing import LocalServer, child_env, local_server, vigil_cmd
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import tasks_pb2 as pb
from vigil.v1 import tasks_pb2_grpc as pb_grpc

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow

TIMINGS = harness.fast_timings()
_BEATING: set[asyncio.Future[None]] = set()  # the claimers' heartbeat loops
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TASK_KEYS = {
    "id",
    "chatroom",
    "role",
    "status",
    "attempt",
    "assigned_to",
    "created_at",
    "acknowledged_at",
    "started_at",
    "completed_at",
    "deadline_at",
    "text",
    "recoveries",
    "needs_attention",
}
# The CLI here holds the server's bootstrap admin token: the audit names that principal.
ACTOR = "admin:bootstrap"


async def vigil(
    addr: str, *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `vigil ARGS` off the event loop, so the in-process server keeps answering."""
    return await asyncio.to_thread(
        subprocess.run,
        vigil_cmd(*args),
        env=child_env({"VIGIL_ADDR": addr}),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    assert proc.stderr == ""
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The refusal is exactly one `vigil: error: …` line on stderr and nothing on stdout."""
    assert proc.returncode == code, f"exit {proc.returncode}: {proc.stderr}"
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vigil: error: ") and "Traceback" not in proc.stderr
    return lines[0].removeprefix("vigil: error: ")


def check_times(task: dict[str, Any], set_: set[str]) -> None:
    for key in ("created_at", "acknowledged_at", "started_at", "completed_at", "deadline_at"):
        if key in set_:
            assert isinstance(task[key], str) and RFC3339.match(task[key]), (key, task[key])
        else:
            assert task[key] is None, (key, task[key])


@pytest.fixture
async def srv(db_url: str) -> AsyncIterator[LocalServer]:
    async with local_server(db_url, TIMINGS) as s:
        yield s


async def make_room(addr: str, name: str = "demo") -> None:
    ok(await vigil(addr, "chatroom", "create", name, "--role", "builder=custom"))


async def test_chatroom_create_with_both_kinds_then_show_and_list(srv: LocalServer) -> None:
    await srv.tasks.svc.agents.register_machine("box-1", "h", ["claude"], harness.ADMIN)
    created = json.loads(
        ok(
            await vigil(
                srv.addr,
                "chatroom",
                "create",
                "demo",
                "--role",
                "builder=remote:box-1:claude",
                "--role",
                "reviewer=custom",
                "--json",
            )
        )
    )
    assert created["name"] == "demo" and RFC3339.match(created["created_at"])
    assert sorted(created["roles"], key=lambda r: r["role"]) == [
        {
            "role": "builder",
            "kind": "remote",
            "machine": "box-1",
            "harness": "claude",
            "command": None,
        },
        {"role": "reviewer", "kind": "custom", "machine": None, "harness": None, "command": None},
    ]
    shown = json.loads(ok(await vigil(srv.addr, "chatroom", "show", "demo", "--json")))
    assert shown == created
    listed = json.loads(ok(await vigil(srv.addr, "chatrooms", "--json")))
    assert listed == [created]

    text = ok(await vigil(srv.addr, "chatroom", "show", "demo")).splitlines()
    assert text[0].startswith("chatroom demo (created ")
    assert text[1].split() == ["ROLE", "KIND", "MACHINE", "HARNESS", "COMMAND"]
    assert {tuple(line.split()[:3]) for line in text[2:]} == {
        ("builder", "remote", "box-1"),
        ("reviewer", "custom", "-"),
    }


async def test_chatroom_from_a_team_file(srv: LocalServer, tmp: Path) -> None:
    await srv.tasks.svc.agents.register_machine("m1", "h", [], harness.ADMIN)
    team = tmp / "team.json"
    team.write_text(
        json.dumps(
            {
                "roles": [
                    {"role": "builder", "kind": "remote", "machine": "m1", "command": "run"},
                    {"role": "reviewer", "kind": "custom"},
                ]
            }
        )
    )
    room = json.loads(
        ok(await vigil(srv.addr, "chatroom", "create", "t", "--team-file", str(team), "--json"))
    )
    assert {r["role"]: r["kind"] for r in room["roles"]} == {
        "builder": "remote",
        "reviewer": "custom",
    }
    team.write_text('{"roles": [{"role": "a", "kind": "remote"}]')
    err = one_line_error(
        await vigil(srv.addr, "chatroom", "create", "u", "--team-file", str(team)), 2
    )
    assert err.startswith(f"--team-file {team}: not valid JSON")


async def test_send_prints_the_id_first_and_the_task_is_listed(srv: LocalServer) -> None:
    await make_room(srv.addr)
    out = ok(await vigil(srv.addr, "send", "--chatroom", "demo", "--role", "builder", "fix", "it"))
    first = out.splitlines()[0]
    task_id, status, where, word, attempt = first.split()
    assert UUID.match(task_id)
    assert (status, where, word, attempt) == ("pending", "demo/builder", "attempt", "0")

    # The role is busy now: the next message queues behind it. `-` reads stdin.
    queued = json.loads(
        ok(
            await vigil(
                srv.addr,
                *("send", "--chatroom", "demo", "--role", "builder", "-", "--json"),
                stdin="line one\nline: two\n",
            )
        )
    )
    assert set(queued) >= TASK_KEYS
    assert queued["status"] == "queued" and queued["text"] == "line one\nline: two"

    listed = json.loads(ok(await vigil(srv.addr, "tasks", "--json")))
    assert {t["id"]: t["status"] for t in listed} == {task_id: "pending", queued["id"]: "queued"}
    for t in listed:
        assert set(t) >= TASK_KEYS
    only = json.loads(ok(await vigil(srv.addr, "tasks", "--status", "queued", "--json")))
    assert [t["id"] for t in only] == [queued["id"]]
    assert json.loads(ok(await vigil(srv.addr, "tasks", "--chatroom", "other", "--json"))) == []

    table = ok(await vigil(srv.addr, "tasks", "--chatroom", "demo")).splitlines()
    assert table[0].split() == [
        "ID",
        "CHATROOM",
        "ROLE",
        "STATUS",
        "ATTEMPT",
        "ASSIGNED_TO",
        "CREATED_AT",
        "DEADLINE_AT",
    ]
    assert sorted(line.split()[0] for line in table[1:]) == sorted([task_id, queued["id"]])


async def test_task_show_history_and_cancel(srv: LocalServer) -> None:
    await make_room(srv.addr)
    out = ok(await vigil(srv.addr, "send", "--chatroom", "demo", "--role", "builder", "hello"))
    task_id = out.split()[0]

    task = json.loads(ok(await vigil(srv.addr, "task", "show", task_id, "--json")))
    assert set(task) >= TASK_KEYS
    assert (task["id"], task["status"], task["attempt"], task["text"]) == (
        task_id,
        "pending",
        0,
        "hello",
    )
    assert task["assigned_to"] is None and task["recoveries"] == 0
    assert task["needs_attention"] is False
    check_times(task, {"created_at", "deadline_at"})
    shown = ok(await vigil(srv.addr, "task", "show", task_id)).splitlines()
    assert shown[0] == f"{task_id} pending demo/builder attempt 0" and shown[-1] == "hello"

    cancelled = ok(await vigil(srv.addr, "task", "cancel", task_id, "--reason", "duplicate"))
    assert cancelled.split()[:2] == [task_id, "closed"]
    history = json.loads(ok(await vigil(srv.addr, "task", "history", task_id, "--json")))
    assert len(history) == 1
    h = history[0]
    assert (h["from_status"], h["to_status"], h["trigger"], h["actor"], h["reason"]) == (
        "pending",
        "closed",
        "cancelTask",
        ACTOR,
        "duplicate",
    )
    assert h["attempt"] == 0 and RFC3339.match(h["at"])
    table = ok(await vigil(srv.addr, "task", "history", task_id)).splitlines()
    assert table[0].split() == ["AT", "TRANSITION", "TRIGGER", "ACTOR", "ATTEMPT", "REASON"]
    assert table[1].split()[1:] == ["pending→closed", "cancelTask", ACTOR, "0", "duplicate"]

    # A closed task cannot be cancelled again: the FSM's own reason, in one line.
    err = one_line_error(await vigil(srv.addr, "task", "cancel", task_id), 1)
    assert "cannot cancelTask a task that is closed" in err and "FAILED_PRECONDITION" in err


async def _claim(addr: str, chatroom: str, role: str) -> tuple[grpc.aio.Channel, Any, pb.Task]:
    """Join as a live participant and claim the role's task, as wait-for-task does."""
    ch = harness.channel(addr)
    session = lpb_grpc.LivenessStub(ch).Session()
    join = harness.join_request(chatroom, role)
    await session.write(lpb.SessionRequest(join=join))
    first = await session.read()
    assert first.WhichOneof("msg") == "joined"

    async def beat() -> None:
        # Alive for as long as the test holds the claim: a claim goes with its
        # participant (one that stops beating is expired and its task recovered).
        with contextlib.suppress(Exception):
            while True:
                await session.write(lpb.SessionRequest(heartbeat=lpb.SessionRequest.Beat()))
                await session.read()
                await asyncio.sleep(TIMINGS.heartbeat_interval / 2)

    beating = asyncio.ensure_future(beat())
    _BEATING.add(beating)
    beating.add_done_callback(_BEATING.discard)
    call = pb_grpc.TasksStub(ch).AwaitTask(
        pb.AwaitTaskRequest(
            chatroom=chatroom,
            role=role,
            connection_id=join.connection_id,
            epoch=first.joined.participant.epoch,
        )
    )
    reply = await asyncio.wait_for(call.read(), 10)
    return ch, session, reply.task


async def test_a_stale_attempt_is_refused_in_one_line(srv: LocalServer) -> None:
    await make_room(srv.addr)
    out = ok(await vigil(srv.addr, "send", "--chatroom", "demo", "--role", "builder", "build"))
    task_id = out.split()[0]
    ch, session, claimed = await _claim(srv.addr, "demo", "builder")
    try:
        assert (claimed.id, claimed.status) == (task_id, TaskStatus.ACKNOWLEDGED.to_pb())
        attempt = claimed.attempt

        stale = await vigil(srv.addr, "task", "start", task_id, "--attempt", str(attempt + 1))
        err = one_line_error(stale, 1)
        assert err == (
            f"cannot start task {task_id} with attempt {attempt + 1}: it is on attempt "
            f"{attempt}, and no later attempt was ever handed out (FAILED_PRECONDITION)"
        )

        started = ok(await vigil(srv.addr, "task", "start", task_id, "--attempt", str(attempt)))
        assert started.split()[:2] == [task_id, "in_progress"]
        done = json.loads(
            ok(
                await vigil(
                    srv.addr, "task", "complete", task_id, "--attempt", str(attempt), "--json"
                )
            )
        )
        assert done["status"] == "completed"
        check_times(done, {"created_at", "acknowledged_at", "started_at", "completed_at"})
        assert done["assigned_to"]

        history = json.loads(ok(await vigil(srv.addr, "task", "history", task_id, "--json")))
        assert [(h["from_status"], h["to_status"], h["trigger"]) for h in history] == [
            ("pending", "acknowledged", "claimTask"),
            ("acknowledged", "in_progress", "startTask"),
            ("in_progress", "completed", "completeTask"),
        ]
        assert [h["actor"] for h in history][1:] == [ACTOR, ACTOR]
    finally:
        session.cancel()
        await ch.close()


async def test_refusals_are_one_line(srv: LocalServer, tmp: Path) -> None:
    unknown = str(uuid.uuid4())
    for action in (("show",), ("history",), ("cancel",), ("start", "--attempt", "0")):
        err = one_line_error(await vigil(srv.addr, "task", action[0], unknown, *action[1:]), 1)
        assert err == f"no task {unknown} (NOT_FOUND)"
    err = one_line_error(await vigil(srv.addr, "task", "show", "not-a-uuid"), 2)
    assert "not a UUID" in err

    err = one_line_error(await vigil(srv.addr, "chatroom", "show", "nope"), 1)
    assert err == "no chatroom 'nope' (create it with `vigil chatroom create`) (NOT_FOUND)"
    err = one_line_error(await vigil(srv.addr, "send", "--chatroom", "nope", "--role", "r", "x"), 1)
    assert "NOT_FOUND" in err

    # The CLI's own checks: usage errors, exit 2, before any request.
    err = one_line_error(await vigil(srv.addr, "chatroom", "create", "d", "--role", "b=remote"), 2)
    assert err == (
        "--role 'b=remote': a remote role needs its machine and harness "
        "(remote:MACHINE:HARNESS, e.g. remote:box-1:claude)"
    )
    err = one_line_error(await vigil(srv.addr, "chatroom", "create", "d", "--role", "b"), 2)
    assert err.startswith("--role 'b': expected ROLE=custom")
    err = one_line_error(await vigil(srv.addr, "task", "start", unknown), 2)
    assert "--attempt" in err

    # The server's own INVALID_ARGUMENT and NOT_FOUND reasons are shown as they are.
    team = tmp / "bad.json"
    team.write_text(
        json.dumps({"roles": [{"role": "b", "kind": "remote", "machine": "m", "command": "a\0b"}]})
    )
    err = one_line_error(
        await vigil(srv.addr, "chatroom", "create", "d", "--team-file", str(team)), 1
    )
    assert err.startswith("role 'b' command holds a control character") and err.endswith(
        "(INVALID_ARGUMENT)"
    )
    err = one_line_error(
        await vigil(srv.addr, "chatroom", "create", "d", "--role", "b=remote:ghost:claude"), 1
    )
    assert err.startswith("machine 'ghost' is not registered") and err.endswith("(NOT_FOUND)")


async def test_unreachable_server_is_one_line(tmp: Path) -> None:
    proc = await vigil("127.0.0.1:1", "tasks")
    assert "cannot reach Vigil at 127.0.0.1:1" in one_line_error(proc, 1)


@pytest.fixture
async def slow_srv(db_url: str) -> AsyncIterator[LocalServer]:
    # Pending for 300 ms with nobody live for a custom role: the user is notified.
    async with local_server(db_url, harness.fast_timings(task_pending_timeout_ms=300)) as s:
        yield s


async def test_notifications_list_and_follow(slow_srv: LocalServer) -> None:
    addr = slow_srv.addr
    assert json.loads(ok(await vigil(addr, "notifications", "--json"))) == []
    assert ok(await vigil(addr, "notifications")) == "no notifications\n"
    await make_room(addr)

    follow = subprocess.Popen(
        vigil_cmd("notifications", "--follow", "--json"),
        env=child_env({"VIGIL_ADDR": addr}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await asyncio.sleep(1.0)  # let it list (nothing) and start watching
        out = ok(await vigil(addr, "send", "--chatroom", "demo", "--role", "builder", "anyone?"))
        task_id = out.split()[0]
        assert follow.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(follow.stdout.readline), 15)
        pushed = json.loads(line)
        assert (pushed["kind"], pushed["task_id"], pushed["chatroom"], pushed["role"]) == (
            "pending_timeout",
            task_id,
            "demo",
            "builder",
        )
        assert RFC3339.match(pushed["created_at"]) and pushed["message"]
    finally:
        follow.send_signal(signal.SIGINT)
        rc = await asyncio.to_thread(follow.wait, 10)
        _, err = await asyncio.to_thread(follow.communicate)
    assert rc == 130 and err == ""

    listed = json.loads(ok(await vigil(addr, "notifications", "--json")))
    assert listed[0] == pushed
    text = ok(await vigil(addr, "notifications")).splitlines()
    assert f"#{pushed['id']} pending_timeout demo/builder task {task_id}: " in text[0]


async def test_follow_resumes_across_a_server_restart(db_url: str, tmp: Path) -> None:
    """A graceful restart of `vigil up` on the same port: the follower says so once,
    resumes after the last notification it saw, and neither misses nor repeats one."""
    env = child_env(
        {
            "DATABASE_URL": db_url,
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            "VIGIL_TASK_PENDING_TIMEOUT_MS": "300",
        }
    )
    first = harness.start_server_process(["up", "--addr", "127.0.0.1:0"], env, tmp / "a.log")
    addr = first.addr
    servers = [first]
    follow = subprocess.Popen(
        vigil_cmd("notifications", "--follow"),
        env=child_env({"VIGIL_ADDR": addr}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert follow.stdout is not None
    printed: list[str] = []

    stdout = follow.stdout

    async def read_until(task_id: str) -> None:
        while True:
            line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), 20)
            assert line, "the follower stopped"
            printed.append(line)
            if f"pending_timeout demo/builder task {task_id}" in line:
                return

    try:
        await make_room(addr)
        one = ok(await vigil(addr, "send", "--chatroom", "demo", "--role", "builder", "1"))
        await read_until(one.split()[0])
        # Nobody takes it: it would notify again at every timeout; close it.
        ok(await vigil(addr, "task", "cancel", one.split()[0]))

        assert await asyncio.to_thread(first.stop, signal.SIGTERM) == 0
        second = await asyncio.to_thread(
            harness.start_server_process, ["up", "--addr", addr], env, tmp / "b.log"
        )
        servers.append(second)
        two = ok(await vigil(addr, "send", "--chatroom", "demo", "--role", "builder", "2"))
        await read_until(two.split()[0])
        stored = json.loads(ok(await vigil(addr, "notifications", "--json")))
    finally:
        follow.send_signal(signal.SIGINT)
        rc = await asyncio.to_thread(follow.wait, 10)
        _rest, err = await asyncio.to_thread(follow.communicate)
        for s in servers:
            await asyncio.to_thread(s.stop, signal.SIGTERM)
    assert rc == 130
    ids = [int(m.group(1)) for m in (re.search(r" #(\d+) ", line) for line in printed) if m]
    assert len(ids) == len(printed)
    # Every stored notification up to the last one printed, each exactly once, in order.
    assert ids == [n["id"] for n in stored if n["id"] <= ids[-1]]
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("vigil: ") and lines[0].endswith("; reconnecting")
    assert lines[1].startswith("vigil: reconnected; resuming after notification ")
