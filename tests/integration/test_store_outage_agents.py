"""Issue 11, must show 3: PostgreSQL stopped for 15 s under 20 agents at a 3 s TTL with
tasks in flight. Meanwhile streams stay open and heartbeats are acknowledged, what needs
the store answers UNAVAILABLE in words, health says NOT_SERVING; afterwards nobody was
marked offline for it, every task completes exactly once, a remote agent's exit during
the outage is recorded exactly once, and an agent that really stopped beating during
the outage is expired."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vigil import testing as harness
from vigil.client import Beat, Client, RPCError
from vigil.core.embedded import EmbeddedPostgres
from vigil.core.timings import Timings
from vigil.v1 import common_pb2
from vigil.v1 import tasks_pb2 as tpb

pytestmark = pytest.mark.slow

ENV = {"VIGIL_HEARTBEAT_INTERVAL_MS": "1000", "VIGIL_HEARTBEAT_TTL_MS": "3000"}
# The server's beats reach the store at most once a second while its sweeper looks
# every 0.1 s: when the store is back, the sweeper would find every deadline passed
# before the beats held in memory are written, unless it waits for them.
SERVER_ENV = {**ENV, "VIGIL_HEARTBEAT_FLUSH_MS": "1000", "VIGIL_SWEEP_MAX_SLEEP_MS": "100"}
TIMINGS = Timings.from_env(SERVER_ENV)
AGENTS = 20
OUTAGE_S = 15.0
WORK_S = 3.0  # each task takes this long: the first ones are in flight when the store stops


def own_client(addr: str) -> Client:
    """A client on a connection of its own, with the test's timings."""
    config = harness.client_config(addr)
    return Client(
        type(config)(
            liveness_addr=addr,
            tasks_addr=addr,
            token=config.token,
            timings=TIMINGS,
            channel_options=(("grpc.use_local_subchannel_pool", 1),),
        )
    )


async def until_done(call: object) -> object:
    """Call until the store answers (UNAVAILABLE is retried; nothing else is)."""
    while True:
        try:
            return await call()  # type: ignore[operator]
        except RPCError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.2)


async def health(addr: str) -> int:
    async with grpc.aio.insecure_channel(addr) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return int(reply.status)


async def test_a_store_outage_kills_no_agent_and_loses_nothing(
    own_pg: tuple[EmbeddedPostgres, str], tmp: Path, stream_failures: harness.StreamFailures
) -> None:
    pg, url = own_pg
    roles = [f"a{i:02d}" for i in range(AGENTS)]
    completed: list[str] = []
    beats: dict[str, list[float]] = {r: [] for r in roles}
    async with harness.local_server(url, TIMINGS) as srv:
        await harness.make_room(srv, "team", *roles, "stopper")
        daemon = await harness.register_machine(srv.addr, "m1", tmp, env=ENV)
        async with harness.client(srv.addr) as admin:
            await admin.create_chatroom(
                "room-builder",
                [
                    tpb.Role(
                        role="builder",
                        kind=common_pb2.AGENT_KIND_REMOTE,
                        machine="m1",
                        harness="work",
                    )
                ],
            )
        daemon.start()
        stopper = harness.spawn_agent(srv.addr, "team", "stopper", tmp, env=ENV)

        async def agent(role: str) -> None:
            async with (
                own_client(srv.addr) as client,
                client.agent("team", role, handle_signals=False) as session,
            ):
                session.session.on_heartbeat = lambda b, r=role: _beat(beats[r], b)
                async for task in session.tasks():
                    await until_done(task.start)
                    await asyncio.sleep(WORK_S)
                    await until_done(task.complete)
                    completed.append(task.id)

        runs = [asyncio.create_task(agent(r)) for r in roles]
        try:
            await harness.wait_for(
                lambda: _live_count(url, roles), 20, interval=0.2, what="20 agents live"
            )
            await harness.wait_live(url, "team", "stopper")
            sent: list[str] = []
            async with harness.client(srv.addr) as admin:
                for r in roles * 2:  # one in flight per agent, one queued behind it
                    sent.append((await admin.send("team", r, f"job for {r}")).id)
                builder_task = (await admin.send("room-builder", "builder", "build")).id
            builder_pid = await harness.wait_for(
                lambda: _in_progress_pid(srv.addr, builder_task), 30, 0.2, "builder working"
            )
            await harness.wait_live(url, "vigil.machines", "m1")
            await asyncio.sleep(1.0)  # the first tasks are started, none completed yet
        except BaseException:
            for run in runs:
                run.cancel()
            raise

        # -- the outage ---------------------------------------------------------
        revision = await _revision(url)
        await asyncio.to_thread(pg.stop)
        stopped_at = time.monotonic()
        failures_before = len(stream_failures.at)
        try:
            await asyncio.sleep(1.0)
            os.kill(stopper.proc.pid, signal.SIGSTOP)  # this one really stops beating
            os.kill(builder_pid, signal.SIGKILL)  # a remote agent's process exits
            async with harness.client(srv.addr) as admin:
                with pytest.raises(RPCError) as refused:
                    await admin.send("team", "a00", "during the outage")
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "database is unavailable" in str(refused.value)
            status = await harness.wait_for(
                lambda: _not_serving(srv.addr), 5, 0.2, "health NOT_SERVING"
            )
            assert status
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
            acked = {r: sum(1 for t in beats[r] if t > stopped_at + 1) for r in roles}
            open_streams = len(stream_failures.at) - failures_before
        finally:
            await asyncio.to_thread(pg.start)
        restarted_at = time.monotonic()

        try:
            await harness.wait_for(
                lambda: _serving(srv.addr), 15, 0.2, "health SERVING after the outage"
            )
            serving_s = time.monotonic() - restarted_at
            try:
                await harness.wait_for(
                    lambda: _async(len(set(completed)) >= len(sent)), 40, 0.2, "every task done"
                )
            except AssertionError as exc:
                rows = await _fetch(
                    url,
                    "SELECT role, offline_reason, extract(epoch FROM at) AS at, "
                    "extract(epoch FROM ready_until) AS until FROM liveness.events "
                    "WHERE revision > $1 AND type = 'offline' ORDER BY revision",
                    revision,
                )
                t0 = time.time() - (time.monotonic() - stopped_at)
                t1 = time.time() - (time.monotonic() - restarted_at)
                when = [
                    (r["role"], r["offline_reason"], round(float(r["at"]) - t0, 2),
                     round(float(r["until"] or 0) - t0, 2))
                    for r in rows
                ]  # fmt: skip
                raise AssertionError(
                    f"{exc}: {len(set(completed))}/{len(sent)} done; offline events since "
                    f"before the outage (role, reason, at, ready_until; seconds after the "
                    f"stop, restart at {t1 - t0:.2f}) {when}; agents ended "
                    f"{[r.exception() for r in runs if r.done()]}"
                ) from None
            stopped_row = await harness.wait_offline(url, "team", "stopper", timeout=10)
            exits = await harness.wait_for(
                lambda: _exits(url, "room-builder", "builder"), 15, 0.2, "the exit recorded"
            )
            await asyncio.sleep(2 * TIMINGS.heartbeat_ttl)  # time for any wrong expiry
            offline = await _offline_since(url, revision)
            done_twice = [t for t, n in Counter(completed).items() if n > 1]
            completions = await _completions(url, sent)
            exits = await _exits(url, "room-builder", "builder")
            print(
                f"\n{AGENTS} agents, TTL {TIMINGS.heartbeat_ttl:.0f} s, PostgreSQL stopped "
                f"{restarted_at - stopped_at:.1f} s: beats acknowledged per agent during it "
                f"min {min(acked.values())} max {max(acked.values())}; stream failures "
                f"{open_streams}; SERVING {serving_s:.1f} s after restart; offline events "
                f"{sorted(offline)}; {len(set(completed))}/{len(sent)} tasks completed, "
                f"{len(done_twice)} twice; builder exits recorded {len(exits)}; stopper "
                f"{stopped_row['offline_reason']}"
            )
            assert open_streams == 0
            assert min(acked.values()) >= OUTAGE_S - 4  # ~1 per second, all through
            not_ours = [o for o in offline if o[1] not in ("stopper", "builder")]
            assert not_ours == [], not_ours
            assert ("team", "stopper", "ttl_expired") in offline or (
                "team",
                "stopper",
                "stream_dropped",
            ) in offline
            assert not done_twice
            assert all(n == 1 for n in completions.values()), completions
            assert len(exits) == 1, exits
            for r in roles:
                row = await harness.participant_row(url, "team", r)
                assert row is not None and row["status"] == "live" and row["epoch"] == 1, row
            machine = await harness.participant_row(url, "vigil.machines", "m1")
            assert machine is not None and machine["status"] == "live"
        finally:
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            os.kill(stopper.proc.pid, signal.SIGCONT)
            stopper.proc.kill()
            await daemon.stop()


