"""The bundled example agent, run by a machine daemon for a remote role: it waits for
a task, works on it for a moment, completes it, and waits again. With --crash it exits
with code 1 at once (to show a crash loop). The daemon gives it VIGIL_CHATROOM,
VIGIL_ROLE and VIGIL_ADDR."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import grpc

from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

WORK_SECONDS = float(os.environ.get("VIGIL_EXAMPLE_WORK_SECONDS", "1.5"))


async def _beat(call: grpc.aio.StreamStreamCall, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await call.write(lpb.SessionRequest(heartbeat=lpb.SessionRequest.Beat()))
        await call.read()


async def agent(chatroom: str, role: str, addr: str) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        tasks = tpb_grpc.TasksStub(ch)
        while True:
            # One liveness session per task, as `vigil wait-for-task` does.
            session = lpb_grpc.LivenessStub(ch).Session()
            conn = str(uuid.uuid4())
            await session.write(
                lpb.SessionRequest(
                    join=lpb.JoinRequest(
                        chatroom=chatroom,
                        role=role,
                        kind=lpb.AGENT_KIND_REMOTE,
                        connection_id=conn,
                    )
                )
            )
            joined = (await session.read()).joined
            beating = asyncio.create_task(_beat(session, joined.heartbeat_interval_ms / 1000))
            request = tpb.AwaitTaskRequest(
                chatroom=chatroom,
                role=role,
                connection_id=conn,
                epoch=joined.participant.epoch,
            )
            task = None
            async for reply in tasks.AwaitTask(request):
                task = reply.task
            assert task is not None
            # Receipt confirmed first (unary leave), then the stream may close.
            await lpb_grpc.LivenessStub(ch).Leave(
                lpb.LeaveRequest(
                    chatroom=chatroom,
                    role=role,
                    epoch=joined.participant.epoch,
                    connection_id=conn,
                    reason=lpb.OFFLINE_REASON_TASK_RECEIVED,
                )
            )
            beating.cancel()
            session.cancel()
            print(f"agent {os.getpid()}: working on {task.id} (attempt {task.attempt})", flush=True)
            await tasks.StartTask(tpb.TaskRef(id=task.id, attempt=task.attempt, actor=role))
            await asyncio.sleep(WORK_SECONDS)
            await tasks.CompleteTask(tpb.TaskRef(id=task.id, attempt=task.attempt, actor=role))
            print(f"agent {os.getpid()}: completed {task.id}", flush=True)


def main() -> None:
    if "--crash" in sys.argv:
        print("example agent: crashing on purpose", file=sys.stderr)
        sys.exit(1)
    env = os.environ
    try:
        asyncio.run(agent(env["VIGIL_CHATROOM"], env["VIGIL_ROLE"], env["VIGIL_ADDR"]))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
