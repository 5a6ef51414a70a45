"""The machine commands: the credential file, JSON and tables, the parser, and each
command against an in-process fake Machines service (no database)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from vigil.cli import machine_cmds
from vigil.cli.main import MACHINE_COMMANDS, build_parser
from vigil.cli.rpc import CliError
from vigil.client import ClientConfig
from vigil.core.timefmt import to_proto
from vigil.core.vocab import AgentStatus, CommandStatus, DesiredState, ExitClassification
from vigil.daemon.harnesses import Harnesses
from vigil.v1 import machines_pb2 as pb
from vigil.v1 import machines_pb2_grpc as pb_grpc

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
T0_TEXT = "2025-03-01T12:00:00.123456Z"
SECRET = "s3cr3t-credential-value"


def _one_line(exc: pytest.ExceptionInfo[CliError], code: int = 2) -> str:
    assert exc.value.exit_code == code
    message = str(exc.value)
    assert "\n" not in message
    return message


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- the credential file -----------------------------------------------------------


def test_credential_round_trip_is_owner_only(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "box-1.credential"
    machine_cmds.write_credential(path, "box-1", SECRET)
    # Mode 600 even with umask 0.
    assert _mode(path) == 0o600
    assert json.loads(path.read_text()) == {"machine_id": "box-1", "credential": SECRET}
    assert machine_cmds.read_credential(path) == ("box-1", SECRET)
    assert machine_cmds.read_credential(str(path)) == ("box-1", SECRET)


def test_rewriting_narrows_an_existing_wide_file(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("old and much longer content than the new one will be " * 10)
    path.chmod(0o644)
    machine_cmds.write_credential(path, "box-1", SECRET)
    assert _mode(path) == 0o600
    assert machine_cmds.read_credential(path) == ("box-1", SECRET)


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o620, 0o660])
def test_a_file_others_can_open_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "c"
    machine_cmds.write_credential(path, "box-1", SECRET)
    path.chmod(mode)
    with pytest.raises(CliError) as exc:
        machine_cmds.read_credential(path)
    assert _one_line(exc) == (
        f"credential file {path} is readable by others (mode {mode:04o}); chmod 600 {path}"
    )


def test_owner_read_only_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c"
    machine_cmds.write_credential(path, "box-1", SECRET)
    path.chmod(0o400)
    assert machine_cmds.read_credential(path) == ("box-1", SECRET)


def _raw(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "c"
    path.write_bytes(content)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{not json " + SECRET.encode(), "is not valid JSON: "),
        (b"", "is not valid JSON: "),
        (b"\xff\xfe", "is not UTF-8 text"),
        (b'["box-1"]', 'expected an object {"machine_id", "credential"}'),
        (b'{"credential": "x"}', "'machine_id' must be a non-empty string"),
        (b'{"machine_id": "box-1"}', "'credential' must be a non-empty string"),
        (b'{"machine_id": "box-1", "credential": ""}', "'credential' must be a non-empty"),
        (b'{"machine_id": 7, "credential": "x"}', "'machine_id' must be a non-empty string"),
    ],
)
def test_bad_credential_content(tmp_path: Path, content: bytes, needle: str) -> None:
    path = _raw(tmp_path, content)
    with pytest.raises(CliError) as exc:
        machine_cmds.read_credential(path)
    message = _one_line(exc)
    assert str(path) in message and needle in message
    assert SECRET not in message  # the content is never echoed


def test_missing_credential_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.credential"
    with pytest.raises(CliError) as exc:
        machine_cmds.read_credential(path)
    message = _one_line(exc)
    assert message.startswith(f"credential file {path} does not exist")
    assert "vigil machine register" in message


def test_unreadable_credential_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _raw(tmp_path, b'{"machine_id": "m", "credential": "x"}')
    path.chmod(0o000)
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        # Root reads any file whatever its mode: make the refusal explicit instead.
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(CliError) as exc:
        machine_cmds.read_credential(path)
    assert _one_line(exc) == f"cannot read credential file {path}: Permission denied"


def test_a_directory_is_not_a_credential_file(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(CliError) as exc:
        machine_cmds.read_credential(d)
    assert _one_line(exc) == f"cannot read credential file {d}: Is a directory"


def test_default_credential_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VIGIL_DATA_DIR", raising=False)
    assert machine_cmds.default_credential_path("box-1") == Path(".vigil/machines/box-1.credential")
    monkeypatch.setenv("VIGIL_DATA_DIR", str(tmp_path))
    assert machine_cmds.default_credential_path("box-1") == (
        tmp_path / "machines" / "box-1.credential"
    )
    assert machine_cmds.default_credential_path("m", Path("/x")) == Path("/x/machines/m.credential")


@pytest.mark.parametrize("machine_id", ["../etc/passwd", "a/b", "", ".hidden", "x" * 65])
def test_default_credential_path_refuses_a_bad_machine_id(machine_id: str) -> None:
    # The machine id becomes a file name: nothing that could leave the directory.
    with pytest.raises(CliError) as exc:
        machine_cmds.default_credential_path(machine_id)
    assert "--machine-id" in _one_line(exc)


# -- JSON and tables ---------------------------------------------------------------


def _agent(**kw: Any) -> pb.Agent:
    fields: dict[str, Any] = {
        "chatroom": "demo",
        "role": "builder",
        "machine_id": "box-1",
        "desired_state": "running",
        "status": "running",
        "pid": 4242,
        "restart_count": 2,
    }
    fields.update(kw)
    for key, vocab in (
        ("desired_state", DesiredState),
        ("status", AgentStatus),
        ("last_exit_classification", ExitClassification),
    ):
        if isinstance(fields.get(key), str):
            fields[key] = vocab(fields[key]).to_pb()
    return pb.Agent(**fields)


def _killed(**kw: Any) -> pb.Agent:
    return _agent(
        has_last_exit=True,
        last_exit_code=0,
        last_exit_signal=9,
        last_exit_classification="signal",
        last_exit_at=to_proto(T0),
        next_restart_at=to_proto(T0),
        **kw,
    )


def test_agent_json_without_an_exit() -> None:
    assert machine_cmds.agent_json(_agent(pid=0, machine_id="")) == {
        "chatroom": "demo",
        "role": "builder",
        "machine_id": None,
        "desired_state": "running",
        "status": "running",
        "pid": None,
        "restart_count": 2,
        "last_exit": None,
        "next_restart_at": None,
        "status_reason": None,
    }


def test_an_unknown_exit_code_is_not_zero() -> None:
    lost = _agent(has_last_exit=True, last_exit_classification="daemon_lost")
    lost.ClearField("last_exit_code")
    assert machine_cmds.agent_json(lost)["last_exit"]["code"] is None
    assert machine_cmds.last_exit_text(lost) == "code unknown (daemon_lost)"
    failed = _agent(status="failed", status_reason="its start failed on machine m1: refused")
    assert machine_cmds.agent_json(failed)["status_reason"].endswith("refused")
    assert "(its start failed on machine m1: refused)" in machine_cmds.agent_line(failed)


def test_agent_json_killed_by_a_signal() -> None:
    d = machine_cmds.agent_json(_killed())
    assert d["pid"] == 4242
    assert d["last_exit"] == {
        "code": None,
        "signal": 9,
        "classification": "signal",
        "at": T0_TEXT,
    }
    assert d["next_restart_at"] == T0_TEXT
    json.dumps(d)  # serialisable as is


def test_agent_json_exit_codes() -> None:
    crashed = _agent(has_last_exit=True, last_exit_code=1, last_exit_classification="crashed")
    assert machine_cmds.agent_json(crashed)["last_exit"] == {
        "code": 1,
        "signal": None,
        "classification": "crashed",
        "at": None,
    }
    # Exit code 0 is a real exit code, not "none".
    ok = _agent(has_last_exit=True, last_exit_code=0, last_exit_classification="exited_ok")
    assert machine_cmds.agent_json(ok)["last_exit"]["code"] == 0


def test_last_exit_text() -> None:
    assert machine_cmds.last_exit_text(_killed()) == "signal 9 (signal)"
    crashed = _agent(has_last_exit=True, last_exit_code=1, last_exit_classification="crashed")
    assert machine_cmds.last_exit_text(crashed) == "code 1 (crashed)"
    assert machine_cmds.last_exit_text(_agent(has_last_exit=True, last_exit_code=3)) == "code 3"
    assert machine_cmds.last_exit_text(_agent()) == "—"


def test_agents_table() -> None:
    agents = [_killed(), _agent(pid=0, status="stopped", desired_state="stopped")]
    lines = machine_cmds.render_agents(agents).splitlines()
    assert lines[0].split() == [c.upper() for c in machine_cmds.AGENT_COLUMNS]
    assert lines[1].split() == [
        "demo",
        "builder",
        "box-1",
        "running",
        "running",
        "4242",
        "2",
        "signal",
        "9",
        "(signal)",
        T0_TEXT,
        "-",
    ]
    assert lines[2].split() == [
        "demo",
        "builder",
        "box-1",
        "stopped",
        "stopped",
        "—",
        "2",
        "—",
        "-",
        "-",
    ]
    start = lines[0].index("LAST_EXIT ")
    assert lines[1][start:].startswith("signal 9 (signal)")
    assert lines[2][start:].startswith("—")
    assert machine_cmds.render_agents([]) == "no agents"


def test_agent_line() -> None:
    assert machine_cmds.agent_line(_agent(status="starting", pid=0, restart_count=0)) == (
        "demo/builder starting (desired running) on box-1 pid — restarts 0"
    )
    assert machine_cmds.agent_line(_killed(status="backoff")) == (
        "demo/builder backoff (desired running) on box-1 pid 4242 restarts 2"
        f" last exit signal 9 (signal) at {T0_TEXT}"
    )


def _command(**kw: Any) -> pb.Command:
    fields: dict[str, Any] = {
        "id": 17,
        "machine_id": "box-1",
        "type": pb.COMMAND_TYPE_START,
        "chatroom": "demo",
        "role": "builder",
        "harness": "claude",
        "status": "pending",
        "created_at": to_proto(T0),
        "deadline_at": to_proto(T0),
    }
    fields.update(kw)
    if isinstance(fields.get("status"), str):
        fields["status"] = CommandStatus(fields["status"]).to_pb()
    return pb.Command(**fields)


def test_command_json() -> None:
    assert machine_cmds.command_json(_command()) == {
        "id": 17,
        "machine_id": "box-1",
        "type": "start",
        "chatroom": "demo",
        "role": "builder",
        "harness": "claude",
        "command": None,
        "status": "pending",
        "created_at": T0_TEXT,
        "deadline_at": T0_TEXT,
        "reason": None,
        "outcome": None,
    }
    stop = machine_cmds.command_json(
        _command(
            type=pb.COMMAND_TYPE_STOP, harness="", status="expired", reason="no daemon answered"
        )
    )
    assert (stop["type"], stop["command"], stop["reason"]) == (
        "stop",
        None,
        "no daemon answered",
    )
    bare = machine_cmds.command_json(pb.Command(id=1))
    assert (bare["type"], bare["created_at"], bare["deadline_at"]) == ("unknown", None, None)


def test_commands_table() -> None:
    rows = [_command(), _command(id=18, type=pb.COMMAND_TYPE_STOP, reason="stopped by cli:ann")]
    lines = machine_cmds.render_commands(rows).splitlines()
    assert lines[0].split() == [c.upper() for c in machine_cmds.COMMAND_COLUMNS]
    assert lines[1].split() == [
        "17",
        "box-1",
        "start",
        "demo/builder",
        "pending",
        T0_TEXT,
        T0_TEXT,
        "-",
        "-",
    ]
    assert lines[2].split()[:4] == ["18", "box-1", "stop", "demo/builder"]
    assert lines[2].split()[-4:] == ["stopped", "by", "cli:ann", "-"]
    assert machine_cmds.render_commands([]) == "no commands"


def _machine(**kw: Any) -> pb.Machine:
    fields: dict[str, Any] = {
        "machine_id": "box-1",
        "hostname": "box-1.lan",
        "harnesses": ["claude", "codex"],
        "online": True,
        "registered_at": to_proto(T0),
    }
    fields.update(kw)
    return pb.Machine(**fields)


def test_machine_json() -> None:
    assert machine_cmds.machine_json(_machine()) == {
        "machine_id": "box-1",
        "hostname": "box-1.lan",
        "harnesses": ["claude", "codex"],
        "online": True,
        "registered_at": T0_TEXT,
    }
    bare = machine_cmds.machine_json(pb.Machine(machine_id="m"))
    assert bare == {
        "machine_id": "m",
        "hostname": None,
        "harnesses": [],
        "online": False,
        "registered_at": None,
    }


def test_machines_table() -> None:
    lines = machine_cmds.render_machines(
        [_machine(), _machine(machine_id="box-2", online=False, harnesses=[])]
    ).splitlines()
    assert lines[0].split() == [c.upper() for c in machine_cmds.MACHINE_COLUMNS]
    assert lines[1].split() == ["box-1", "box-1.lan", "yes", "claude,", "codex", T0_TEXT]
    assert lines[2].split() == ["box-2", "box-1.lan", "no", "-", T0_TEXT]
    assert machine_cmds.render_machines([]) == "no machines"


# -- the parser --------------------------------------------------------------------


def test_parser_knows_the_machine_commands() -> None:
    p = build_parser()
    a = p.parse_args(
        [
            "machine",
            "register",
            "--machine-id",
            "box-1",
            "--hostname",
            "h",
            "--harness",
            "claude",
            "codex",
            "--harness",
            "aider",
            "--credential-file",
            "/tmp/c",
            "--json",
        ]
    )
    assert (a.command, a.machine_command, a.machine_id, a.hostname) == (
        "machine",
        "register",
        "box-1",
        "h",
    )
    assert (a.harness, a.credential_file, a.json) == (["claude", "codex", "aider"], "/tmp/c", True)
    a = p.parse_args(["machine", "register", "--machine-id", "m"])
    assert (a.hostname, a.harness, a.credential_file, a.json) == (None, None, None, False)
    a = p.parse_args(["machines", "--json", "--addr", "127.0.0.1:1"])
    assert (a.command, a.json, a.addr) == ("machines", True, "127.0.0.1:1")
    a = p.parse_args(["agents", "--chatroom", "demo"])
    assert (a.command, a.chatroom, a.json) == ("agents", "demo", False)
    assert p.parse_args(["agents"]).chatroom is None
    for action in ("start", "stop"):
        a = p.parse_args(["agent", action, "--chatroom", "demo", "--role", "b", "--json"])
        assert (a.command, a.agent_command, a.chatroom, a.role, a.json) == (
            "agent",
            action,
            "demo",
            "b",
            True,
        )
    a = p.parse_args(["commands", "--machine", "box-1", "--limit", "5", "--json"])
    assert (a.command, a.machine, a.limit, a.json) == ("commands", "box-1", 5, True)
    a = p.parse_args(["commands"])
    assert (a.machine, a.limit, a.json) == (None, 0, False)
    assert {"machine", "machines", "agents", "agent", "commands"} == MACHINE_COMMANDS


@pytest.mark.parametrize(
    "argv",
    [
        ["machine"],
        ["machine", "register"],
        ["machine", "frobnicate"],
        ["agent", "start", "--chatroom", "c"],
        ["agent", "restart", "--chatroom", "c", "--role", "r"],
        ["agent"],
        ["commands", "--limit", "many"],
    ],
)
def test_parser_usage_errors_are_exit_2(argv: list[str]) -> None:
    with pytest.raises(CliError) as exc:
        build_parser().parse_args(argv)
    _one_line(exc)


# -- the commands against a fake service -------------------------------------------


class FakeMachines(pb_grpc.MachinesServicer):
    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def RegisterMachine(
        self, request: pb.RegisterMachineRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterMachineResponse:
        self.requests.append(request)
        return pb.RegisterMachineResponse(machine_id=request.machine_id, credential=SECRET)

    async def ListMachines(
        self, request: pb.ListMachinesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListMachinesResponse:
        return pb.ListMachinesResponse(machines=[_machine()])

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAgentsResponse:
        self.requests.append(request)
        return pb.ListAgentsResponse(agents=[_killed()])

    async def ListCommands(
        self, request: pb.ListCommandsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListCommandsResponse:
        # Three pages of one command each (17, 16, 15): the CLI must follow them.
        self.requests.append(request)
        page = int(request.page_token or 0)
        more = str(page + 1) if page < 2 else ""
        return pb.ListCommandsResponse(commands=[_command(id=17 - page)], next_page_token=more)

    async def StartAgent(
        self, request: pb.AgentRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Agent:
        self.requests.append(request)
        return _agent(chatroom=request.chatroom, role=request.role, status="starting", pid=0)

    async def StopAgent(
        self, request: pb.AgentRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Agent:
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"no remote role {request.chatroom}/{request.role}"
        )
        raise AssertionError("unreachable")

    async def UnregisterMachine(
        self, request: pb.UnregisterMachineRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnregisterMachineResponse:
        self.requests.append(request)
        return pb.UnregisterMachineResponse(
            machine_id=request.machine_id, credentials_revoked=3, tasks_recovered=1
        )

    # The daemon's calls: not the CLI's business.
    def DaemonSession(self, request_iterator: Any, context: Any) -> Any:
        raise NotImplementedError

    def ReportExit(self, request: pb.ExitReport, context: Any) -> Any:
        raise NotImplementedError

    def ListExits(self, request: pb.ListExitsRequest, context: Any) -> Any:
        raise NotImplementedError


@pytest.fixture
async def fake() -> AsyncIterator[tuple[ClientConfig, FakeMachines]]:
    servicer = FakeMachines()
    server = grpc.aio.server()
    pb_grpc.add_MachinesServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield (
            ClientConfig(liveness_addr=f"127.0.0.1:{port}", tasks_addr=f"127.0.0.1:{port}"),
            servicer,
        )
    finally:
        await server.stop(None)


async def test_register_writes_the_credential_and_never_prints_it(
    fake: tuple[ClientConfig, FakeMachines],
    tmp_path: Path,
    umask_zero: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    addr, servicer = fake
    data_dir = tmp_path / "data"
    rc = await machine_cmds.register_machine(
        addr, "box-1", "h1", ["claude", "claude"], None, False, data_dir
    )
    assert rc == 0
    path = data_dir / "machines" / "box-1.credential"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert machine_cmds.read_credential(path) == ("box-1", SECRET)
    out = capsys.readouterr().out
    harnesses = data_dir / "machines" / "box-1.harnesses.toml"
    assert out == (
        f"registered machine box-1; credential written to {path} (mode 600); "
        f"harnesses it runs: {harnesses.absolute()} (written, edit it)\n"
    )
    assert _mode(harnesses) == 0o600
    assert "example" in Harnesses.load(harnesses).programs
    req = servicer.requests[-1]
    assert (req.machine_id, req.hostname, list(req.harnesses)) == ("box-1", "h1", ["claude"])

    other = tmp_path / "elsewhere" / "c.json"
    rc = await machine_cmds.register_machine(addr, "box-1", None, [], str(other), True, data_dir)
    assert rc == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert json.loads(out) == {
        "machine_id": "box-1",
        "credential_file": str(other),
        "harness_file": str(harnesses.absolute()),
    }
    assert machine_cmds.read_credential(other) == ("box-1", SECRET)
    assert servicer.requests[-1].hostname  # this host's name by default


async def test_unregister_says_what_it_revoked(
    fake: tuple[ClientConfig, FakeMachines], capsys: pytest.CaptureFixture[str]
) -> None:
    addr, servicer = fake
    assert await machine_cmds.unregister_machine(addr, "box-1", "retired", False) == 0
    assert capsys.readouterr().out == (
        "unregistered machine box-1: 3 credential(s) revoked, 1 task(s) pending again\n"
    )
    req = servicer.requests[-1]
    assert (req.machine_id, req.reason) == ("box-1", "retired")
    assert await machine_cmds.unregister_machine(addr, "box-1", "", True) == 0
    assert json.loads(capsys.readouterr().out)["credentials_revoked"] == 3
    with pytest.raises(CliError) as exc:
        await machine_cmds.unregister_machine(addr, "../x", "", False)
    _one_line(exc)


async def test_register_refuses_a_bad_machine_id_before_calling(
    fake: tuple[ClientConfig, FakeMachines], tmp_path: Path
) -> None:
    addr, servicer = fake
    with pytest.raises(CliError) as exc:
        await machine_cmds.register_machine(addr, "../x", None, [], None, False, tmp_path)
    _one_line(exc)
    assert servicer.requests == []


async def test_listing_commands_print_tables_and_json(
    fake: tuple[ClientConfig, FakeMachines], capsys: pytest.CaptureFixture[str]
) -> None:
    addr, servicer = fake
    assert await machine_cmds.list_machines(addr, True) == 0
    assert json.loads(capsys.readouterr().out) == [machine_cmds.machine_json(_machine())]
    assert await machine_cmds.list_machines(addr, False) == 0
    assert capsys.readouterr().out == machine_cmds.render_machines([_machine()]) + "\n"

    assert await machine_cmds.list_agents(addr, "demo", True) == 0
    assert json.loads(capsys.readouterr().out) == [machine_cmds.agent_json(_killed())]
    assert servicer.requests[-1].chatroom == "demo"
    assert await machine_cmds.list_agents(addr, None, False) == 0
    assert capsys.readouterr().out == machine_cmds.render_agents([_killed()]) + "\n"

    assert await machine_cmds.list_commands(addr, "box-1", 5, True) == 0
    every = [machine_cmds.command_json(_command(id=i)) for i in (17, 16, 15)]
    assert json.loads(capsys.readouterr().out) == every  # all three pages
    assert (servicer.requests[-1].machine_id, servicer.requests[-1].page_size) == ("box-1", 5)
    assert await machine_cmds.list_commands(addr, "box-1", 2, True) == 0
    assert json.loads(capsys.readouterr().out) == every[:2]  # at most --limit
    with pytest.raises(CliError) as exc:
        await machine_cmds.list_commands(addr, None, -1, False)
    assert "--limit" in _one_line(exc)


async def test_agent_start_and_a_refused_stop(
    fake: tuple[ClientConfig, FakeMachines], capsys: pytest.CaptureFixture[str]
) -> None:
    addr, _ = fake
    assert await machine_cmds.agent_action(addr, "start", "demo", "builder", False) == 0
    assert capsys.readouterr().out == (
        "demo/builder starting (desired running) on box-1 pid — restarts 2\n"
    )
    assert await machine_cmds.agent_action(addr, "start", "demo", "builder", True) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "starting"
    with pytest.raises(CliError) as exc:
        await machine_cmds.agent_action(addr, "stop", "demo", "ghost", False)
    assert _one_line(exc, 1) == "no remote role demo/ghost (NOT_FOUND)"