def _beat(into: list[float], beat: Beat) -> None:
    if beat.ok:
        into.append(time.monotonic())


async def _async(value: bool) -> bool:
    return value


async def _fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _live_count(url: str, roles: list[str]) -> bool:
    rows = await _fetch(
        url,
        "SELECT count(*) AS n FROM liveness.participants "
        "WHERE chatroom = 'team' AND role = ANY($1) AND status = 'live'",
        roles,
    )
    return int(rows[0]["n"]) == len(roles)


async def _revision(url: str) -> int:
    rows = await _fetch(url, "SELECT coalesce(max(revision), 0) AS r FROM liveness.events")
    return int(rows[0]["r"])


async def _offline_since(url: str, revision: int) -> list[tuple[str, str, str]]:
    rows = await _fetch(
        url,
        "SELECT chatroom, role, offline_reason FROM liveness.events "
        "WHERE revision > $1 AND type = 'offline' ORDER BY revision",
        revision,
    )
    return [(r["chatroom"], r["role"], r["offline_reason"]) for r in rows]


async def _completions(url: str, ids: list[str]) -> dict[str, int]:
    rows = await _fetch(
        url,
        "SELECT t.id::text AS id, count(x.id) AS n FROM tasks.tasks t "
        "LEFT JOIN tasks.transitions x ON x.task_id = t.id AND x.to_status = 'completed' "
        "WHERE t.id::text = ANY($1) GROUP BY t.id",
        ids,
    )
    return {r["id"]: int(r["n"]) for r in rows}


async def _exits(url: str, chatroom: str, role: str) -> list[asyncpg.Record]:
    return await _fetch(
        url, "SELECT * FROM tasks.agent_exits WHERE chatroom = $1 AND role = $2", chatroom, role
    )


async def _in_progress_pid(addr: str, task_id: str) -> int | None:
    async with harness.client(addr) as admin:
        task = await admin.get_task(task_id)
        if task.status != tpb.TASK_STATUS_IN_PROGRESS:
            return None
        (agent,) = await admin.list_agents("room-builder")
        return int(agent.pid) or None


async def _not_serving(addr: str) -> bool:
    return await health(addr) == health_pb2.HealthCheckResponse.NOT_SERVING


async def _serving(addr: str) -> bool:
    return await health(addr) == health_pb2.HealthCheckResponse.SERVING
