"""Issue 11, must show 4: a client behind a frozen proxy (a true half-open peer: its
sockets stay open, nothing passes) is marked `stream_dropped` by the server within
keepalive time + timeout (+1 s), the client notices within the same bound, and a
healthy client on the same server is untouched."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.client import Beat, Client, ParticipantSession
from vigil.core.timings import Timings

pytestmark = pytest.mark.slow

# Keepalive well below the TTL, so the TTL cannot be what catches the frozen client.
KEEPALIVE_TIME_MS = 1_000
KEEPALIVE_TIMEOUT_MS = 1_000
TIMINGS = Timings.from_env(
    {
        "VIGIL_HEARTBEAT_INTERVAL_MS": "500",
        "VIGIL_HEARTBEAT_TTL_MS": "8000",
        "VIGIL_KEEPALIVE_TIME_MS": str(KEEPALIVE_TIME_MS),
        "VIGIL_KEEPALIVE_TIMEOUT_MS": str(KEEPALIVE_TIMEOUT_MS),
        "VIGIL_SHUTDOWN_GRACE_MS": "1000",
    }
)
BOUND_S = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
# A ping already in flight at the freeze (keepalive's or flow control's) finds the
# dead path after just the timeout; nothing sooner can be keepalive's doing.
LOWER_S = KEEPALIVE_TIMEOUT_MS / 1000 - 0.25


def start_proxy(target: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vigil.testing.proxy", target],
        env=harness.child_env(),
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"127.0.0.1:{port}"


def client_of(addr: str, srv_addr: str) -> Client:
    config = harness.client_config(srv_addr)
    # Each client on a connection of its own (gRPC shares subchannels otherwise).
    return Client(
        type(config)(
            liveness_addr=addr,
            tasks_addr=addr,
            token=config.token,
            timings=TIMINGS,
            channel_options=(("grpc.use_local_subchannel_pool", 1),),
        )
    )


async def test_a_client_behind_a_frozen_proxy_is_dropped_at_keepalive_and_others_are_untouched(
    db_url: str, tmp: Path, stream_failures: harness.StreamFailures
) -> None:
    async with harness.local_server(db_url, TIMINGS) as srv:
        await harness.make_room(srv, "room", "frozen", "healthy")
        proxy, proxy_addr = start_proxy(srv.addr)
        frozen_client = client_of(proxy_addr, srv.addr)
        healthy_client = client_of(srv.addr, srv.addr)
        healthy_beats: list[Beat] = []
        frozen = ParticipantSession(frozen_client, "room", "frozen")
        healthy = ParticipantSession(
            healthy_client, "room", "healthy", on_heartbeat=healthy_beats.append
        )
        runs = [asyncio.create_task(s.run()) for s in (frozen, healthy)]
        try:
            frozen_epoch = await asyncio.wait_for(frozen.wait_joined(), 10)
            healthy_epoch = await asyncio.wait_for(healthy.wait_joined(), 10)
            await asyncio.sleep(1.5)  # a few beats through the proxy

            os.kill(proxy.pid, signal.SIGSTOP)
            frozen_at_wall = datetime.now(UTC)
            frozen_at = time.monotonic()
            beats_before = len(healthy_beats)

            row = await harness.wait_offline(db_url, "room", "frozen", timeout=BOUND_S + 3)
            server_s = (row["offline_at"] - frozen_at_wall).total_seconds()
            await harness.wait_for(
                lambda: _async(bool(stream_failures.at)), BOUND_S + 3, what="the client noticed"
            )
            client_s = stream_failures.at[0] - frozen_at
            healthy_row = await harness.participant_row(db_url, "room", "healthy")
            beats_during = len(healthy_beats) - beats_before
            print(
                f"\nkeepalive time {KEEPALIVE_TIME_MS} ms + timeout {KEEPALIVE_TIMEOUT_MS} ms "
                f"= {BOUND_S:.1f} s, earliest possible {LOWER_S:.2f} s "
                f"(TTL {TIMINGS.heartbeat_ttl:.1f} s, beats every "
                f"{TIMINGS.heartbeat_interval:.1f} s): server marked the frozen client "
                f"{row['offline_reason']} after {server_s:.2f} s; the client noticed after "
                f"{client_s:.2f} s; the healthy client had {beats_during} beats acknowledged "
                "meanwhile"
            )

            assert row["offline_reason"] == "stream_dropped"
            assert row["epoch"] == frozen_epoch
            # Keepalive caught it: an unanswered ping and its timeout, so not sooner
            # than the timeout, not later than time + timeout (+1 s), far before the TTL.
            assert LOWER_S < server_s <= BOUND_S + 1.0
            assert LOWER_S < client_s <= BOUND_S + 1.0

            # The healthy client: still live, same epoch, every beat acknowledged.
            assert healthy_row is not None and healthy_row["status"] == "live"
            assert healthy_row["epoch"] == healthy_epoch
            assert beats_during >= int(server_s / TIMINGS.heartbeat_interval) - 2
            assert all(b.ok for b in healthy_beats)
            assert not runs[1].done()

            # Thawed, the frozen client finds itself offline and rejoins by itself.
            os.kill(proxy.pid, signal.SIGCONT)

            async def rejoined() -> object:
                r = await harness.participant_row(db_url, "room", "frozen")
                return r if r and r["status"] == "live" and r["epoch"] > frozen_epoch else None

            await harness.wait_for(rejoined, 30, interval=0.1, what="the frozen client rejoined")
            last = await harness.participant_row(db_url, "room", "healthy")
            assert last is not None and last["epoch"] == healthy_epoch
            assert last["status"] == "live"
        finally:
            os.kill(proxy.pid, signal.SIGCONT)
            for s in (frozen, healthy):
                s.stop()
            await asyncio.wait(runs, timeout=5)
            for c in (frozen_client, healthy_client):
                await c.close()
            proxy.kill()
            proxy.wait()


async def _async(value: bool) -> bool:
    return value
