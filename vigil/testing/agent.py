"""A remote agent for tests and benchmarks, run by a machine daemon (its environment
says where Vigil is and who it is). Its mode (argv[1]):

  work   join, claim a task, start it, then keep working (holding its session) until killed
  idle   join and hold the session, never claim
  crash  exit 1 at once
  sleep  no Vigil at all: just sleep (a process to kill and watch)

    python -m vigil.testing.agent MODE
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from vigil.client import connect


async def main(mode: str) -> None:
    async with connect() as client, client.agent() as agent:
        if mode == "work":
            task = await agent.next_task()
            await task.start()
            print(f"working on {task.id} attempt {task.attempt} (pid {os.getpid()})", flush=True)
        await asyncio.Event().wait()  # hold the session until killed


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "crash":
        sys.exit(1)
    if mode == "sleep":
        time.sleep(3600)
    asyncio.run(main(mode))
