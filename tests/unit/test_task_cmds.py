"""The task commands' pure parts: role specs, team files, message text, JSON and tables."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vigil.cli import task_cmds
from vigil.cli.main import build_parser
from vigil.cli.rpc import CliError
from vigil.core.timefmt import to_proto
from vigil.core.vocab import AgentKind, NotificationKind, TaskStatus
from vigil.v1 import tasks_pb2 as pb

TASK_ID = "0b7f5e1c-6a0e-4c43-9a7f-3f2d1f1e2a10"
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _usage_error(exc: pytest.ExceptionInfo[CliError]) -> str:
    assert exc.value.exit_code == 2
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- --role ------------------------------------------------------------------------


def test_role_spec_custom() -> None:
    r = task_cmds.parse_role_spec("reviewer=custom")
    assert (r.role, r.kind, r.machine, r.command) == ("reviewer", AgentKind.CUSTOM.to_pb(), "", "")


def test_role_spec_remote_names_a_harness() -> None:
    r = task_cmds.parse_role_spec("builder=remote:box-1:claude")
    assert (r.role, r.kind, r.machine, r.harness, r.command) == (
        "builder",
        AgentKind.REMOTE.to_pb(),
        "box-1",
        "claude",
        "",
    )


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("builder", "expected ROLE=custom"),
        ("=custom", "expected ROLE=custom"),
        ("builder=", "unknown kind ''"),
        ("builder=robot", "unknown kind 'robot'"),
        ("builder=remote", "needs its machine and harness"),
        ("builder=remote:", "needs its machine and harness"),
        ("builder=remote::claude", "needs its machine and harness"),
        ("builder=remote:box-1", "needs its machine and harness"),
        ("builder=remote:box-1:claude --print", "a command line goes in a --team-file"),
        ("builder=custom:box", "takes no machine"),
        ("bad role=custom", "may contain only"),
    ],
)
def test_bad_role_spec_is_a_one_line_usage_error(spec: str, needle: str) -> None:
    with pytest.raises(CliError) as exc:
        task_cmds.parse_role_spec(spec)
    message = _usage_error(exc)
    assert needle in message and repr(spec) in message


# -- --team-file -------------------------------------------------------------------


def _team(tmp_path: Path, content: str) -> str:
    f = tmp_path / "team.json"
    f.write_text(content)
    return str(f)


def test_team_file_roles(tmp_path: Path) -> None:
    path = _team(
        tmp_path,
        json.dumps(
            {
                "roles": [
                    {"role": "builder", "kind": "remote", "machine": "m1", "harness": "claude"},
                    {"role": "tool", "kind": "remote", "machine": "m1", "command": "a:b c"},
                    {"role": "reviewer", "kind": "custom"},
                ]
            }
        ),
    )
    roles = task_cmds.load_team_file(path)
    assert [task_cmds.role_json(r) for r in roles] == [
        {
            "role": "builder",
            "kind": "remote",
            "machine": "m1",
            "harness": "claude",
            "command": None,
        },
        {"role": "tool", "kind": "remote", "machine": "m1", "harness": None, "command": "a:b c"},
        {"role": "reviewer", "kind": "custom", "machine": None, "harness": None, "command": None},
    ]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON: Expecting property name"),
        ("[]", 'expected an object {"roles": [...]}'),
        ('{"roles": {}}', 'expected an object {"roles": [...]}'),
        ('{"roles": [3]}', "roles[0]: expected an object"),
        ('{"roles": [{"kind": "custom"}]}', "roles[0]: 'role' is required"),
        ('{"roles": [{"role": "a", "kind": "robot"}]}', "'kind' must be 'remote' or 'custom'"),
        ('{"roles": [{"role": "a", "kind": "remote"}]}', "'machine' is required"),
        (
            '{"roles": [{"role": "a", "kind": "remote", "machine": "m"}]}',
            "'harness' or a 'command'",
        ),
        ('{"roles": [{"role": "a", "kind": "custom", "machine": "m"}]}', "takes no machine"),
        ('{"roles": [{"role": "a", "kind": "custom", "machin": "m"}]}', "unknown key 'machin'"),
        ('{"roles": [{"role": 7, "kind": "custom"}]}', "'role' must be a string"),
    ],
)
def test_bad_team_file_names_the_file(tmp_path: Path, content: str, needle: str) -> None:
    path = _team(tmp_path, content)
    with pytest.raises(CliError) as exc:
        task_cmds.load_team_file(path)
    message = _usage_error(exc)
    assert message.startswith(f"--team-file {path}: ") and needle in message


def test_missing_team_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.json")
    with pytest.raises(CliError) as exc:
        task_cmds.load_team_file(path)
    assert _usage_error(exc) == f"--team-file {path}: cannot read: No such file or directory"


def test_chatroom_roles_merges_and_refuses_duplicates(tmp_path: Path) -> None:
    path = _team(tmp_path, '{"roles": [{"role": "builder", "kind": "custom"}]}')
    roles = task_cmds.chatroom_roles(["reviewer=custom"], path)
    assert [r.role for r in roles] == ["builder", "reviewer"]
    with pytest.raises(CliError) as exc:
        task_cmds.chatroom_roles(["builder=remote:m:h"], path)
    assert "'builder' is given twice" in _usage_error(exc)
    with pytest.raises(CliError) as exc:
        task_cmds.chatroom_roles([], None)
    assert "at least one --role" in _usage_error(exc)


# -- send TEXT ---------------------------------------------------------------------


def test_message_text_joins_words_or_reads_stdin() -> None:
    assert task_cmds.message_text(["fix", "the", "build"], io.StringIO("x")) == "fix the build"
    assert task_cmds.message_text(["-"], io.StringIO("line 1\nline 2\n")) == "line 1\nline 2"
    with pytest.raises(CliError) as exc:
        task_cmds.message_text(["-"], io.StringIO("  \n"))
    assert _usage_error(exc) == "the message is empty"


def test_task_id_must_be_a_uuid() -> None:
    assert task_cmds.check_task_id(TASK_ID.upper()) == TASK_ID
    with pytest.raises(CliError) as exc:
        task_cmds.check_task_id("42")
    assert "not a UUID" in _usage_error(exc)


# -- rendering ---------------------------------------------------------------------


def _task(**fields: object) -> pb.Task:
    base: dict[str, object] = {
        "id": TASK_ID,
        "chatroom": "demo",
        "role": "builder",
        "text": "fix the build",
        "status": "acknowledged",
        "attempt": 2,
        "assigned_to": "conn-1",
        "created_at": to_proto(T0),
        "acknowledged_at": to_proto(T0),
        "deadline_at": to_proto(T0),
        "recoveries": 1,
    }
    base.update(fields)
    if isinstance(base["status"], str):
        base["status"] = TaskStatus(base["status"]).to_pb()
    return pb.Task(**base)  # type: ignore[arg-type]


def test_task_json_has_every_field_and_nulls_unset_times() -> None:
    d = task_cmds.task_json(_task())
    assert d == {
        "id": TASK_ID,
        "chatroom": "demo",
        "role": "builder",
        "status": "acknowledged",
        "attempt": 2,
        "assigned_to": "conn-1",
        "created_at": "2025-03-01T12:00:00.123456Z",
        "acknowledged_at": "2025-03-01T12:00:00.123456Z",
        "started_at": None,
        "completed_at": None,
        "deadline_at": "2025-03-01T12:00:00.123456Z",
        "text": "fix the build",
        "recoveries": 1,
        "needs_attention": False,
    }
    json.dumps(d)  # serialisable as is
    # The epoch itself is a set time, not a missing one: HasField, not truthiness.
    epoch = task_cmds.task_json(_task(started_at=to_proto(datetime(1970, 1, 1, tzinfo=UTC))))
    assert epoch["started_at"] == "1970-01-01T00:00:00.000000Z"
    assert task_cmds.task_json(pb.Task(id=TASK_ID))["assigned_to"] is None


def test_task_text_puts_the_id_first() -> None:
    t = _task()
    assert task_cmds.task_summary(t) == f"{TASK_ID} acknowledged demo/builder attempt 2"
    assert task_cmds.render_task_text(t) == f"{TASK_ID} acknowledged demo/builder attempt 2\n" + (
        "fix the build"
    )
    flagged = task_cmds.task_summary(_task(needs_attention=True))
    assert flagged.endswith(" needs-attention")
    detail = task_cmds.render_task_detail(t).splitlines()
    assert detail[0] == task_cmds.task_summary(t)
    assert any(line.split() == ["started_at:", "-"] for line in detail)
    assert detail[-1] == "fix the build"


def test_tasks_table() -> None:
    rows = [task_cmds.task_json(_task()), task_cmds.task_json(_task(id="x", assigned_to=""))]
    lines = task_cmds.render_table(rows, task_cmds.TASK_COLUMNS, "no tasks").splitlines()
    assert lines[0].split() == [c.upper() for c in task_cmds.TASK_COLUMNS]
    assert lines[1].split() == [
        TASK_ID,
        "demo",
        "builder",
        "acknowledged",
        "2",
        "conn-1",
        "2025-03-01T12:00:00.123456Z",
        "2025-03-01T12:00:00.123456Z",
    ]
    assert lines[2].split()[5] == "-"
    # Columns line up: every value starts where its header does.
    start = lines[0].index("STATUS")
    assert lines[1][start:].startswith("acknowledged") and lines[2][start:].startswith("ack")
    assert task_cmds.render_table([], task_cmds.TASK_COLUMNS, "no tasks") == "no tasks"


def test_chatroom_rendering() -> None:
    room = pb.Chatroom(
        name="demo",
        roles=[
            pb.Role(role="builder", kind=AgentKind.REMOTE.to_pb(), machine="m1", harness="claude"),
            pb.Role(role="reviewer", kind=AgentKind.CUSTOM.to_pb()),
        ],
        created_at=to_proto(T0),
    )
    assert task_cmds.chatroom_json(room) == {
        "name": "demo",
        "roles": [
            {
                "role": "builder",
                "kind": "remote",
                "machine": "m1",
                "harness": "claude",
                "command": None,
            },
            {
                "role": "reviewer",
                "kind": "custom",
                "machine": None,
                "harness": None,
                "command": None,
            },
        ],
        "created_at": "2025-03-01T12:00:00.123456Z",
    }
    lines = task_cmds.render_chatroom(room).splitlines()
    assert lines[0] == "chatroom demo (created 2025-03-01T12:00:00.123456Z)"
    assert lines[1].split() == ["ROLE", "KIND", "MACHINE", "HARNESS", "COMMAND"]
    assert lines[2].split() == ["builder", "remote", "m1", "claude", "-"]
    assert lines[3].split() == ["reviewer", "custom", "-", "-", "-"]
    listing = task_cmds.render_chatrooms([room]).splitlines()
    assert "builder(remote), reviewer(custom)" in listing[1]
    assert task_cmds.render_chatrooms([]) == "no chatrooms"


def test_history_rendering() -> None:
    created = pb.Transition(
        to_status=TaskStatus.PENDING.to_pb(),
        trigger="createTask",
        actor="cli:ann",
        attempt=0,
        at=to_proto(T0),
    )
    claimed = pb.Transition(
        from_status=TaskStatus.PENDING.to_pb(),
        to_status=TaskStatus.ACKNOWLEDGED.to_pb(),
        trigger="claimTask",
        actor="conn-1",
        attempt=0,
        reason="delivered\nover stream",
        at=to_proto(T0),
    )
    assert task_cmds.transition_json(created)["from_status"] is None
    assert task_cmds.transition_json(created)["reason"] is None
    lines = task_cmds.render_history([created, claimed]).splitlines()
    assert lines[0].split() == ["AT", "TRANSITION", "TRIGGER", "ACTOR", "ATTEMPT", "REASON"]
    assert lines[1].split()[1:] == ["(new)→pending", "createTask", "cli:ann", "0", "-"]
    # A row never spans two lines, whatever the reason holds.
    assert lines[2].split()[1:] == [
        "pending→acknowledged",
        "claimTask",
        "conn-1",
        "0",
        "delivered\\nover",
        "stream",
    ]


def test_notification_rendering() -> None:
    n = pb.Notification(
        id=7,
        kind=NotificationKind.ACK_TIMEOUT.to_pb(),
        chatroom="demo",
        role="reviewer",
        task_id=TASK_ID,
        message="not started in 2m",
        created_at=to_proto(T0),
    )
    assert task_cmds.notification_json(n) == {
        "id": 7,
        "kind": "ack_timeout",
        "chatroom": "demo",
        "role": "reviewer",
        "task_id": TASK_ID,
        "message": "not started in 2m",
        "created_at": "2025-03-01T12:00:00.123456Z",
    }
    assert task_cmds.notification_line(n) == (
        f"2025-03-01T12:00:00.123456Z #7 ack_timeout demo/reviewer task {TASK_ID}: "
        "not started in 2m"
    )


# -- the parser --------------------------------------------------------------------


def test_parser_knows_the_task_commands() -> None:
    p = build_parser()
    a = p.parse_args(
        ["chatroom", "create", "demo", "--role", "b=custom", "--role", "r=remote:m:h", "--json"]
    )
    assert (a.command, a.chatroom_command, a.name, a.role, a.json) == (
        "chatroom",
        "create",
        "demo",
        ["b=custom", "r=remote:m:h"],
        True,
    )
    a = p.parse_args(["send", "--chatroom", "c", "--role", "r", "fix", "it"])
    assert a.text == ["fix", "it"] and a.json is False
    a = p.parse_args(["task", "start", TASK_ID, "--attempt", "3"])
    assert (a.task_command, a.id, a.attempt) == ("start", TASK_ID, 3)
    a = p.parse_args(["task", "cancel", TASK_ID, "--reason", "dup"])
    assert a.reason == "dup"
    a = p.parse_args(["tasks", "--status", "pending", "--chatroom", "c"])
    assert (a.status, a.chatroom, a.limit) == ("pending", "c", 0)
    a = p.parse_args(["notifications", "--follow", "--json"])
    assert a.follow and a.json
    a = p.parse_args(["task-service", "serve", "--addr", "127.0.0.1:0"])
    assert (a.command, a.task_service_command, a.addr) == ("task-service", "serve", "127.0.0.1:0")
    assert p.parse_args(["wait-for-task", "--chatroom", "c", "--role", "r", "--json"]).json


@pytest.mark.parametrize(
    "argv",
    [
        ["task", "start", TASK_ID],
        ["task", "complete", TASK_ID],
        ["task", "frobnicate", TASK_ID],
        ["chatroom"],
        ["send", "--chatroom", "c", "--role", "r"],
        ["tasks", "--status", "done"],
    ],
)
def test_parser_usage_errors_are_exit_2(argv: list[str]) -> None:
    with pytest.raises(CliError) as exc:
        build_parser().parse_args(argv)
    _usage_error(exc)
