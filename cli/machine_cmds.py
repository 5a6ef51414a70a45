"""The machine commands of `vigil`: registering a machine (and keeping its credential),
listing machines, the agents their daemons run and the commands sent to them, and a
person's wish that an agent run or stay stopped.

Parsing, the credential file and rendering are plain functions (unit-tested without a
server); each command opens one channel, makes its call, and turns any refusal into one
line with the server's own message. The daemon reads its credential with
`read_credential(default_credential_path(machine_id))`."""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vigil.cli.rpc import CliError, connected
from vigil.cli.task_cmds import (
    _check_name,
    _emit,
    _print_json,
    _ts,
    check_limit,
    name_of,
    render_table,
)
from vigil.client import ClientConfig
from vigil.core.vocab import (
    AgentStatus,
    CommandStatus,
    CommandType,
    DesiredState,
    ExitClassification,
)
from vigil.daemon.harnesses import write_starter
from vigil.v1 import machines_pb2 as pb

DEFAULT_DATA_DIR = ".vigil"
CREDENTIAL_MODE = 0o600
# What a table shows for "no pid" and "never exited" (other empty cells show "-").
NO_VALUE = "—"

MACHINE_COLUMNS = ["machine_id", "hostname", "online", "harnesses", "registered_at"]
AGENT_COLUMNS = [
    "chatroom",
    "role",
    "machine_id",
    "desired_state",
    "status",
    "pid",
    "restart_count",
    "last_exit",
    "last_exit_at",
    "status_reason",
]
COMMAND_COLUMNS = [
    "id",
    "machine_id",
    "type",
    "chatroom/role",
    "status",
    "created_at",
    "deadline_at",
    "reason",
    "outcome",
]


# -- the credential file ---------------------------------------------------------


