"""A remote agent for tests and benchmarks, run by a machine daemon (its environment
says where Vigil is and who it is). Its mode (argv[1]):

  work   join and take tasks as a long-lived session does (`agent.tasks()`: each claimed
         and started in one step, the next claimed with a completion); complete each
         whose text starts with "[complete]", and keep working on the first other one
         (holding its session) until killed
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

COMPLETE = "[complete]"  # work mode completes a task whose text starts with this


async def main(mode: str) -> None:
    async with connect() as client, client.agent() as agent:
        if mode == "work":
            async for task in agent.tasks():
                await task.start()
                print(
                    f"working on {task.id} attempt {task.attempt} (pid {os.getpid()})",
                    flush=True,
                )
                if not task.text.startswith(COMPLETE):
                    break
                await task.complete()
        await asyncio.Event().wait()  # hold the session until killed


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "crash":
        sys.exit(1)
    if mode == "sleep":
        time.sleep(3600)
    asyncio.run(main(mode))
