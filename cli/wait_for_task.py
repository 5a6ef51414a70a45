"""`vigil wait-for-task`: join as a participant, heartbeat, leave on every exit path."""

from __future__ import annotations

import asyncio
import signal
import sys

from cli.rpc import CliError, channel, wait_ready
from cli.session_client import SessionClient, Stop
from vigil_core import validation
from vigil_core.errors import VigilError
from vigil_core.timings import Timings

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def _say(line: str) -> None:
    # Status lines go to stderr; stdout is kept for what the agent must read (the task).
    # A broken stderr is an error path like any other: it is raised, and we leave.
    sys.stderr.write(f"vigil: {line}\n")
    sys.stderr.flush()


async def wait_for_task(
    addr: str, chatroom: str, role: str, kind: str, timeout: float | None, timings: Timings
) -> int:
    try:
        validation.name(chatroom, "--chatroom")
        validation.name(role, "--role")
    except VigilError as exc:
        raise CliError(str(exc), 2) from None
    ch = channel(addr, timings)
    try:
        await wait_ready(ch, addr)
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
        try:
            return await run
        except (CliError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # Any other failure still leaves, with reason `error`.
            left = client.left or await client.leave("error")
            note = " (left)" if left else " (could not record the leave)"
            raise CliError(f"wait-for-task failed: {type(exc).__name__}: {exc}{note}") from exc
        finally:
            if timer is not None:
                timer.cancel()
    finally:
        await ch.close()
