"""The task commands of `vigil`: chatrooms, sending messages, tasks, their history and
notifications, as tables for people or JSON for scripts.

Parsing and rendering are plain functions (unit-tested without a server); each command
opens one channel, makes its calls, and turns any refusal into one line with the
server's own message."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vigil.cli.rpc import CliError, connected
from vigil.client import Client, ClientConfig, RPCError
from vigil.core import validation
from vigil.core.errors import VigilError
from vigil.core.timefmt import from_proto, rfc3339
from vigil.core.vocab import AgentKind, NotificationKind, TaskStatus, WireEnum
from vigil.v1 import tasks_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.message import Message

EXIT_SIGINT = 130
EXIT_SIGTERM = 143
RPC_TIMEOUT = 10.0
# ListNotifications pages: the server's own default page, asked for explicitly so we
# know when a page was full and there may be more.
NOTIFICATION_PAGE = 1000
_RECONNECT_FIRST = 0.2
_RECONNECT_CAP = 5.0


def name_of(cls: type[WireEnum], value: int) -> str:
    """A proto enum value as its vocabulary word ('unknown' for what we do not know)."""
    try:
        return cls.from_pb(value).value
    except ValueError:
        return "unknown"


TASK_COLUMNS = [
    "id",
    "chatroom",
    "role",
    "status",
    "attempt",
    "assigned_to",
    "created_at",
    "deadline_at",
]
HISTORY_COLUMNS = ["at", "transition", "trigger", "actor", "attempt", "reason"]
ROLE_COLUMNS = ["role", "kind", "machine", "harness", "command"]
CHATROOM_COLUMNS = ["name", "roles", "created_at"]


# -- parsing ---------------------------------------------------------------------


def _usage(message: str) -> CliError:
    return CliError(message, 2)


MAX_ATTEMPT = 2**31 - 1
MAX_LIMIT = 1_000_000


def check_limit(limit: int) -> None:
    if not 0 <= limit <= MAX_LIMIT:
        raise _usage(f"--limit must be between 0 (all) and {MAX_LIMIT}, got {str(limit)[:24]}")


def _check_name(value: str, what: str) -> str:
    try:
        return validation.name(value, what)
    except VigilError as exc:
        raise _usage(str(exc)) from None


def check_task_id(value: str) -> str:
    try:
        return validation.uuid_str(value, "task ID")
    except VigilError as exc:
        raise _usage(str(exc)) from None


def parse_role_spec(spec: str) -> pb.Role:
    """ROLE=custom or ROLE=remote:MACHINE:HARNESS (a harness is a name the machine's
    daemon maps to a program; a command line goes in a team file)."""
    expected = "expected ROLE=custom or ROLE=remote:MACHINE:HARNESS"
    role, eq, rest = spec.partition("=")
    if not eq or not role:
        raise _usage(f"--role {spec!r}: {expected}")
    _check_name(role, f"--role {spec!r}: role name")
    if rest == "custom":
        return pb.Role(role=role, kind=AgentKind.CUSTOM.to_pb())
    kind, colon, target = rest.partition(":")
    if kind == "remote":
        machine, _, harness = target.partition(":")
        if not colon or not machine or not harness:
            raise _usage(
                f"--role {spec!r}: a remote role needs its machine and harness "
                "(remote:MACHINE:HARNESS, e.g. remote:box-1:claude)"
            )
        _check_name(machine, f"--role {spec!r}: machine")
        _check_name(
            harness,
            f"--role {spec!r}: harness (a name the machine defines; "
            "a command line goes in a --team-file)",
        )
        return pb.Role(role=role, kind=AgentKind.REMOTE.to_pb(), machine=machine, harness=harness)
    if kind == "custom":
        raise _usage(f"--role {spec!r}: a custom role takes no machine or harness")
    raise _usage(f"--role {spec!r}: unknown kind {kind!r}; {expected}")


_TEAM_KEYS = {"role", "kind", "machine", "harness", "command"}


def parse_team(data: Any, where: str) -> list[pb.Role]:
    """A team file's content: {"roles": [{"role", "kind", "machine", "harness" or
    "command"}]}."""
    if not isinstance(data, dict) or not isinstance(data.get("roles"), list):
        raise _usage(f'{where}: expected an object {{"roles": [...]}}')
    roles: list[pb.Role] = []
    for i, entry in enumerate(data["roles"]):
        at = f"{where}: roles[{i}]"
        if not isinstance(entry, dict):
            raise _usage(f"{at}: expected an object with role, kind, machine, harness")
        unknown = sorted(set(entry) - _TEAM_KEYS)
        if unknown:
            raise _usage(
                f"{at}: unknown key {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(sorted(_TEAM_KEYS))}"
            )
        for key in _TEAM_KEYS:
            if key in entry and entry[key] is not None and not isinstance(entry[key], str):
                raise _usage(f"{at}: {key!r} must be a string")
        role = entry.get("role") or ""
        if not role:
            raise _usage(f"{at}: 'role' is required")
        _check_name(role, f"{at}: role name")
        kind = entry.get("kind") or ""
        if kind not in AgentKind.values():
            raise _usage(f"{at}: 'kind' must be 'remote' or 'custom', got {kind!r}")
        machine = entry.get("machine") or ""
        harness = entry.get("harness") or ""
        command = entry.get("command") or ""
        if kind == "remote":
            if not machine:
                raise _usage(f"{at}: 'machine' is required for a remote role")
            if bool(harness) == bool(command):
                raise _usage(f"{at}: a remote role has a 'harness' or a 'command' (one of them)")
        if kind == "custom" and (machine or harness or command):
            raise _usage(f"{at}: a custom role takes no machine, harness or command")
        roles.append(
            pb.Role(
                role=role,
                kind=AgentKind(kind).to_pb(),
                machine=machine,
                harness=harness,
                command=command,
            )
        )
    return roles


def load_team_file(path: str) -> list[pb.Role]:
    where = f"--team-file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise _usage(f"{where}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _usage(f"{where}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _usage(
            f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    return parse_team(data, where)


def chatroom_roles(specs: Sequence[str], team_file: str | None) -> list[pb.Role]:
    """The roles of `chatroom create`: the team file's, then each --role; a role named
    twice is a mistake, not an override."""
    roles = load_team_file(team_file) if team_file else []
    roles += [parse_role_spec(spec) for spec in specs]
    if not roles:
        raise _usage("a chatroom needs at least one --role ROLE=KIND or a --team-file")
    seen: set[str] = set()
    for r in roles:
        if r.role in seen:
            raise _usage(f"role {r.role!r} is given twice")
        seen.add(r.role)
    return roles


def message_text(words: Sequence[str], stdin: TextIO) -> str:
    """TEXT words joined by spaces; a single `-` reads the message from stdin."""
    if list(words) == ["-"]:
        try:
            text = stdin.read().rstrip("\n")
        except UnicodeDecodeError:
            raise _usage("the message on stdin is not UTF-8 text") from None
    else:
        text = " ".join(words)
    if not text.strip():
        raise _usage("the message is empty")
    return text


# -- rendering -------------------------------------------------------------------


def _ts(msg: Message, name: str) -> str | None:
    if not msg.HasField(name):
        return None
    return rfc3339(from_proto(getattr(msg, name)))


def task_json(t: pb.Task) -> dict[str, Any]:
    return {
        "id": t.id,
        "chatroom": t.chatroom,
        "role": t.role,
        "status": name_of(TaskStatus, t.status),
        "attempt": t.attempt,
        "assigned_to": t.assigned_to or None,
        "created_at": _ts(t, "created_at"),
        "acknowledged_at": _ts(t, "acknowledged_at"),
        "started_at": _ts(t, "started_at"),
        "completed_at": _ts(t, "completed_at"),
        "deadline_at": _ts(t, "deadline_at"),
        "text": t.text,
        "recoveries": t.recoveries,
        "needs_attention": t.needs_attention,
    }


def task_summary(t: pb.Task) -> str:
    """One line, the id first: `<id> <status> <chatroom>/<role> attempt <n>`."""
    line = f"{t.id} {name_of(TaskStatus, t.status)} {t.chatroom}/{t.role} attempt {t.attempt}"
    return line + " needs-attention" if t.needs_attention else line


def render_task_text(t: pb.Task) -> str:
    """The summary line, then the task's text as sent (what an agent must read)."""
    return f"{task_summary(t)}\n{t.text}" if t.text else task_summary(t)


