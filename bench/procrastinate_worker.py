"""procrastinate's side of `task_throughput` (bench/throughput.py): the app both sides
share (the benchmark defers with it, the workers run it), and a worker process.

    DATABASE_URL=postgresql://… python -m bench.procrastinate_worker \\
        --name w0 --concurrency 20 --out executed.json

The worker is procrastinate's own (`App.run_worker_async`: one process, `concurrency`
jobs at a time on its event loop, LISTEN/NOTIFY to hear of new jobs) on the queue
QUEUE; its one task, TASK_NAME, does nothing but note that it ran. On SIGTERM/SIGINT
the worker stops as procrastinate stops (waiting for the jobs it runs), then writes
every (round, n) it executed, in order, to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import procrastinate

from bench.common import write_json

TASK_NAME = "bench_noop"
QUEUE = "bench"


def make_app(
    url: str, pool_size: int, executed: list[list[int]] | None = None
) -> procrastinate.App:
    """A procrastinate app on `url` (a psycopg pool of `pool_size` connections) with the
    benchmark's task; each run of it appends its (round, n) to `executed`."""
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=url, min_size=pool_size, max_size=pool_size
        )
    )
    ran = executed if executed is not None else []

    @app.task(name=TASK_NAME, queue=QUEUE)
    async def noop(round: int, n: int) -> None:
        ran.append([round, n])

    return app


async def run(args: argparse.Namespace) -> int:
    executed: list[list[int]] = []
    app = make_app(os.environ["DATABASE_URL"], args.concurrency, executed)
    async with app.open_async():
        await app.run_worker_async(
            queues=[QUEUE],
            name=args.name,
            concurrency=args.concurrency,
            install_signal_handlers=True,
        )
    write_json(args.out, {"executed": executed})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.procrastinate_worker")
    p.add_argument("--name", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--out", required=True)
    args: Any = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
