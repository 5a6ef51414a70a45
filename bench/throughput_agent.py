"""Vigil's agents for `task_throughput` (bench/throughput.py): one process running
several agents, one per role, each with a client (and TCP connection) of its own and
the chatroom token of its role, as separately deployed agents hold them.

    VIGIL_ADDR=127.0.0.1:PORT[,127.0.0.1:PORT2] python -m bench.throughput_agent \\
        --mode session --chatroom room --roles r0,r1 --tokens FILE --ready FILE --out FILE

--mode session   the client package's long-lived agent session: joined once, task after
                 task (`async for task in agent.tasks()`, `start`, `complete`) for as
                 long as it runs.
--mode oneshot   as `vigil wait-for-task` and the commands after it do: join, wait for
                 one task and leave with `task_received` (`receive_one`), then start and
                 complete it, then join again for the next. The client (its connection)
                 is kept from task to task; no process starts per task.

--tokens is an owner-only JSON file {role: token}. Once every agent has joined for the
first time the process writes --ready. On SIGTERM/SIGINT the agents stop (leaving their
sessions) and the process writes to --out, as JSON, each role's completed tasks in order
([task id, attempt] pairs). An agent that fails ends the process with exit code 1 (the
traceback in its log).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import write_json
from vigil.client import ClientConfig, connect

# A connection of its own for each agent's client (channels with equal arguments would
# share one within a process).
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


class _Ready:
    """Counts the agents that joined for the first time; writes the ready file once."""

    def __init__(self, agents: int, path: Path) -> None:
        self._left = agents
        self._path = path

    def joined(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._path.write_text("ready\n")


async def _session_agent(
    config: ClientConfig, chatroom: str, role: str, ready: _Ready, done: list[list[Any]]
) -> None:
    async with (
        connect(config=config) as client,
        client.agent(chatroom, role, handle_signals=False) as agent,
    ):
        ready.joined()
        async for task in agent.tasks():
            await task.start()
            await task.complete()
            done.append([task.id, task.attempt])


async def _oneshot_agent(
    config: ClientConfig, chatroom: str, role: str, ready: _Ready, done: list[list[Any]]
) -> None:
    first = True
    async with connect(config=config) as client:
        while True:
            async with client.agent(chatroom, role, handle_signals=False) as agent:
                if first:
                    ready.joined()
                    first = False
                task = await agent.receive_one()
            await task.start()
            await task.complete()
            done.append([task.id, task.attempt])


async def run(args: argparse.Namespace, tokens: dict[str, str]) -> int:
    roles = [r for r in args.roles.split(",") if r]
    base = ClientConfig.from_env()
    ready = _Ready(len(roles), Path(args.ready))
    done: dict[str, list[list[Any]]] = {r: [] for r in roles}
    agent = _session_agent if args.mode == "session" else _oneshot_agent
    jobs = [
        asyncio.create_task(
            agent(
                replace(base, token=tokens[r], channel_options=OWN_CONNECTION),
                args.chatroom,
                r,
                ready,
                done[r],
            ),
            name=f"agent-{r}",
        )
        for r in roles
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([stopped, *jobs], return_when=asyncio.FIRST_COMPLETED)
    failed = [j for j in jobs if j.done()]  # an agent ended on its own: it failed
    for j in jobs:
        j.cancel()
    for j in jobs:
        with contextlib.suppress(asyncio.CancelledError):
            await j  # a failure raises here: traceback in the log, exit code 1
    if failed:
        print(f"agents ended on their own: {[j.get_name() for j in failed]}", file=sys.stderr)
        return 1
    write_json(args.out, {"done": done})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput_agent")
    p.add_argument("--mode", choices=("session", "oneshot"), required=True)
    p.add_argument("--chatroom", required=True)
    p.add_argument("--roles", required=True, help="comma-separated")
    p.add_argument("--tokens", required=True, help="owner-only JSON file {role: token}")
    p.add_argument("--ready", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tokens: dict[str, str] = json.loads(Path(args.tokens).read_text())
    return asyncio.run(run(args, tokens))


if __name__ == "__main__":
    sys.exit(main())