def render_task_detail(t: pb.Task) -> str:
    d = task_json(t)
    fields = [
        "assigned_to",
        "created_at",
        "acknowledged_at",
        "started_at",
        "completed_at",
        "deadline_at",
        "recoveries",
        "needs_attention",
    ]
    width = max(map(len, fields)) + 1
    lines = [task_summary(t)]
    lines += [f"  {(f + ':').ljust(width)} {_cell(d[f])}" for f in fields]
    lines += ["", t.text]
    return "\n".join(lines)


def role_json(r: pb.Role) -> dict[str, Any]:
    return {
        "role": r.role,
        "kind": name_of(AgentKind, r.kind),
        "machine": r.machine or None,
        "harness": r.harness or None,
        "command": r.command or None,
    }


def chatroom_json(c: pb.Chatroom) -> dict[str, Any]:
    return {
        "name": c.name,
        "roles": [role_json(r) for r in c.roles],
        "created_at": _ts(c, "created_at"),
    }


def render_chatroom(c: pb.Chatroom) -> str:
    created = _ts(c, "created_at")
    head = f"chatroom {c.name}" + (f" (created {created})" if created else "")
    roles = [role_json(r) for r in c.roles]
    return head + "\n" + render_table(roles, ROLE_COLUMNS, "no roles")


