"""`vigil wait-for-task`: join as a participant, heartbeat, leave on every exit path."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys

import grpc

from vigil.cli.rpc import CliError, channel, rpc_error, wait_ready
from vigil.cli.session_client import SessionClient, Stop
from vigil.core import validation
from vigil.core.errors import VigilError
from vigil.core.timings import Timings
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


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


async def _receive_task(
    ch: grpc.aio.Channel, client: SessionClient, chatroom: str, role: str, as_json: bool
) -> None:
    """Wait for the pushed task with the session's current epoch; print it and stop the
    session with reason task_received. Re-asks when the session rejoins (new epoch)."""
    stub = tpb_grpc.TasksStub(ch)
    attempt = 0
    while True:
        await client.joined.wait()
        epoch = client.epoch
        assert epoch is not None
        call = stub.AwaitTask(
            tpb.AwaitTaskRequest(
                chatroom=chatroom, role=role, connection_id=client.connection_id, epoch=epoch
            )
        )
        try:
            async for reply in call:
                print_task(reply.task, as_json)
                client.request_stop(Stop("task_received", 0))
                return
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise CliError(f"{exc.details()} ({exc.code().name})") from None
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # Only the liveness service answers here: hold the session, ask again later.
                if attempt == 0:
                    _say("no task service at this address; holding the session only")
                attempt = 1
                await asyncio.sleep(5)
                continue
            attempt += 1
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1))
        if client.epoch == epoch:
            await asyncio.sleep(0.05)


async def _check_role(ch: grpc.aio.Channel, addr: str, chatroom: str, role: str) -> None:
    """Refuse an unknown chatroom or role before joining (a user mistake, one line)."""
    try:
        room = await tpb_grpc.TasksStub(ch).GetChatroom(
            tpb.GetChatroomRequest(name=chatroom), timeout=10
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return  # a liveness-only server: nothing to check against
        raise rpc_error(exc, addr) from None
    roles = [r.role for r in room.roles]
    if role not in roles:
        raise CliError(
            f"chatroom {chatroom!r} has no role {role!r} (its roles: {', '.join(roles)})"
        )


async def wait_for_task(
    addr: str,
    chatroom: str,
    role: str,
    kind: str,
    timeout: float | None,
    timings: Timings,
    as_json: bool = False,
) -> int:
    try:
        validation.name(chatroom, "--chatroom")
        validation.name(role, "--role")
    except VigilError as exc:
        raise CliError(str(exc), 2) from None
    ch = channel(addr, timings)
    try:
        await wait_ready(ch, addr)
        await _check_role(ch, addr, chatroom, role)
        client = SessionClient(ch, addr, chatroom, role, kind, _say)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(
            signal.SIGINT,
            lambda: client.request_stop(Stop("signal", EXIT_SIGINT, "interrupted (SIGINT); left")),
        )
        loop.add_signal_handler(
            signal.SIGTERM,
            lambda: client.request_stop(Stop("signal", EXIT_SIGTERM, "terminated (SIGTERM); left")),
        )
        timer = None
        if timeout is not None:
            timer = loop.call_later(
                timeout,
                lambda: client.request_stop(Stop("left", 0, f"no task within {timeout:g}s; left")),
            )
        run = asyncio.create_task(client.run())
        receiver = asyncio.create_task(_receive_task(ch, client, chatroom, role, as_json))
        try:
            done, _ = await asyncio.wait({run, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done and receiver.exception() is not None:
                # A refused AwaitTask (unknown chatroom or role): leave, then report it.
                client.request_stop(Stop("error", 1))
                await run
                raise receiver.exception()  # type: ignore[misc]
            return await run
        except (CliError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # Any other failure still leaves, with reason `error`.
            left = client.left or await client.leave("error")
            note = " (left)" if left else " (could not record the leave)"
            raise CliError(f"wait-for-task failed: {type(exc).__name__}: {exc}{note}") from exc
        finally:
            receiver.cancel()
            if timer is not None:
                timer.cancel()
    finally:
        await ch.close()