def _data_dir(data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    return Path(os.environ.get("VIGIL_DATA_DIR") or DEFAULT_DATA_DIR)


def default_credential_path(machine_id: str, data_dir: Path | None = None) -> Path:
    """`$VIGIL_DATA_DIR/machines/<machine_id>.credential` (VIGIL_DATA_DIR: `.vigil`).

    The machine id is checked first: it becomes a file name."""
    _check_name(machine_id, "--machine-id")
    return _data_dir(data_dir) / "machines" / f"{machine_id}.credential"


def default_harness_path(machine_id: str, data_dir: Path | None = None) -> Path:
    """`$VIGIL_DATA_DIR/machines/<machine_id>.harnesses.toml`: what the machine runs."""
    _check_name(machine_id, "--machine-id")
    return _data_dir(data_dir) / "machines" / f"{machine_id}.harnesses.toml"


def _prepare_credential_dir(path: Path) -> None:
    """Create the file's directory (owner-only when we create it) before registering:
    the secret is shown once, so find out now, not after, that it cannot be kept."""
    parent = path.parent
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create {parent}: {exc.strerror or exc}", 2) from None
    if not parent.is_dir():
        raise CliError(f"cannot write credential file {path}: {parent} is not a directory", 2)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write credential file {path}: {parent} is not writable", 2)


def write_credential(path: Path, machine_id: str, credential: str) -> None:
    """Write {"machine_id", "credential"} to `path`, readable only by its owner (0600
    whatever the umask, and also when the file already existed with a wider mode)."""
    content = json.dumps({"machine_id": machine_id, "credential": credential}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CREDENTIAL_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        # An existing file keeps its mode through O_CREAT: narrow it before the secret.
        os.fchmod(f.fileno(), CREDENTIAL_MODE)
        f.write(content)
    os.chmod(path, CREDENTIAL_MODE)


def read_credential(path: Path | str) -> tuple[str, str]:
    """(machine_id, credential) from a credential file. Any problem is one CliError line
    naming the file; a file that its group or others may read or write is refused."""
    p = Path(path)
    where = f"credential file {p}"
    try:
        f = p.open("rb")
    except FileNotFoundError:
        raise CliError(
            f"{where} does not exist (create it with `vigil machine register`)", 2
        ) from None
    except OSError as exc:
        raise CliError(f"cannot read {where}: {exc.strerror or exc}", 2) from None
    with f:
        # The mode of the file we opened, not of whatever is at the path now.
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CliError(f"{where} is not a regular file", 2)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CliError(f"{where} is readable by others (mode {mode:04o}); chmod 600 {p}", 2)
        try:
            raw = f.read()
        except OSError as exc:
            raise CliError(f"cannot read {where}: {exc.strerror or exc}", 2) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CliError(f"{where} is not UTF-8 text", 2) from None
    except json.JSONDecodeError as exc:
        # Never echo the content: it holds a secret.
        raise CliError(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", 2
        ) from None
    if not isinstance(data, dict):
        raise CliError(f'{where}: expected an object {{"machine_id", "credential"}}', 2)
    values: list[str] = []
    for key in ("machine_id", "credential"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise CliError(f"{where}: {key!r} must be a non-empty string", 2)
        values.append(value)
    return values[0], values[1]


# -- rendering -------------------------------------------------------------------


def machine_json(m: pb.Machine) -> dict[str, Any]:
    return {
        "machine_id": m.machine_id,
        "hostname": m.hostname or None,
        "harnesses": list(m.harnesses),
        "online": m.online,
        "registered_at": _ts(m, "registered_at"),
    }


def render_machines(machines: Sequence[pb.Machine]) -> str:
    rows = []
    for m in machines:
        row = machine_json(m)
        row["harnesses"] = ", ".join(m.harnesses)
        rows.append(row)
    return render_table(rows, MACHINE_COLUMNS, "no machines")


def last_exit_json(a: pb.Agent) -> dict[str, Any] | None:
    if not a.has_last_exit:
        return None
    signal = a.last_exit_signal
    return {
        # A process killed by a signal has no exit code; one whose daemon was away when
        # it ended has none known either.
        "code": a.last_exit_code if a.HasField("last_exit_code") and not signal else None,
        "signal": signal or None,
        "classification": _classification(a),
        "at": _ts(a, "last_exit_at"),
    }


def last_exit_text(a: pb.Agent) -> str:
    """`signal 9 (signal)`, `code 1 (crashed)`, or NO_VALUE if it never exited."""
    if not a.has_last_exit:
        return NO_VALUE
    if a.last_exit_signal:
        what = f"signal {a.last_exit_signal}"
    elif a.HasField("last_exit_code"):
        what = f"code {a.last_exit_code}"
    else:
        what = "code unknown"
    cls = _classification(a)
    return f"{what} ({cls})" if cls else what


def _classification(a: pb.Agent) -> str | None:
    if not a.last_exit_classification:
        return None
    return name_of(ExitClassification, a.last_exit_classification)


def agent_json(a: pb.Agent) -> dict[str, Any]:
    return {
        "chatroom": a.chatroom,
        "role": a.role,
        "machine_id": a.machine_id or None,
        "desired_state": name_of(DesiredState, a.desired_state),
        "status": name_of(AgentStatus, a.status),
        "pid": a.pid or None,
        "restart_count": a.restart_count,
        "last_exit": last_exit_json(a),
        "next_restart_at": _ts(a, "next_restart_at"),
        "status_reason": a.status_reason or None,
    }


def _agent_row(a: pb.Agent) -> dict[str, Any]:
    row = agent_json(a)
    row["pid"] = a.pid or NO_VALUE
    row["last_exit"] = last_exit_text(a)
    row["last_exit_at"] = _ts(a, "last_exit_at")
    return row


def render_agents(agents: Sequence[pb.Agent]) -> str:
    return render_table([_agent_row(a) for a in agents], AGENT_COLUMNS, "no agents")


def agent_line(a: pb.Agent) -> str:
    """One line: `<chatroom>/<role> <status> (desired <state>) on <machine> pid <pid>
    restarts <n>`, then the last exit if there was one."""
    line = (
        f"{a.chatroom}/{a.role} {name_of(AgentStatus, a.status)} "
        f"(desired {name_of(DesiredState, a.desired_state)})"
        f" on {a.machine_id or NO_VALUE} pid {a.pid or NO_VALUE} restarts {a.restart_count}"
    )
    if a.status_reason:
        line += f" ({a.status_reason})"
    if a.has_last_exit:
        line += f" last exit {last_exit_text(a)}"
        at = _ts(a, "last_exit_at")
        if at:
            line += f" at {at}"
    return line


def command_json(c: pb.Command) -> dict[str, Any]:
    return {
        "id": c.id,
        "machine_id": c.machine_id,
        "type": name_of(CommandType, c.type),
        "chatroom": c.chatroom,
        "role": c.role,
        "harness": c.harness or None,
        "command": c.command or None,
        "status": name_of(CommandStatus, c.status),
        "created_at": _ts(c, "created_at"),
        "deadline_at": _ts(c, "deadline_at"),
        "reason": c.reason or None,
        "outcome": c.outcome_message or None,
    }


def render_commands(commands: Sequence[pb.Command]) -> str:
    rows = []
    for c in commands:
        row = command_json(c)
        row["chatroom/role"] = f"{c.chatroom}/{c.role}"
        rows.append(row)
    return render_table(rows, COMMAND_COLUMNS, "no commands")


# -- talking to the server -------------------------------------------------------


def _harnesses(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        _check_name(n, "--harness")
        if n not in out:
            out.append(n)
    return out


async def register_machine(
    config: ClientConfig,
    machine_id: str,
    hostname: str | None,
    harnesses: Sequence[str],
    credential_file: str | None,
    as_json: bool,
    data_dir: Path | None = None,
) -> int:
    _check_name(machine_id, "--machine-id")
    path = (
        Path(credential_file) if credential_file else default_credential_path(machine_id, data_dir)
    ).absolute()
    _prepare_credential_dir(path)
    async with connected(config) as client:
        reply = await client.register_machine(
            machine_id,
            hostname if hostname is not None else socket.gethostname(),
            _harnesses(harnesses),
        )
    try:
        write_credential(path, reply.machine_id or machine_id, reply.credential)
    except OSError as exc:
        raise CliError(
            f"registered machine {machine_id} but could not write its credential to {path}: "
            f"{exc.strerror or exc}; register it again (that rotates the credential)"
        ) from None
    harness_path = default_harness_path(machine_id, data_dir).absolute()
    wrote = write_starter(harness_path)
    harness_note = (
        f"; harnesses it runs: {harness_path} (written, edit it)"
        if wrote
        else f"; harnesses it runs: {harness_path}"
    )
    _emit(
        as_json,
        lambda: {
            "machine_id": machine_id,
            "credential_file": str(path),
            "harness_file": str(harness_path),
        },
        lambda: (
            f"registered machine {machine_id}; credential written to {path} (mode 600)"
            + harness_note
        ),
    )
    return 0


async def unregister_machine(
    config: ClientConfig, machine_id: str, reason: str, as_json: bool
) -> int:
    _check_name(machine_id, "--machine-id")
    async with connected(config) as client:
        reply = await client.unregister_machine(machine_id, reason)
    _emit(
        as_json,
        lambda: {
            "machine_id": reply.machine_id,
            "credentials_revoked": reply.credentials_revoked,
            "tasks_recovered": reply.tasks_recovered,
        },
        lambda: (
            f"unregistered machine {reply.machine_id}: {reply.credentials_revoked} "
            f"credential(s) revoked, {reply.tasks_recovered} task(s) pending again"
        ),
    )
    return 0


async def list_machines(config: ClientConfig, as_json: bool) -> int:
    async with connected(config) as client:
        machines = await client.list_machines()
    if as_json:
        _print_json([machine_json(m) for m in machines])
    else:
        print(render_machines(machines))
    return 0


async def list_agents(config: ClientConfig, chatroom: str | None, as_json: bool) -> int:
    if chatroom:
        _check_name(chatroom, "--chatroom")
    async with connected(config) as client:
        agents = await client.list_agents(chatroom or "")
    if as_json:
        _print_json([agent_json(a) for a in agents])
    else:
        print(render_agents(agents))
    return 0


async def agent_action(
    config: ClientConfig, action: str, chatroom: str, role: str, as_json: bool
) -> int:
    if action not in ("start", "stop"):
        raise ValueError(f"unknown agent action {action!r}")
    _check_name(chatroom, "--chatroom")
    _check_name(role, "--role")
    async with connected(config) as client:
        call = client.start_agent if action == "start" else client.stop_agent
        agent = await call(chatroom, role)
    _emit(as_json, lambda: agent_json(agent), lambda: agent_line(agent))
    return 0


async def list_commands(
    config: ClientConfig, machine: str | None, limit: int, as_json: bool
) -> int:
    if machine:
        _check_name(machine, "--machine")
    check_limit(limit)
    async with connected(config) as client:
        commands = await client.list_commands(machine or "", limit)
    if as_json:
        _print_json([command_json(c) for c in commands])
    else:
        print(render_commands(commands))
    return 0


# -- dispatch from cli.main ------------------------------------------------------


async def run(args: argparse.Namespace, config: ClientConfig, data_dir: Path | None = None) -> int:
    """Run the parsed command `args.command` (one of cli.main.MACHINE_COMMANDS)."""
    cmd = args.command
    if cmd == "machine" and args.machine_command == "unregister":
        return await unregister_machine(config, args.machine_id, args.reason or "", args.json)
    if cmd == "machine":
        return await register_machine(
            config,
            args.machine_id,
            args.hostname,
            args.harness or [],
            args.credential_file,
            args.json,
            data_dir,
        )
    if cmd == "machines":
        return await list_machines(config, args.json)
    if cmd == "agents":
        return await list_agents(config, args.chatroom, args.json)
    if cmd == "agent":
        return await agent_action(config, args.agent_command, args.chatroom, args.role, args.json)
    if cmd == "commands":
        return await list_commands(config, args.machine, args.limit, args.json)
    raise ValueError(f"not a machine command: {cmd!r}")