def render_chatrooms(chatrooms: Sequence[pb.Chatroom]) -> str:
    rows = [
        {
            "name": c.name,
            "roles": ", ".join(f"{r.role}({name_of(AgentKind, r.kind)})" for r in c.roles),
            "created_at": _ts(c, "created_at"),
        }
        for c in chatrooms
    ]
    return render_table(rows, CHATROOM_COLUMNS, "no chatrooms")


def transition_json(tr: pb.Transition) -> dict[str, Any]:
    return {
        "at": _ts(tr, "at"),
        "from_status": name_of(TaskStatus, tr.from_status) if tr.from_status else None,
        "to_status": name_of(TaskStatus, tr.to_status),
        "trigger": tr.trigger,
        "actor": tr.actor,
        "attempt": tr.attempt,
        "reason": tr.reason or None,
    }


def render_history(transitions: Sequence[pb.Transition]) -> str:
    rows = []
    for tr in transitions:
        row = transition_json(tr)
        row["transition"] = f"{row['from_status'] or '(new)'}→{row['to_status']}"
        rows.append(row)
    return render_table(rows, HISTORY_COLUMNS, "no transitions")


def notification_json(n: pb.Notification) -> dict[str, Any]:
    return {
        "id": n.id,
        "kind": name_of(NotificationKind, n.kind),
        "chatroom": n.chatroom or None,
        "role": n.role or None,
        "task_id": n.task_id or None,
        "message": n.message,
        "created_at": _ts(n, "created_at"),
    }


def notification_line(n: pb.Notification) -> str:
    """One line per notification, the same whether listed or followed."""
    where = f"{n.chatroom}/{n.role}" if n.role else n.chatroom or "-"
    task = f" task {n.task_id}" if n.task_id else ""
    kind = name_of(NotificationKind, n.kind)
    return f"{_ts(n, 'created_at') or '-'} #{n.id} {kind} {where}{task}: {n.message}"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # One row per line, whatever a command or reason holds.
    return str(value).replace("\n", "\\n")


def render_table(rows: Sequence[dict[str, Any]], cols: Sequence[str], empty: str) -> str:
    if not rows:
        return empty
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _emit(as_json: bool, as_data: Callable[[], Any], as_text: Callable[[], str]) -> None:
    if as_json:
        _print_json(as_data())
    else:
        print(as_text())


# -- talking to the server -------------------------------------------------------


async def create_chatroom(
    config: ClientConfig, name: str, roles: list[pb.Role], as_json: bool
) -> int:
    _check_name(name, "chatroom name")
    async with connected(config) as client:
        room = await client.create_chatroom(name, roles)
    _emit(as_json, lambda: chatroom_json(room), lambda: render_chatroom(room))
    return 0


async def update_chatroom(
    config: ClientConfig, name: str, add: list[str], remove: list[str], as_json: bool
) -> int:
    _check_name(name, "chatroom name")
    roles = [parse_role_spec(s) for s in add]
    for role in remove:
        _check_name(role, "--remove-role")
    if not roles and not remove:
        raise _usage("say what to change: --add-role ROLE=KIND and/or --remove-role ROLE")
    async with connected(config) as client:
        room = await client.update_chatroom(name, roles, remove)
    _emit(as_json, lambda: chatroom_json(room), lambda: render_chatroom(room))
    return 0


async def delete_chatroom(
    config: ClientConfig, name: str, cancel_open: bool, reason: str, as_json: bool
) -> int:
    _check_name(name, "chatroom name")
    async with connected(config) as client:
        done = await client.delete_chatroom(name, cancel_open=cancel_open, reason=reason)
    _emit(
        as_json,
        lambda: {
            "name": done.name,
            "tasks_cancelled": done.tasks_cancelled,
            "agents_stopped": done.agents_stopped,
        },
        lambda: (
            f"deleted chatroom {done.name}: {done.tasks_cancelled} unfinished task(s) closed, "
            f"{done.agents_stopped} remote agent(s) stopped; its history is kept"
        ),
    )
    return 0


