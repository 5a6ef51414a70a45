"""A test agent that joins, claims a task, prints its id and attempt, and then hangs
holding its session without confirming receipt: the process a test kills to make a
claimer die mid-delivery. Usage: python -m tests.agents.claim_and_hang ADDR CHATROOM ROLE"""

from __future__ import annotations

import asyncio
import sys
import uuid

import grpc

from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc


async def main(addr: str, chatroom: str, role: str) -> None:
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
        request = tpb.AwaitTaskRequest(
            chatroom=chatroom, role=role, connection_id=conn, epoch=joined.participant.epoch
        )
        async for reply in tpb_grpc.TasksStub(ch).AwaitTask(request):
            print(reply.task.id, reply.task.attempt, flush=True)
        await beating  # hang here, heartbeating, until killed


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
