"""`vigil wait-for-task`: join as a participant, wait for one task, print it, and leave
with reason `task_received`; leave with the right reason on every other exit path.

Inside an agent a machine daemon started, it needs no flags: chatroom, role and kind
come from VIGIL_CHATROOM, VIGIL_ROLE and VIGIL_KIND, credentials from VIGIL_TOKEN."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Mapping

from vigil.cli.rpc import CliError, connected
from vigil.client import AgentSession, ClientConfig, Superseded
from vigil.core import validation
from vigil.core.errors import VigilError
from vigil.core.vocab import AgentKind, OfflineReason
from vigil.v1 import tasks_pb2 as tpb

EXIT_SUPERSEDED = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
_SIGNAL_EXIT: dict[int, int] = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}


def _say(line: str) -> None:
    # Status lines go to stderr; stdout is kept for what the agent must read (the task).
    # A broken stderr is an error path like any other: it is raised, and we leave.
    sys.stderr.write(f"vigil: {line}\n")
    sys.stderr.flush()


def print_task(task: tpb.Task, as_json: bool) -> None:
    """The task, on stdout, with the commands that start and complete it."""
    from vigil.cli.task_cmds import task_json

    start = f"vigil task start {task.id} --attempt {task.attempt}"
    complete = f"vigil task complete {task.id} --attempt {task.attempt}"
    if as_json:
        out = {**task_json(task), "commands": {"start": start, "complete": complete}}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(
            f"task {task.id} (attempt {task.attempt}) for {task.chatroom}/{task.role}\n"
            f"{task.text}\n\n"
            f"start it:     {start}\n"
            f"complete it:  {complete}\n"
        )
    sys.stdout.flush()


def resolve_identity(
    chatroom: str | None, role: str | None, kind: str | None, env: Mapping[str, str]
) -> tuple[str, str, AgentKind]:
    """Flags first, then what a daemon puts in an agent's environment."""
    room = chatroom or env.get("VIGIL_CHATROOM") or ""
    name = role or env.get("VIGIL_ROLE") or ""
    if not room or not name:
        missing = "--chatroom" if not room else "--role"
        var = "VIGIL_CHATROOM" if not room else "VIGIL_ROLE"
        raise CliError(f"{missing} is required (or set {var})", 2)
    try:
        validation.name(room, "--chatroom")
        validation.name(name, "--role")
    except VigilError as exc:
        raise CliError(str(exc), 2) from None
    raw_kind = kind or env.get("VIGIL_KIND") or AgentKind.CUSTOM
    try:
        return room, name, AgentKind(raw_kind)
    except ValueError:
        raise CliError(f"VIGIL_KIND must be remote or custom, got {raw_kind!r}", 2) from None


async def _check_role(agent: AgentSession) -> None:
    """Refuse an unknown chatroom or role before joining (a user mistake, one line)."""
    room = await agent.client.get_chatroom(agent.chatroom)
    roles = [r.role for r in room.roles]
    if agent.role not in roles:
        raise CliError(
            f"chatroom {agent.chatroom!r} has no role {agent.role!r} "
            f"(its roles: {', '.join(roles)})"
        )


async def wait_for_task(
    config: ClientConfig,
    chatroom: str,
    role: str,
    kind: AgentKind,
    timeout: float | None,
    as_json: bool = False,
) -> int:
    async with connected(config) as client:
        agent = AgentSession(client, chatroom, role, kind, say=_say)
        await _check_role(agent)
        timer: asyncio.TimerHandle | None = None
        timed_out = False
        task = None
        try:
            async with agent:
                if timeout is not None:
                    me = asyncio.current_task()
                    assert me is not None

                    def give_up() -> None:
                        nonlocal timed_out
                        timed_out = True
                        me.cancel()

                    timer = asyncio.get_running_loop().call_later(timeout, give_up)
                try:
                    task = await agent.next_task()
                except asyncio.CancelledError:
                    if timed_out:
                        await agent.close(OfflineReason.LEFT)
                        _say(f"no task within {timeout:g}s; left")
                        return 0
                    raise
                if timer is not None:
                    timer.cancel()
                await agent.close(OfflineReason.TASK_RECEIVED)
            if agent.signalled is not None:
                name = signal.Signals(agent.signalled).name
                _say(f"{'interrupted' if name == 'SIGINT' else 'terminated'} ({name}); left")
                return _SIGNAL_EXIT.get(agent.signalled, 1)
            assert task is not None
            print_task(task.message, as_json)
            return 0
        except Superseded:
            _say(f"error: superseded: another wait-for-task took {chatroom}/{role}; exiting")
            return EXIT_SUPERSEDED
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(Exception):
                await agent.close(OfflineReason.ERROR)
