"""Many long-lived agents in one process, for failover tests: each agent is a session of
the client package (`client.agent(chatroom, role)`) on a connection of its own (its own
channels and subchannels, as separate agent processes would have), taking task after
task: `next_task`, `start`, a moment of work, `complete`.

    python -m vigil.testing.fleet CHATROOM ROLE [ROLE ...]

Where Vigil is and the credential come from the environment as for any client
(`VIGIL_ADDR` or `VIGIL_LIVENESS_ADDR`/`VIGIL_TASKS_ADDR`, several endpoints allowed;
`VIGIL_TOKEN`); `VIGIL_FLEET_WORK_MS` is each task's work (default 100). Every event is
one JSON line on stdout with its wall-clock time `t`:

  joined    {role, epoch, connection_id}           the session joined
  said      {role, line}                           the session's own status lines
  task      {role, id, attempt}                    next_task returned this task
  completed {role, id, attempt}
  error     {role, step, code, message}            a call failed in the agent's code
  ended     {role, how}                            the agent's block ended

SIGTERM (or SIGINT) ends every agent's block: each leaves (`signal`), then it exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import replace
from typing import Any

from vigil.client import Client, ClientConfig, RPCError

OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def emit(ev: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"ev": ev, "t": time.time(), **fields}) + "\n")
    sys.stdout.flush()


async def agent(config: ClientConfig, chatroom: str, role: str, work_s: float) -> None:
    async with (
        Client(config) as client,
        client.agent(
            chatroom,
            role,
            handle_signals=False,
            say=lambda line: emit("said", role=role, line=line),
        ) as session,
    ):
        s = session.session
        emit("joined", role=role, epoch=s.epoch, connection_id=s.connection_id)
        while True:
            try:
                task = await session.next_task()
            except RPCError as exc:
                emit("error", role=role, step="next_task", code=exc.code.name, message=exc.message)
                raise
            emit("task", role=role, id=task.id, attempt=task.attempt)
            for step in ("start", "complete"):
                if step == "complete":
                    await asyncio.sleep(work_s)
                try:
                    await getattr(task, step)()
                except RPCError as exc:
                    # Recorded, not fatal: the test counts these (a failover must not
                    # surface to the agent's code).
                    emit("error", role=role, step=step, code=exc.code.name, message=exc.message)
            emit("completed", role=role, id=task.id, attempt=task.attempt)


async def main(chatroom: str, roles: list[str]) -> None:
    config = replace(ClientConfig.from_env(), channel_options=OWN_CONNECTION)
    work_s = int(os.environ.get("VIGIL_FLEET_WORK_MS") or 100) / 1000
    runs = {r: asyncio.create_task(agent(config, chatroom, r, work_s)) for r in roles}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiting = asyncio.create_task(stop.wait())
    await asyncio.wait({waiting, *runs.values()}, return_when=asyncio.FIRST_COMPLETED)
    for task in runs.values():
        task.cancel()  # each agent's block ends and its session leaves (`signal`)
    for role, task in runs.items():
        try:
            await task
            how = "returned"
        except asyncio.CancelledError:
            how = "stopped"
        except Exception as exc:
            how = f"failed: {exc!r}"
        emit("ended", role=role, how=how)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
