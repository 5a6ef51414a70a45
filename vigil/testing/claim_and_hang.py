"""A test agent that joins, claims a task, prints its id and attempt, and then hangs
holding its session without starting it or confirming receipt: the process a test kills
to make a claimer die mid-delivery.

    python -m vigil.testing.claim_and_hang ADDR CHATROOM ROLE
"""

from __future__ import annotations

import asyncio
import sys

from vigil.client import connect


async def main(addr: str, chatroom: str, role: str) -> None:
    async with connect(addr) as client, client.agent(chatroom, role, "remote") as agent:
        task = await agent.next_task()
        print(task.id, task.attempt, flush=True)
        await asyncio.Event().wait()  # hang here, heartbeating, until killed


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
