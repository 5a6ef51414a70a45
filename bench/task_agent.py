"""Waiting agent for `send_to_receipt`: one process holding one agent session (the
client package's long-lived session) for (chatroom, role), taking task after task. On
each receipt it prints

    GOT <task id> <attempt> <time.time() at receipt>

then completes it with that attempt (which frees the role for the next task), prints
`DONE <task id>` and waits for the next. It prints `JOINED <epoch>` once the session is
up and runs until SIGTERM/SIGINT. Errors are printed as `ERROR ...` and end the
process with exit code 1.

    python -m bench.task_agent --addr 127.0.0.1:PORT --chatroom room --role builder
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time

from vigil.client import RPCError, connect


async def run(args: argparse.Namespace) -> int:
    try:
        async with connect(args.addr) as client, client.agent(args.chatroom, args.role) as agent:
            # Nothing left to collect that a pause in the measured loop would help.
            gc.collect()
            gc.freeze()
            gc.disable()
            print(f"JOINED {agent.session.epoch}", flush=True)
            async for task in agent.tasks():
                print(f"GOT {task.id} {task.attempt} {time.time():.6f}", flush=True)
                await task.complete()
                print(f"DONE {task.id}", flush=True)
    except RPCError as exc:
        print(f"ERROR {exc}", flush=True)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.task_agent")
    p.add_argument("--addr", required=True)
    p.add_argument("--chatroom", required=True)
    p.add_argument("--role", required=True)
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
