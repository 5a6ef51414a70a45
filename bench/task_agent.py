"""Waiting agent for `send_to_receipt`: one process that joins a liveness Session for
(chatroom, role), heartbeats, and loops: AwaitTask, and on receipt print

    GOT <task id> <attempt> <time.time() at receipt>

then CompleteTask with that attempt (which frees the role for the next task), print
`DONE <task id>` and AwaitTask again. It prints `JOINED <epoch>` once the session is up
and runs until SIGTERM/SIGINT. Errors are printed as `ERROR ...` and end the process
with exit code 1.

    python -m bench.task_agent --addr 127.0.0.1:PORT --chatroom room --role builder
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
import time
import uuid

import grpc

from vigil.v1 import common_pb2
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc


async def _beat(session: grpc.aio.StreamStreamCall, interval: float) -> None:
    beat = lpb.SessionRequest(heartbeat=lpb.SessionRequest.Beat())
    while True:
        await asyncio.sleep(interval)
        await session.write(beat)
        msg = await session.read()
        if msg is grpc.aio.EOF:
            raise RuntimeError("the liveness session was ended by the server")


async def _work(tasks: tpb_grpc.TasksStub, chatroom: str, role: str, conn: str, epoch: int) -> None:
    request = tpb.AwaitTaskRequest(chatroom=chatroom, role=role, connection_id=conn, epoch=epoch)
    while True:
        async for reply in tasks.AwaitTask(request):
            received = time.time()
            task = reply.task
            print(f"GOT {task.id} {task.attempt} {received:.6f}", flush=True)
            await tasks.CompleteTask(tpb.TaskRef(id=task.id, attempt=task.attempt, actor=role))
            print(f"DONE {task.id}", flush=True)


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with grpc.aio.insecure_channel(args.addr) as ch:
        await asyncio.wait_for(ch.channel_ready(), 10)
        session = lpb_grpc.LivenessStub(ch).Session()
        conn = str(uuid.uuid4())
        await session.write(
            lpb.SessionRequest(
                join=lpb.JoinRequest(
                    chatroom=args.chatroom,
                    role=args.role,
                    kind=common_pb2.AGENT_KIND_CUSTOM,
                    connection_id=conn,
                )
            )
        )
        first = await session.read()
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "joined":
            print(f"ERROR could not join: {first!r}", flush=True)
            return 1
        joined = first.joined
        # Nothing left to collect that a pause in the measured loop would help.
        gc.collect()
        gc.freeze()
        gc.disable()
        print(f"JOINED {joined.participant.epoch}", flush=True)
        jobs = [
            asyncio.create_task(_beat(session, joined.heartbeat_interval_ms / 1000)),
            asyncio.create_task(
                _work(
                    tpb_grpc.TasksStub(ch),
                    args.chatroom,
                    args.role,
                    conn,
                    joined.participant.epoch,
                )
            ),
        ]
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*jobs, stopping], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for job in jobs:
            if job in done and job.exception() is not None:
                exc = job.exception()
                print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
                code = 1
        for t in [*jobs, stopping]:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 5)
        session.cancel()
    return code


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.task_agent")
    p.add_argument("--addr", required=True)
    p.add_argument("--chatroom", required=True)
    p.add_argument("--role", required=True)
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
