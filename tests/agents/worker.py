"""A remote agent for daemon tests, run by the daemon with VIGIL_CHATROOM, VIGIL_ROLE
and VIGIL_ADDR in its environment. Its mode (argv[1]):
  work   join, claim a task, start it, then keep working (heartbeating) until killed
  idle   join and heartbeat, never claim
  crash  exit 1 at once
  sleep  no Vigil at all: just sleep (a process to kill and watch)"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

import grpc

from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc


async def main(mode: str) -> None:
    chatroom, role, addr = (
        os.environ["VIGIL_CHATROOM"],
        os.environ["VIGIL_ROLE"],
        os.environ["VIGIL_ADDR"],
    )
    async with grpc.aio.insecure_channel(addr) as ch:
        session = lpb_grpc.LivenessStub(ch).Session()
        conn = str(uuid.uuid4())
        await session.write(
            lpb.SessionRequest(
                join=lpb.JoinRequest(
                    chatroom=chatroom, role=role, kind=lpb.AGENT_KIND_REMOTE, connection_id=conn
                )
            )
        )
        joined = (await session.read()).joined
        interval = joined.heartbeat_interval_ms / 1000

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                await session.write(lpb.SessionRequest(heartbeat=lpb.SessionRequest.Beat()))
                await session.read()

        beating = asyncio.create_task(beat())
        if mode == "work":
            tasks = tpb_grpc.TasksStub(ch)
            request = tpb.AwaitTaskRequest(
                chatroom=chatroom, role=role, connection_id=conn, epoch=joined.participant.epoch
            )
            async for reply in tasks.AwaitTask(request):
                t = reply.task
                await tasks.StartTask(
                    tpb.TaskRef(id=t.id, attempt=t.attempt, actor=f"pid {os.getpid()}")
                )
                print(f"working on {t.id} attempt {t.attempt}", flush=True)
        await beating


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "crash":
        sys.exit(1)
    if mode == "sleep":
        time.sleep(3600)
    asyncio.run(main(mode))