async def show_chatroom(config: ClientConfig, name: str, as_json: bool) -> int:
    _check_name(name, "chatroom name")
    async with connected(config) as client:
        room = await client.get_chatroom(name)
    _emit(as_json, lambda: chatroom_json(room), lambda: render_chatroom(room))
    return 0


async def list_chatrooms(config: ClientConfig, as_json: bool) -> int:
    async with connected(config) as client:
        rooms = await client.list_chatrooms()
    if as_json:
        _print_json([chatroom_json(c) for c in rooms])
    else:
        print(render_chatrooms(rooms))
    return 0


async def send(config: ClientConfig, chatroom: str, role: str, text: str, as_json: bool) -> int:
    _check_name(chatroom, "--chatroom")
    _check_name(role, "--role")
    async with connected(config) as client:
        task = await client.send(chatroom, role, text)
    _emit(as_json, lambda: task_json(task), lambda: task_summary(task))
    return 0


# The task actions that change a task, and whether each must present the attempt.
_ACTIONS = {"start": True, "complete": True, "cancel": False, "release": False}


async def task_action(
    config: ClientConfig,
    action: str,
    task_id: str,
    attempt: int | None,
    reason: str | None,
    as_json: bool,
) -> int:
    if action not in _ACTIONS:
        raise ValueError(f"unknown task action {action!r}")
    task_id = check_task_id(task_id)
    if attempt is not None and not 0 <= attempt <= MAX_ATTEMPT:
        raise _usage(f"--attempt must be between 0 and {MAX_ATTEMPT}, got {str(attempt)[:24]}")
    async with connected(config) as client:
        if action == "start":
            task = await client.start_task(task_id, attempt or 0)
        elif action == "complete":
            task = await client.complete_task(task_id, attempt or 0)
        elif action == "cancel":
            task = await client.cancel_task(task_id, reason or "")
        else:
            task = await client.release_task(task_id, reason or "")
    _emit(as_json, lambda: task_json(task), lambda: task_summary(task))
    return 0


async def show_task(config: ClientConfig, task_id: str, as_json: bool) -> int:
    task_id = check_task_id(task_id)
    async with connected(config) as client:
        task = await client.get_task(task_id)
    _emit(as_json, lambda: task_json(task), lambda: render_task_detail(task))
    return 0


async def task_history(config: ClientConfig, task_id: str, as_json: bool) -> int:
    task_id = check_task_id(task_id)
    async with connected(config) as client:
        transitions = await client.task_history(task_id)
    if as_json:
        _print_json([transition_json(tr) for tr in transitions])
    else:
        print(render_history(transitions))
    return 0


async def verify_audit(config: ClientConfig, task_id: str | None, as_json: bool) -> int:
    """Exit 0 when every chain is whole; else print the first broken link, exit 1."""
    only = check_task_id(task_id) if task_id else ""
    async with connected(config) as client:
        reply = await client.verify_audit(only)
    if as_json:
        _print_json(
            {
                "ok": reply.ok,
                "tasks_checked": reply.tasks_checked,
                "transitions_checked": reply.transitions_checked,
                "broken": None
                if reply.ok
                else {
                    "task_id": reply.broken_task_id,
                    "transition_id": reply.broken_transition_id or None,
                    "problem": reply.problem,
                },
            }
        )
        return 0 if reply.ok else 1
    if reply.ok:
        print(
            f"audit log whole: {reply.tasks_checked} task(s), "
            f"{reply.transitions_checked} transition(s) verified"
        )
        return 0
    where = f"task {reply.broken_task_id}"
    if reply.broken_transition_id:
        where = f"row {reply.broken_transition_id} of {where}"
    raise CliError(f"audit log broken at {where}: {reply.problem}")


