"""The bundled example agent: what a remote agent looks like. A machine daemon runs it
for a role (`python -m vigil.example_agent`); it stays live on one session, takes task
after task, works on each for a moment (VIGIL_EXAMPLE_WORK_SECONDS, default 1.5) and
completes it. With --crash it exits with code 1 at once (to show a crash loop).

Everything it needs comes from its environment, set by the daemon: VIGIL_CHATROOM,
VIGIL_ROLE, VIGIL_KIND, where Vigil is, and its own credential."""

from __future__ import annotations

import asyncio
import os
import sys

from vigil.client import connect


async def main() -> None:
    work = float(os.environ.get("VIGIL_EXAMPLE_WORK_SECONDS", "1.5"))
    async with connect() as client, client.agent() as agent:
        async for task in agent.tasks():
            print(f"agent {os.getpid()}: working on {task.id} (attempt {task.attempt})", flush=True)
            await task.start()
            await asyncio.sleep(work)  # the work itself
            await task.complete()
            print(f"agent {os.getpid()}: completed {task.id}", flush=True)


if __name__ == "__main__":
    if "--crash" in sys.argv:
        print("example agent: crashing on purpose", file=sys.stderr)
        sys.exit(1)
    asyncio.run(main())
