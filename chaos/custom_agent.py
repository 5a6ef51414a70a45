"""A custom role's scripted agent for the chaos soak: a loop of one-shot
`vigil wait-for-task --json` processes (the participant the faults target; its pid is
written to `--pid-file`), each task then started and completed through the client with
the role's own chatroom token. Now and then (seeded) it acts as a zombie: it releases
the task it holds and then presents the old attempt, which Vigil must refuse. Every
start, complete and release it makes is written to `--ops` as a `client_op` record.

    python -m chaos.custom_agent --chatroom C --role R --pid-file F --ops F --seed N
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vigil.client import ClientConfig, RPCError, connect

WORK_S = 0.2
ZOMBIE_P = 0.15


def _record(ops: Any, op: str, task: str, attempt: int, accepted: bool, why: str = "") -> None:
    rec = {
        "kind": "client_op",
        "t": time.time(),
        "op": op,
        "task": task,
        "attempt": attempt,
        "accepted": accepted,
        "why": why[:200],
        "principal": os.environ.get("CHAOS_PRINCIPAL", ""),
    }
    ops.write(json.dumps(rec, sort_keys=True) + "\n")
    ops.flush()


async def _call(ops: Any, op: str, fn: Any, task: str, attempt: int) -> bool:
    """One action, retried while Vigil is unreachable (a replica or the database down)."""
    for _ in range(100):
        try:
            await fn(task, attempt) if op != "release" else await fn(task, "chaos zombie")
        except RPCError as exc:
            if exc.retryable:
                await asyncio.sleep(0.2)
                continue
            _record(ops, op, task, attempt, False, str(exc))
            return False
        _record(ops, op, task, attempt, True)
        return True
    return False


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--chatroom", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--pid-file", type=Path, required=True)
    p.add_argument("--ops", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(f"{args.seed}/{args.role}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    cmd = [
        sys.executable,
        "-m",
        "vigil.cli",
        "wait-for-task",
        "--chatroom",
        args.chatroom,
        "--role",
        args.role,
        "--json",
        "--timeout",
        "20s",
    ]
    with args.ops.open("a") as ops:
        async with connect(config=ClientConfig.from_env(), wait_ready=False) as client:
            while not stopping.is_set():
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
                )
                args.pid_file.write_text(str(proc.pid))
                waiter = asyncio.ensure_future(proc.communicate())
                stop = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stopping.is_set() and not waiter.done():
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
                    await waiter
                    break
                stop.cancel()
                out, _ = waiter.result()
                with contextlib.suppress(FileNotFoundError):
                    args.pid_file.unlink()
                if proc.returncode != 0 or not out.strip():
                    await asyncio.sleep(0.1)
                    continue
                task = json.loads(out)
                tid, attempt = task["id"], int(task["attempt"])
                if rng.random() < ZOMBIE_P:
                    # The zombie: hand the task back, then act on the old attempt.
                    if await _call(ops, "release", client.release_task, tid, attempt):
                        await _call(ops, "start", client.start_task, tid, attempt)
                        await _call(ops, "complete", client.complete_task, tid, attempt)
                        continue
                # Complete even when the start was refused: a start whose answer was lost
                # and was retried is refused although it happened.
                await _call(ops, "start", client.start_task, tid, attempt)
                await asyncio.sleep(WORK_S)
                await _call(ops, "complete", client.complete_task, tid, attempt)


if __name__ == "__main__":
    asyncio.run(main())
