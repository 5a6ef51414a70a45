"""Load generator for `heartbeat_load`: one process holding many liveness Session streams.

Each stream joins, then heartbeats every interval at its own phase (phases are spread
evenly over the interval across all generator processes, by wall clock), timing every
beat until its HeartbeatResponse arrives. It prints `JOINED n` once every stream has
joined, runs until SIGTERM/SIGINT, then writes its samples as JSON to --out.

    python -m bench.load_client --addr 127.0.0.1:PORT --shard 0 --shards 2 --count 500 \
        --out samples.json

With several generator processes, give each its own --shard; stream i of shard k is the
global participant i * shards + k, so every process's beats cover the whole interval.

Credentials as for any client (VIGIL_TOKEN, ...; VIGIL_TLS_CA for a TLS server). With
--token-file (an owner-only JSON object, role -> bearer token), each participant
authenticates with its own token instead, as deployed agents do, over the connection it
shares with the other streams of its client.

With --own-connections every participant has a client (channel, TCP connection, HTTP/2
keepalive) of its own, made just before it joins, as each agent of a real deployment
does; --channels is then ignored.

On SIGUSR1 it writes the samples taken since the previous SIGUSR1 to `OUT.partN` (N
counting from 1) and prints `DUMPED N`, and goes on (liveness_capacity reads its windows
this way while the load keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import json
import os
import resource
import signal
import sys
import time
from array import array
from dataclasses import dataclass, field, replace

from vigil.client import Beat, Client, ClientConfig, ParticipantSession
from vigil.core.vocab import AgentKind


@dataclass
class Samples:
    send_wall: array[float] = field(default_factory=lambda: array("d"))  # when sent, epoch s
    ack_ms: array[float] = field(default_factory=lambda: array("d"))  # send -> response
    lag_ms: array[float] = field(default_factory=lambda: array("d"))  # send - its schedule
    joined: int = 0
    join_errors: list[str] = field(default_factory=list)
    not_ok: int = 0  # heartbeat answers other than OK
    stream_errors: list[str] = field(default_factory=list)


def _acting_as(client: Client, token: str) -> Client:
    """The same client (its channels and connections) sending another bearer token."""
    view = copy.copy(client)
    view.metadata = (("authorization", f"Bearer {token}"),)
    return view


async def _hold(
    client: Client | ClientConfig,
    chatroom: str,
    index: int,
    total: int,
    interval: float,
    samples: Samples,
    join_gate: asyncio.Semaphore,
    running_sessions: list[asyncio.Task[object]],
    role_offset: int = 0,
    tokens: dict[str, str] | None = None,
    own_clients: list[Client] | None = None,
) -> ParticipantSession | None:
    """Join one participant (gated) whose beats fall at its own phase of the interval;
    every acknowledged beat lands in `samples`. Returns the running session. Given a
    config instead of a client, it opens a client of its own (kept in `own_clients`)."""
    own_clients = [] if own_clients is None else own_clients

    def beat(b: Beat) -> None:
        samples.send_wall.append(b.sent_wall)
        samples.ack_ms.append(b.ack_s * 1000)
        samples.lag_ms.append((b.sent_wall - b.scheduled_wall) * 1000)
        if not b.ok:
            samples.not_ok += 1

    def said(line: str) -> None:
        if not line.startswith("joined"):  # anything after the join is a disruption
            samples.stream_errors.append(f"{index}: {line}")

    role = f"p{role_offset + index:05d}"
    async with join_gate:
        if isinstance(client, ClientConfig):  # a connection of its own, opened now
            config = client if tokens is None else replace(client, token=tokens[role])
            client = Client(config)
            own_clients.append(client)
            try:
                await client.wait_ready(30)
            except Exception as not_ready:
                samples.join_errors.append(f"{index}: {not_ready}")
                return None
        elif tokens is not None:
            client = _acting_as(client, tokens[role])
        session = client.session(
            chatroom,
            role,
            AgentKind.CUSTOM,
            say=said,
            on_heartbeat=beat,
            beat_offset=interval * index / total,
        )
        running = asyncio.create_task(session.run())
        joined = asyncio.create_task(session.joined.wait())
        await asyncio.wait({running, joined}, return_when=asyncio.FIRST_COMPLETED)
        joined.cancel()
        if running.done():
            exc = running.exception()
            samples.join_errors.append(f"{index}: {exc}")
            return None
    samples.joined += 1
    running_sessions.append(running)
    return session


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Separate TCP connections per client (channels with equal arguments share one).
    config = replace(
        ClientConfig.from_env(addr=args.addr),
        channel_options=(("grpc.use_local_subchannel_pool", 1),),
    )
    clients = [] if args.own_connections else [Client(config) for _ in range(args.channels)]
    own_clients: list[Client] = []
    tokens: dict[str, str] | None = args.tokens
    samples = Samples()
    dumped = {"parts": 0, "upto": 0}

    def dump() -> None:
        lo, hi = dumped["upto"], len(samples.ack_ms)
        dumped["parts"] += 1
        dumped["upto"] = hi
        part = f"{args.out}.part{dumped['parts']}"
        doc = {
            "send_wall": samples.send_wall[lo:hi].tolist(),
            "ack_ms": samples.ack_ms[lo:hi].tolist(),
            "lag_ms": samples.lag_ms[lo:hi].tolist(),
            "not_ok": samples.not_ok,
            "stream_error_count": len(samples.stream_errors),
            "stream_errors": samples.stream_errors[:5],
        }
        with open(part + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(part + ".tmp", part)
        print(f"DUMPED {dumped['parts']}", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, dump)
    gate = asyncio.Semaphore(args.join_concurrency)
    tasks: list[asyncio.Task[ParticipantSession | None]] = []
    session_tasks: list[asyncio.Task[object]] = []
    try:
        for client in clients:
            await client.wait_ready(10)
        total = args.count * args.shards
        for i in range(args.count):
            tasks.append(
                asyncio.create_task(
                    _hold(
                        config if args.own_connections else clients[i % len(clients)],
                        args.chatroom,
                        i * args.shards + args.shard,
                        total,
                        args.interval_ms / 1000,
                        samples,
                        gate,
                        session_tasks,
                        args.role_offset,
                        tokens,
                        own_clients,
                    )
                )
            )
        deadline = time.monotonic() + args.join_timeout
        while samples.joined + len(samples.join_errors) < args.count:
            if time.monotonic() > deadline or stop.is_set():
                break
            await asyncio.sleep(0.05)
        # Steady state from here on: nothing left to collect that a pause would help.
        gc.collect()
        gc.freeze()
        gc.disable()
        print(f"JOINED {samples.joined} errors {len(samples.join_errors)}", flush=True)
        await stop.wait()
    finally:
        stop.set()
        for t in [*tasks, *session_tasks]:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*tasks, *session_tasks, return_exceptions=True), 5
            )
        for client in [*clients, *own_clients]:
            with contextlib.suppress(Exception):
                await client.close()
    return {
        "send_wall": samples.send_wall.tolist(),
        "ack_ms": samples.ack_ms.tolist(),
        "lag_ms": samples.lag_ms.tolist(),
        "joined": samples.joined,
        "join_errors": samples.join_errors[:20],
        "join_error_count": len(samples.join_errors),
        "not_ok": samples.not_ok,
        "stream_errors": samples.stream_errors[:20],
        "stream_error_count": len(samples.stream_errors),
        "cpu_s": time.process_time(),
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load_client")
    p.add_argument("--addr", required=True)
    p.add_argument("--chatroom", default="load")
    p.add_argument("--shard", type=int, default=0, help="this process's number, 0..shards-1")
    p.add_argument("--shards", type=int, default=1, help="generator processes in all")
    p.add_argument("--count", type=int, default=500, help="streams held by each process")
    p.add_argument("--channels", type=int, default=10)
    p.add_argument("--interval-ms", type=int, default=1000)
    p.add_argument("--join-concurrency", type=int, default=25)
    p.add_argument("--join-timeout", type=float, default=60)
    p.add_argument("--role-offset", type=int, default=0, help="added to role numbers")
    p.add_argument("--token-file", help="JSON object role -> bearer token (owner-only file)")
    p.add_argument(
        "--own-connections",
        action="store_true",
        help="a client and TCP connection of its own for every participant",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    # One socket per participant with --own-connections: as many files as allowed.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args.tokens = None
    if args.token_file:
        with open(args.token_file) as f:
            args.tokens = json.load(f)
    doc = asyncio.run(run(args))
    with open(args.out, "w") as f:
        json.dump(doc, f)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