async def list_tasks(
    config: ClientConfig,
    chatroom: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> int:
    if chatroom:
        _check_name(chatroom, "--chatroom")
    check_limit(limit)
    async with connected(config) as client:
        tasks = await client.list_tasks(
            chatroom or "", TaskStatus(status) if status else None, limit
        )
    rows = [task_json(t) for t in tasks]
    _emit(as_json, lambda: rows, lambda: render_table(rows, TASK_COLUMNS, "no tasks"))
    return 0


async def _all_notifications(client: Client) -> list[pb.Notification]:
    found: list[pb.Notification] = []
    after = 0
    while True:
        page = await client.list_notifications(after, NOTIFICATION_PAGE)
        found += page
        if len(page) < NOTIFICATION_PAGE:
            return found
        after = page[-1].id


def _say(line: str) -> None:
    # Status goes to stderr: stdout is the notifications, line by line.
    print(f"vigil: {line}", file=sys.stderr, flush=True)


async def _watch(client: Client, after_id: int, emit: Callable[[pb.Notification], None]) -> None:
    """Follow notifications after `after_id`, for ever. A lost stream (server restart,
    graceful drain) is resumed from the last one seen, so nothing is missed or repeated;
    an outage is told once on stderr, and so is the return."""
    last = after_id
    lost = False
    delay = _RECONNECT_FIRST
    while True:
        try:
            # wait_for_ready: while the server is away the call waits for it, not fails.
            async for n in client.watch_notifications(last, wait_for_ready=True):
                if lost:
                    _say(f"reconnected; resuming after notification {last}")
                    lost = False
                delay = _RECONNECT_FIRST
                if n.id <= last:
                    continue  # a replica replaying what we already have
                emit(n)
                last = n.id
            why = "the server ended the stream"
        except RPCError as exc:
            if not exc.retryable:
                raise
            why = f"connection lost ({exc.message})"
        if not lost:
            _say(f"{why}; reconnecting")
            lost = True
        # A server that keeps ending the stream at once must not make us spin.
        await asyncio.sleep(delay)
        delay = min(delay * 2, _RECONNECT_CAP)


def _notification_printer(as_json: bool) -> Callable[[pb.Notification], None]:
    def emit(n: pb.Notification) -> None:
        line = json.dumps(notification_json(n), ensure_ascii=False) if as_json else None
        print(line if line is not None else notification_line(n), flush=True)

    return emit


async def notifications(config: ClientConfig, follow: bool, as_json: bool) -> int:
    async with connected(config) as client:
        listed = await _all_notifications(client)
        if not follow:
            if as_json:
                _print_json([notification_json(n) for n in listed])
            else:
                print("\n".join(map(notification_line, listed)) or "no notifications")
            return 0
        emit = _notification_printer(as_json)
        for n in listed:
            emit(n)
        return await _until_signal(_watch(client, listed[-1].id if listed else 0, emit))


async def _until_signal(work: Coroutine[Any, Any, None]) -> int:
    """Run `work` until it ends or SIGINT/SIGTERM arrives; a signal is a quiet exit."""
    loop = asyncio.get_running_loop()
    task: asyncio.Task[None] = asyncio.ensure_future(work)
    stopped: list[int] = []

    def stop(code: int) -> None:
        stopped.append(code)
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, stop, EXIT_SIGINT)
    loop.add_signal_handler(signal.SIGTERM, stop, EXIT_SIGTERM)
    try:
        await task
    except asyncio.CancelledError:
        if not stopped:
            raise
        return stopped[0]
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
    return 0


# -- dispatch from cli.main ------------------------------------------------------


async def run(args: argparse.Namespace, config: ClientConfig) -> int:
    """Run the parsed command `args.command` (one of cli.main.TASK_COMMANDS)."""
    cmd = args.command
    if cmd == "chatroom":
        if args.chatroom_command == "create":
            roles = chatroom_roles(args.role or [], args.team_file)
            return await create_chatroom(config, args.name, roles, args.json)
        if args.chatroom_command == "update":
            return await update_chatroom(
                config, args.name, args.add_role or [], args.remove_role or [], args.json
            )
        if args.chatroom_command == "delete":
            return await delete_chatroom(
                config, args.name, args.cancel_open, args.reason or "", args.json
            )
        return await show_chatroom(config, args.name, args.json)
    if cmd == "chatrooms":
        return await list_chatrooms(config, args.json)
    if cmd == "send":
        text = message_text(args.text, sys.stdin)
        return await send(config, args.chatroom, args.role, text, args.json)
    if cmd == "task":
        action = args.task_command
        if action == "show":
            return await show_task(config, args.id, args.json)
        if action == "history":
            return await task_history(config, args.id, args.json)
        return await task_action(
            config,
            action,
            args.id,
            getattr(args, "attempt", None),
            getattr(args, "reason", None),
            args.json,
        )
    if cmd == "tasks":
        return await list_tasks(config, args.chatroom, args.status, args.limit, args.json)
    if cmd == "notifications":
        return await notifications(config, args.follow, args.json)
    raise ValueError(f"not a task command: {cmd!r}")
