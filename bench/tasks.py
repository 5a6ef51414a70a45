"""Task-service benchmarks.

send_to_receipt       200 tasks sent one at a time to (chatroom, role) while a separate
                      agent process (bench.task_agent) holds an AwaitTask stream for it;
                      time from just before SendMessage to the agent holding the task.
                      Measured in the same run on three servers side by side, taking
                      turns task by task: the real one (this entry), the same with TLS
                      (send_to_receipt_tls), and one that trusts every caller
                      (send_to_receipt_plain); send_to_receipt_auth_cost compares them.
deadline_lag          10,000 pending tasks of custom roles nobody is live for, their
                      deadlines spread over one minute; a real `vigil up` scheduler
                      notifies each (pending_timeout). Lag = the task's first
                      notification's created_at minus its original deadline, per task.
scheduler_pass_flat   one scheduler pass (`TaskService.run_due`: find due, decide,
                      apply) over the same 100 due tasks with 10,000 and with 1,000,000
                      rows in tasks.tasks; the pass must not grow with the table.
tasks_lifecycle_rate  full lifecycles (send, claim, start, complete) per second through
                      gRPC with 32 concurrent roles (each worker a client of its own
                      holding a live participant of its role: a claim is bound to one),
                      against the same statements (the server's fast-path functions)
                      sent straight through asyncpg, durable on both; goal ratio ≥ 0.5;
                      statements per lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from prometheus_client import CollectorRegistry

from bench import common
from bench.common import Context, Goal
from vigil import testing as harness
from vigil.client import Client, ClientConfig, ParticipantSession
from vigil.core.auth import AuthStore
from vigil.core.clock import SystemClock
from vigil.core.db import Database, open_database
from vigil.core.timings import Timings
from vigil.core.vocab import AgentKind, TaskStatus
from vigil.task_service.agents_store import AgentStore
from vigil.task_service.metrics import TaskMetrics
from vigil.task_service.service import TaskService
from vigil.task_service.store import ROLE_CHANNEL, Q, TaskStore
from vigil.v1 import common_pb2
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

# Heartbeats every second with a TTL far away (no participant expires by accident), and a
# pending timeout far beyond any run: a re-armed deadline never comes due twice.
TASK_ENV = {
    "VIGIL_HEARTBEAT_INTERVAL_MS": "1000",
    "VIGIL_HEARTBEAT_TTL_MS": "5000",
    "VIGIL_TASK_PENDING_TIMEOUT_MS": "600000",
}
UP = ("up",)  # liveness and tasks in one process, as deployed by default


async def _create_room(stub: tpb_grpc.TasksStub, name: str, roles: list[str]) -> None:
    await stub.CreateChatroom(
        tpb.CreateChatroomRequest(
            name=name, roles=[tpb.Role(role=r, kind=common_pb2.AGENT_KIND_CUSTOM) for r in roles]
        )
    )


def _ms(values: list[float]) -> str:
    s = common.summarize(values)
    if not s["n"]:
        return "none"
    return "median {median_ms} / p90 {p90_ms} / p99 {p99_ms} / max {max_ms} ms".format(**s)


# -- send_to_receipt -------------------------------------------------------------------

RECEIPT_TASKS = 200
RECEIPT_WARMUP = 10  # first sends (prepared statements, first code paths) not measured
RECEIPT_GOAL = Goal(median_ms=10, p99_ms=50)
RECEIPT_CHATROOM = "bench-receipt"
RECEIPT_ROLE = "builder"
# After the server shows the agent waiting again: lets its first (empty) claim finish, so
# that every send meets an agent parked on its wake-up.
RECEIPT_SETTLE_S = 0.01
WAITING_GAUGE = "vigil_task_waiting_agents"


class _Lines:
    """The stdout lines of a child process, as an asyncio queue (None at EOF)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for raw in out:
                loop.call_soon_threadsafe(self.queue.put_nowait, raw.decode(errors="replace"))
            loop.call_soon_threadsafe(self.queue.put_nowait, None)

        threading.Thread(target=pump, name="agent-stdout", daemon=True).start()

    async def next(self, timeout: float, what: str) -> str:
        try:
            line = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise RuntimeError(f"no {what} within {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"the agent ended while waiting for {what}")
        if line.startswith("ERROR"):
            raise RuntimeError(f"agent: {line.strip()}")
        return line.strip()


async def _wait_waiting(server: common.Server, timeout: float = 10) -> None:
    """Until the server counts one AwaitTask stream waiting. (Polled sparingly: the
    server renders /metrics in a thread that competes with its event loop.)"""
    deadline = time.monotonic() + timeout
    while True:
        samples = await common.scrape(server.metrics_port, server.ca)
        if common.metric(samples, WAITING_GAUGE) >= 1:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent was not waiting again within {timeout:.0f} s")
        await asyncio.sleep(0.005)


@dataclass
class _Receiver:
    """One variant's server, the benchmark's channel to it, and its waiting agent."""

    variant: str
    server: common.Server
    channel: grpc.aio.Channel
    stub: tpb_grpc.TasksStub
    agent_log: Path
    agent: subprocess.Popen[bytes] | None = None
    lines: _Lines | None = None
    latencies: list[float] = field(default_factory=list)
    warmup: list[float] = field(default_factory=list)
    rpc_ms: list[float] = field(default_factory=list)
    mismatched: int = 0
    queued: int = 0
    m0: dict[str, float] = field(default_factory=dict)
    m1: dict[str, float] = field(default_factory=dict)

    async def scrape(self) -> dict[str, float]:
        return await common.scrape(self.server.metrics_port, self.server.ca)


async def _receiver(ctx: Context, variant: str) -> _Receiver:
    """A `vigil up` of `variant` with the chatroom, and its agent (`bench.task_agent`,
    holding a chatroom token of its role) joined and waiting."""
    url = await ctx.new_database()
    server = await ctx.start_server(url, TASK_ENV, f"receipt-{variant}", args=UP, variant=variant)
    ch = common.channel(server)
    r = _Receiver(variant, server, ch, tpb_grpc.TasksStub(ch), ctx.tmp / f"agent-{variant}.log")
    try:
        await _create_room(r.stub, RECEIPT_CHATROOM, [RECEIPT_ROLE])
        tokens = await common.role_tokens(url, RECEIPT_CHATROOM, [RECEIPT_ROLE])
        cmd = common.python_cmd(
            "bench.task_agent",
            "--addr", server.addr,
            "--chatroom", RECEIPT_CHATROOM,
            "--role", RECEIPT_ROLE,
        )  # fmt: skip
        env = ctx.client_env(server, {**TASK_ENV, "VIGIL_TOKEN": tokens[RECEIPT_ROLE]})
        with r.agent_log.open("wb") as err:
            r.agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
        ctx.reaper.add(r.agent)
        r.lines = _Lines(r.agent)
        joined = await r.lines.next(60, "JOINED from the agent")
        if not joined.startswith("JOINED"):
            raise RuntimeError(f"agent said {joined!r} instead of JOINED")
    except Exception:
        await _close_receiver(ctx, r)
        raise
    return r


async def _close_receiver(ctx: Context, r: _Receiver) -> None:
    if r.agent is not None and r.agent.poll() is None:
        r.agent.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(r.agent.wait, 10)
    await r.channel.close()
    await ctx.stop_server(r.server)


async def _one_receipt(r: _Receiver, i: int) -> None:
    """Send task i once the agent waits; time until the agent holds it."""
    assert r.lines is not None
    await _wait_waiting(r.server)
    await asyncio.sleep(RECEIPT_SETTLE_S)
    sent_wall = time.time()
    t0 = time.perf_counter()
    task = await r.stub.SendMessage(
        tpb.SendMessageRequest(chatroom=RECEIPT_CHATROOM, role=RECEIPT_ROLE, text=f"task {i}")
    )
    rpc = (time.perf_counter() - t0) * 1000
    got = (await r.lines.next(10, f"receipt of task {i}")).split()
    if got[0] != "GOT":
        raise RuntimeError(f"agent said {' '.join(got)!r}")
    done = await r.lines.next(10, f"completion of task {i}")
    if done != f"DONE {got[1]}":
        raise RuntimeError(f"agent said {done!r}, expected DONE {got[1]}")
    latency = (float(got[3]) - sent_wall) * 1000
    if i < RECEIPT_WARMUP:
        r.warmup.append(latency)
        return
    r.latencies.append(latency)
    r.rpc_ms.append(rpc)
    r.mismatched += got[1] != task.id
    r.queued += task.status != TaskStatus.PENDING.to_pb()


def _receipt_result(
    r: _Receiver, elapsed: float, cpu_pct: dict[str, float], halves: str
) -> dict[str, Any]:
    def delta(name: str, **labels: str) -> float:
        return common.metric(r.m1, name, **labels) - common.metric(r.m0, name, **labels)

    deliveries = delta("vigil_task_delivery_seconds_count")
    delivery_mean = (
        delta("vigil_task_delivery_seconds_sum") / deliveries * 1000 if deliveries else None
    )
    claims = delta("vigil_task_transitions_total", trigger="claimTask")
    completes = delta("vigil_task_transitions_total", trigger="completeTask")
    passes = delta("vigil_task_scheduler_pass_seconds_count")
    notes = [
        f"server: {common.DESCRIBE[r.variant]}",
        f"{len(r.latencies)} tasks, one at a time, each sent once the server showed the agent "
        f"waiting (+{RECEIPT_SETTLE_S * 1000:.0f} ms); {RECEIPT_WARMUP} warm-up tasks before "
        f"them not measured ({_ms(r.warmup)}); the three variants' servers ran side by side "
        f"and took turns, task by task, in rotating order ({elapsed:.1f} s in all)",
        f"{halves}",
        "the agent (bench.task_agent, the client package's agent session) holds a chatroom "
        "token of its role; the sender (this process) is the admin",
        f"SendMessage round trip: {_ms(r.rpc_ms)}",
        f"server: created -> written to the agent, mean {delivery_mean:.2f} ms"
        if delivery_mean is not None
        else "server: no delivery observed in its metrics",
        f"server transitions in the window: claimTask {claims:.0f}, completeTask {completes:.0f}; "
        f"scheduler passes {passes:.0f} ({passes / max(1, len(r.latencies)):.1f} per task: a "
        "send and a claim each wake the deadline scheduler)",
        *common.cpu_notes(cpu_pct),
    ]
    return common.result(
        r.latencies,
        RECEIPT_GOAL,
        checks={
            "each send received by the agent, in order": r.mismatched == 0
            and len(r.latencies) == RECEIPT_TASKS,
            "each send found the role free (pending, not queued)": r.queued == 0,
        },
        notes=notes,
        variant=common.LABEL[r.variant],
        send_rpc=common.summarize(r.rpc_ms),
        warmup=common.summarize(r.warmup),
        server_delivery_mean_ms=delivery_mean,
        cpu_pct=cpu_pct,
        elapsed_s=round(elapsed, 1),
    )


async def send_to_receipt(ctx: Context) -> dict[str, Any]:
    """The real server (auth, plaintext) is this benchmark's entry; the plain and TLS
    variants, measured in the same run (interleaved task by task), and their comparison
    are filed beside it."""
    receivers: list[_Receiver] = []
    try:
        for variant in common.VARIANTS:
            receivers.append(await _receiver(ctx, variant))
        by_variant = {r.variant: r for r in receivers}
        meter = common.CpuMeter(
            ctx,
            0,  # the three servers are groups of their own (pid 0 counts nothing)
            {
                **{f"{common.LABEL[r.variant]} server": [r.server.proc.pid] for r in receivers},
                "agents": [r.agent.pid for r in receivers if r.agent is not None],
            },
        )
        started = time.monotonic()
        for i in range(RECEIPT_WARMUP + RECEIPT_TASKS):
            if i == RECEIPT_WARMUP:
                meter.start()
                for r in receivers:
                    r.m0 = await r.scrape()
                started = time.monotonic()
            # Each variant first, second and third in turn.
            k = i % len(receivers)
            for r in receivers[k:] + receivers[:k]:
                await _one_receipt(r, i)
        elapsed = time.monotonic() - started
        cpu_pct = {k: v for k, v in meter.stop().items() if k != "server"}
        for r in receivers:
            r.m1 = await r.scrape()
    except Exception:
        for r in receivers:
            print(f"{r.variant} server log (tail):\n{common.log_tail(r.server.log)}")
            print(f"{r.variant} agent log (tail):\n{common.log_tail(r.agent_log)}")
        raise
    finally:
        for r in receivers:
            await _close_receiver(ctx, r)
        await asyncio.to_thread(ctx.reaper.kill_all)

    half = RECEIPT_TASKS // 2
    plain = by_variant[common.PLAIN].latencies

    def halves_of(r: _Receiver) -> str:
        medians = [
            common.summarize(x)["median_ms"] for x in (r.latencies[:half], r.latencies[half:])
        ]
        text = f"median of the first / second {half} tasks: {medians[0]} / {medians[1]} ms"
        if r.variant != common.PLAIN:
            base = [common.summarize(x)["median_ms"] for x in (plain[:half], plain[half:])]
            text += (
                " (vs plain: "
                + " / ".join(
                    common.fmt_pct(common.added_pct(m, b))
                    for m, b in zip(medians, base, strict=True)
                )
                + ")"
            )
        return text

    entries = {r.variant: _receipt_result(r, elapsed, cpu_pct, halves_of(r)) for r in receivers}
    cost = common.auth_cost(
        entries,
        "send → receipt",
        notes=[
            "the three servers ran side by side, each with its own database and waiting "
            "agent; task by task, each variant took its turn (rotating which went first), so "
            "whatever else the machine did weighed on all three alike",
            *(f"{common.LABEL[v]}: {halves_of(by_variant[v])}" for v in (common.AUTH, common.TLS)),
        ],
    )
    return {
        **entries[common.AUTH],
        common.EXTRA_ENTRIES: {
            "send_to_receipt_plain": entries[common.PLAIN],
            "send_to_receipt_tls": entries[common.TLS],
            "send_to_receipt_auth_cost": cost,
        },
    }


# -- deadline_lag ------------------------------------------------------------------------

LAG_ROOMS = 100
LAG_ROLES_PER_ROOM = 100  # 10,000 roles: one active task each
LAG_TASKS = LAG_ROOMS * LAG_ROLES_PER_ROOM
LAG_LEAD_S = 20.0  # from the insert to the window's start
LAG_WINDOW_S = 60.0
LAG_GRACE_S = 30.0  # after the window, for stragglers, before giving up
LAG_GOAL = Goal(p99_ms=1000)
LAG_STRETCH_S = 10.0  # lags and CPU are also reported per stretch of this length
LAG_SLOW_MS = 100.0  # and CPU while deadlines lagged more than this vs the rest
LAG_PREFIX = "lag-"

# Statements of the benchmark itself (filtered out of the pg_stat_statements count).
BENCH_MARK = "/* bench */"
# The first statement of asyncpg's reset query, run whenever a pool connection is released.
POOL_RESET_MARK = "pg_advisory_unlock_all()"
COUNT_NOTIFIED = f"{BENCH_MARK} SELECT count(*) FROM tasks.notifications WHERE kind = $1"


async def _insert_lag_tasks(conn: asyncpg.Connection, start: datetime) -> dict[str, datetime]:
    """Chatrooms, custom roles and one pending task per role, deadlines uniform (seeded)
    over [start, start + window); the task id -> its deadline."""
    async with conn.transaction():
        await conn.execute(
            f"{BENCH_MARK} INSERT INTO tasks.chatrooms (chatroom) "
            "SELECT $1 || lpad(i::text, 3, '0') FROM generate_series(0, $2 - 1) i",
            LAG_PREFIX,
            LAG_ROOMS,
        )
        await conn.execute(
            f"{BENCH_MARK} INSERT INTO tasks.roles (chatroom, role, kind) "
            "SELECT $1 || lpad((i / $2)::text, 3, '0'), 'r' || lpad((i % $2)::text, 3, '0'), "
            "'custom' FROM generate_series(0, $3 - 1) i",
            LAG_PREFIX,
            LAG_ROLES_PER_ROOM,
            LAG_TASKS,
        )
        await conn.execute("SELECT setseed(0.42)")
        rows = await conn.fetch(
            f"{BENCH_MARK} INSERT INTO tasks.tasks (chatroom, role, text, status, deadline_at) "
            "SELECT $1 || lpad((i / $2)::text, 3, '0'), 'r' || lpad((i % $2)::text, 3, '0'), "
            "'due within the minute', 'pending', $4::timestamptz + random() * $5 * interval '1 s' "
            "FROM generate_series(0, $3 - 1) i RETURNING id, deadline_at",
            LAG_PREFIX,
            LAG_ROLES_PER_ROOM,
            LAG_TASKS,
            start,
            LAG_WINDOW_S,
        )
    # What a send does after its commit: wake the scheduler (a new earliest deadline).
    await conn.execute("SELECT pg_notify($1, $2)", ROLE_CHANNEL, f"{LAG_PREFIX}000/r000")
    return {str(r["id"]): r["deadline_at"] for r in rows}


async def _statements(conn: asyncpg.Connection) -> tuple[int, int]:
    """(statements others sent to this database since the last reset, asyncpg pool
    check-ins among them: the reset query a pool runs on each released connection)."""
    rows = await conn.fetch(
        "SELECT query, calls FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    theirs = [
        r for r in rows if "pg_stat_statements" not in r["query"] and BENCH_MARK not in r["query"]
    ]
    total = sum(r["calls"] for r in theirs)
    checkins = sum(r["calls"] for r in theirs if POOL_RESET_MARK in r["query"])
    return total, checkins


def _lag_by_time(
    start: datetime,
    samples: list[tuple[datetime, dict[str, float]]],
    lags: list[tuple[datetime, float]],
) -> tuple[list[str], str]:
    """Lags against where the CPU went when their deadlines fell: a line per stretch of
    LAG_STRETCH_S, and the CPU while deadlines lagged more than LAG_SLOW_MS vs the rest."""
    by_deadline = sorted(lags)
    stretches: dict[int, tuple[list[float], list[dict[str, float]]]] = {}
    slow: list[dict[str, float]] = []
    fine: list[dict[str, float]] = []
    lo = start
    i = 0
    for end, pct in samples:
        part = []
        while i < len(by_deadline) and by_deadline[i][0] < end:
            if by_deadline[i][0] >= lo:
                part.append(by_deadline[i][1])
            i += 1
        if part:
            (slow if max(part) > LAG_SLOW_MS else fine).append(pct)
            k = int((lo - start).total_seconds() // LAG_STRETCH_S)
            entry = stretches.setdefault(k, ([], []))
            entry[0].extend(part)
            entry[1].append(pct)
        lo = end

    def mean(pcts: list[dict[str, float]], key: str) -> float:
        return sum(p[key] for p in pcts) / len(pcts) if pcts else float("nan")

    lines = [
        f"{k * LAG_STRETCH_S:.0f}-{(k + 1) * LAG_STRETCH_S:.0f} s: "
        f"p99 {common.percentile(sorted(part), 99):.0f} ms, server {mean(pcts, 'server'):.0f}%, "
        f"others {mean(pcts, 'others'):.0f}%"
        for k, (part, pcts) in sorted(stretches.items())
    ]
    if not slow:
        return lines, (
            f"no half-second stretch had a deadline lagging > {LAG_SLOW_MS:.0f} ms "
            f"({len(fine)} stretches)"
        )
    note = (
        f"while deadlines lagged > {LAG_SLOW_MS:.0f} ms ({len(slow)} of {len(slow) + len(fine)} "
        f"half-second samples): server {mean(slow, 'server'):.0f}%, postgres "
        f"{mean(slow, 'postgres'):.0f}%, others {mean(slow, 'others'):.0f}% of a core; "
        f"otherwise server {mean(fine, 'server'):.0f}%, postgres {mean(fine, 'postgres'):.0f}%, "
        f"others {mean(fine, 'others'):.0f}%"
    )
    return lines, note


async def deadline_lag(ctx: Context) -> dict[str, Any]:
    url = await ctx.new_database()
    server = await ctx.start_server(url, TASK_ENV, "deadline", args=UP)
    conn = await asyncpg.connect(url)
    try:
        start = datetime.now(UTC) + timedelta(seconds=LAG_LEAD_S)
        originals = await _insert_lag_tasks(conn, start)
        if ctx.pg_stat_statements:
            await conn.execute("SELECT pg_stat_statements_reset()")
        m0 = await common.scrape(server.metrics_port)
        meter = common.CpuMeter(ctx, server.proc.pid, {})
        # The measured stretch: the minute the deadlines fall in, and until all are handled.
        await asyncio.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()))
        meter.start()
        # Where the CPU went, every poll (~0.5 s), to set against the lags of the deadlines
        # that fell meanwhile.
        sampler = common.CpuMeter(ctx, server.proc.pid, {})
        sampler.start()
        samples: list[tuple[datetime, dict[str, float]]] = []  # (end, CPU since the last)
        give_up = start + timedelta(seconds=LAG_WINDOW_S + LAG_GRACE_S)
        notified = 0
        while True:
            await asyncio.sleep(0.5)
            notified = await conn.fetchval(COUNT_NOTIFIED, "pending_timeout")
            samples.append((datetime.now(UTC), sampler.stop()))
            sampler.start()
            if notified >= LAG_TASKS or datetime.now(UTC) > give_up:
                break
        cpu_pct = meter.stop()
        handled_at = datetime.now(UTC)
        statements = await _statements(conn) if ctx.pg_stat_statements else None
        m1 = await common.scrape(server.metrics_port)
        rows = await conn.fetch(
            f"{BENCH_MARK} SELECT task_id, min(created_at) AS at, count(*) AS n "
            "FROM tasks.notifications WHERE kind = 'pending_timeout' GROUP BY task_id"
        )
        longest_gap = await conn.fetchval(
            f"{BENCH_MARK} SELECT max(gap) FROM (SELECT created_at - lag(created_at) "
            "OVER (ORDER BY created_at) AS gap FROM tasks.notifications) g"
        )
        other_kinds = await conn.fetch(
            f"{BENCH_MARK} SELECT kind, count(*) AS n FROM tasks.notifications "
            "WHERE kind <> 'pending_timeout' GROUP BY kind"
        )
        states = await conn.fetch(
            f"{BENCH_MARK} SELECT status, attempt, deadline_at > $1 AS rearmed, count(*) AS n "
            "FROM tasks.tasks GROUP BY 1, 2, 3",
            handled_at + timedelta(seconds=60),
        )
    except Exception:
        print(f"server log (tail):\n{common.log_tail(server.log)}")
        raise
    finally:
        await conn.close()
        await ctx.stop_server(server)

    lags = []
    lag_ids = []
    unknown = dupes = 0
    for r in rows:
        deadline = originals.get(str(r["task_id"]))
        if deadline is None:
            unknown += 1
            continue
        lags.append((r["at"] - deadline).total_seconds() * 1000)
        lag_ids.append(str(r["task_id"]))
        dupes += r["n"] > 1
    early = sum(1 for x in lags if x < 0)
    by_stretch, slow_note = _lag_by_time(
        start, samples, [(originals[t], lag) for t, lag in zip(lag_ids, lags, strict=True)]
    )
    state_text = {
        f"{r['status']}/attempt {r['attempt']}/rearmed {r['rearmed']}": r["n"] for r in states
    }
    rearmed_ok = state_text == {"pending/attempt 0/rearmed True": LAG_TASKS}

    def delta(name: str, **labels: str) -> float:
        return common.metric(m1, name, **labels) - common.metric(m0, name, **labels)

    passes = delta("vigil_task_scheduler_pass_seconds_count")
    pass_mean = delta("vigil_task_scheduler_pass_seconds_sum") / passes * 1000 if passes else None
    lag_n = delta("vigil_task_deadline_lag_seconds_count")
    lag_mean = delta("vigil_task_deadline_lag_seconds_sum") / lag_n * 1000 if lag_n else None
    notes = [
        f"{LAG_TASKS} pending tasks on {LAG_TASKS} custom roles ({LAG_ROOMS} chatrooms), nobody "
        f"live; deadlines uniform (seeded random) over {LAG_WINDOW_S:.0f} s starting "
        f"{LAG_LEAD_S:.0f} s after the insert; VIGIL_TASK_PENDING_TIMEOUT_MS "
        f"{TASK_ENV['VIGIL_TASK_PENDING_TIMEOUT_MS']}",
        f"notified {len(lags)}/{LAG_TASKS}; more than one pending_timeout for a task: {dupes}; "
        f"notification before its deadline: {early}; other notifications: "
        f"{ {r['kind']: r['n'] for r in other_kinds} or 'none' }",
        f"tasks afterwards: {state_text}",
        "longest time between two consecutive notifications (a stall would show here): "
        + (f"{longest_gap.total_seconds() * 1000:.0f} ms" if longest_gap else "-"),
        f"server: {passes:.0f} scheduler passes ({len(lags) / max(1, passes):.1f} deadlines "
        f"per pass), mean {pass_mean:.2f} ms; "
        f"its own lag histogram: {lag_n:.0f} observations, mean {lag_mean:.2f} ms"
        if passes and lag_mean is not None
        else "server: no scheduler pass observed in its metrics",
        *common.cpu_notes(cpu_pct),
        f"by {LAG_STRETCH_S:.0f} s of deadlines (lag p99; CPU in % of one core): "
        + "; ".join(by_stretch),
        slow_note,
    ]
    if statements is not None:
        handled = max(1, len(lags))
        notes.append(
            f"pg_stat_statements: {statements[0]} statements from the server in the window, "
            f"{statements[0] / handled:.1f} per handled deadline (BEGIN/COMMIT, the "
            "scheduler's next-deadline reads and asyncpg's pool reset query included); "
            f"pool check-ins {statements[1] / handled:.1f} per handled deadline"
        )
    if unknown:
        notes.append(f"{unknown} notifications for tasks the benchmark did not create")
    return common.result(
        lags,
        LAG_GOAL,
        checks={
            f"all {LAG_TASKS} notified once": len(lags) == LAG_TASKS and dupes == 0,
            "none before its deadline": early == 0,
            "all still pending, attempt 0, deadline re-armed": rearmed_ok,
        },
        notes=notes,
        notified=len(lags),
        server_scheduler_passes=passes,
        server_pass_mean_ms=pass_mean,
        server_lag_mean_ms=lag_mean,
        statements_per_deadline=round(statements[0] / max(1, len(lags)), 2)
        if statements is not None
        else None,
        cpu_pct=cpu_pct,
    )


# -- scheduler_pass_flat ------------------------------------------------------------------

PASS_DUE = 100
PASS_SIZES = (10_000, 1_000_000)
PASS_WARMUP = 3
PASS_REPEATS = 30
PASS_MAX_RATIO = 2.0
PASS_INSERTERS = 2  # connections sharing the bulk insert
PASS_CHUNK = 100_000  # background rows per INSERT statement
# Background rows: every tenth is the pending task of a role of its own with a deadline
# weeks away (in the deadline index, never due); the other nine queue behind it (no
# deadline). Row i belongs to role i / 10.
PASS_BG_ROLES_PER_ROOM = 100
DUE_ROOM = "due"

ADD_ROOMS = (
    f"{BENCH_MARK} INSERT INTO tasks.chatrooms (chatroom) "
    "SELECT 'bg-' || lpad(i::text, 5, '0') FROM generate_series($1::int, $2::int - 1) i "
    "ON CONFLICT DO NOTHING"
)
ADD_ROLES = (
    f"{BENCH_MARK} INSERT INTO tasks.roles (chatroom, role, kind) "
    "SELECT 'bg-' || lpad((j / $3)::text, 5, '0'), 'r' || lpad((j % $3)::text, 3, '0'), "
    "'custom' FROM generate_series($1::int, $2::int - 1) j"
)
ADD_BACKGROUND = (
    f"{BENCH_MARK} INSERT INTO tasks.tasks (chatroom, role, text, status, deadline_at) "
    "SELECT 'bg-' || lpad((i / 10 / $3)::text, 5, '0'), 'r' || lpad((i / 10 % $3)::text, 3, '0'), "
    "'background', CASE WHEN i % 10 = 0 THEN 'pending' ELSE 'queued' END, "
    "CASE WHEN i % 10 = 0 THEN now() + interval '30 days' + i * interval '1 s' END "
    "FROM generate_series($1::int, $2::int - 1) i"
)
RESET_DUE = (
    f"{BENCH_MARK} WITH gone AS (DELETE FROM tasks.notifications WHERE task_id = ANY($1::uuid[])) "
    "UPDATE tasks.tasks SET deadline_at = clock_timestamp() - interval '1 s' "
    "WHERE id = ANY($1::uuid[])"
)


async def _grow(url: str, conn: asyncpg.Connection, lo: int, hi: int) -> float:
    """Background rows lo..hi-1 (and their roles); VACUUM ANALYZE. Seconds taken."""
    t = time.monotonic()
    roles_lo, roles_hi = lo // 10, (hi + 9) // 10
    per = PASS_BG_ROLES_PER_ROOM
    await conn.execute(ADD_ROOMS, roles_lo // per, (roles_hi + per - 1) // per)
    await conn.execute(ADD_ROLES, roles_lo, roles_hi, per)
    chunks = [(a, min(a + PASS_CHUNK, hi)) for a in range(lo, hi, PASS_CHUNK)]
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)

    async def inserter() -> None:
        c = await asyncpg.connect(url)
        try:
            while not queue.empty():
                a, b = queue.get_nowait()
                await c.execute(ADD_BACKGROUND, a, b, per)
        finally:
            await c.close()

    await asyncio.gather(*(inserter() for _ in range(min(PASS_INSERTERS, len(chunks)))))
    # As a real table would be: vacuumed and analyzed (and autovacuum does not start on
    # the fresh rows in the middle of the measurement).
    await conn.execute("VACUUM ANALYZE tasks.tasks")
    return time.monotonic() - t


def _plan_nodes(plan: dict[str, Any]) -> list[str]:
    name = plan["Node Type"]
    if "Index Name" in plan:
        name += f" {plan['Index Name']}"
    if "Relation Name" in plan and "Index Name" not in plan:
        name += f" {plan['Relation Name']}"
    out = [name]
    for child in plan.get("Plans", []):
        out += _plan_nodes(child)
    return out


async def _due_plan(conn: asyncpg.Connection) -> str:
    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + Q["due_tasks"], datetime.now(UTC), 500)
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return " > ".join(_plan_nodes(doc[0]["Plan"]))


@dataclass
class _PassDb:
    """One database of a given size, with the real service over it."""

    size: int
    conn: asyncpg.Connection
    db: Database
    svc: TaskService
    due: list[str]
    setup_s: float
    plan: str
    times: list[float] = field(default_factory=list)

    async def close(self) -> None:
        await self.conn.close()
        await self.db.close()


async def _pass_db(ctx: Context, size: int) -> _PassDb:
    url = await ctx.new_database()
    conn = await asyncpg.connect(url)
    db = await open_database(url, min_size=1, max_size=4)
    try:
        await conn.execute(
            f"{BENCH_MARK} INSERT INTO tasks.chatrooms (chatroom) VALUES ($1)", DUE_ROOM
        )
        await conn.execute(
            f"{BENCH_MARK} INSERT INTO tasks.roles (chatroom, role, kind) "
            "SELECT $1, 'd' || lpad(i::text, 3, '0'), 'custom' FROM generate_series(0, $2 - 1) i",
            DUE_ROOM,
            PASS_DUE,
        )
        due = [
            str(r["id"])
            for r in await conn.fetch(
                f"{BENCH_MARK} INSERT INTO tasks.tasks (chatroom, role, text, status, deadline_at) "
                "SELECT $1, 'd' || lpad(i::text, 3, '0'), 'due', 'pending', "
                "now() - interval '1 s' FROM generate_series(0, $2 - 1) i RETURNING id",
                DUE_ROOM,
                PASS_DUE,
            )
        ]
        setup_s = await _grow(url, conn, 0, size - PASS_DUE)
        count = await conn.fetchval(f"{BENCH_MARK} SELECT count(*) FROM tasks.tasks")
        if count != size:
            raise RuntimeError(f"tasks.tasks has {count} rows, expected {size}")
        # The real service, in this process, without its server: its presence view is
        # marked synced and empty (nobody live), so each due task takes the path a real
        # scheduler takes for a custom role nobody runs: notify, re-arm the deadline.
        svc = TaskService(
            TaskStore(db),
            AgentStore(db),
            AuthStore(db),
            url,
            ClientConfig(),
            Timings(),
            SystemClock(),
            TaskMetrics(CollectorRegistry()),
        )
        svc.presence.synced.set()
        return _PassDb(size, conn, db, svc, due, setup_s, await _due_plan(conn))
    except BaseException:
        await conn.close()
        await db.close()
        raise


async def _one_pass(p: _PassDb) -> float:
    await p.conn.execute(RESET_DUE, p.due)
    t0 = time.perf_counter()
    handled = await p.svc.run_due()
    dt = (time.perf_counter() - t0) * 1000
    if handled != len(p.due):
        raise RuntimeError(f"a pass at {p.size:,} rows handled {handled}, expected {len(p.due)}")
    return dt


async def scheduler_pass_flat(ctx: Context) -> dict[str, Any]:
    dbs: list[_PassDb] = []
    try:
        for size in PASS_SIZES:
            dbs.append(await _pass_db(ctx, size))
        # Passes alternate between the sizes, so that whatever else the machine does
        # weighs on both alike.
        meter = common.CpuMeter(ctx, 0, {})  # no server process (pid 0 counts nothing)
        meter.start()
        for k in range(PASS_WARMUP + PASS_REPEATS):
            for p in dbs:
                dt = await _one_pass(p)
                if k >= PASS_WARMUP:
                    p.times.append(dt)
        cpu = meter.stop()
    finally:
        for p in dbs:
            await p.close()
    per_size = {p.size: p.times for p in dbs}
    setup_s = {p.size: p.setup_s for p in dbs}
    plans = {p.size: p.plan for p in dbs}

    small, big = PASS_SIZES
    med = {s: common.summarize(v)["median_ms"] for s, v in per_size.items()}
    ratio = med[big] / med[small]
    notes = [
        f"{PASS_DUE} due tasks per pass (custom roles, nobody live: notify + re-arm each), "
        f"{PASS_REPEATS} passes per size after {PASS_WARMUP} warm-up, alternating between "
        "the sizes (one database each); TaskService.run_due in this process (bench) against "
        "the benchmark's PostgreSQL",
        *(
            f"{s:,} rows: pass {_ms(v)}; rows added in {setup_s[s]:.1f} s "
            f"(VACUUM ANALYZE included); due-query plan: {plans[s]}"
            for s, v in per_size.items()
        ),
        f"median at {big:,} / median at {small:,} = {ratio:.2f}",
        "background rows: every tenth the pending task of its own role with a deadline weeks "
        "away (in the deadline index), the rest queued behind it",
        *common.cpu_notes({k: v for k, v in cpu.items() if k != "server"}),
    ]
    return common.result(
        per_size[big],
        Goal(),
        checks={
            f"median at {big:,} rows ≤ {PASS_MAX_RATIO:g} x median at {small:,}": ratio
            <= PASS_MAX_RATIO
        },
        notes=notes,
        sizes={str(s): common.summarize(v) for s, v in per_size.items()},
        ratio=ratio,
        due_plans={str(s): p for s, p in plans.items()},
        setup_s={str(s): round(v, 1) for s, v in setup_s.items()},
        cpu_pct=cpu,
    )


# -- tasks_lifecycle_rate ------------------------------------------------------------------

RATE_WORKERS = 32  # concurrent lifecycles, one role each
RATE_WARMUP = 5  # lifecycles per worker before the measured window
RATE_WINDOW_S = 8.0
RATE_CHATROOM = "bench-rate"
RATE_RATIO_GOAL = 0.5  # gRPC lifecycles/s / bare asyncpg's
# The default heartbeat interval and TTL (the workers' sessions are idle otherwise), and a
# pending timeout far beyond any run.
RATE_ENV = {
    "VIGIL_HEARTBEAT_INTERVAL_MS": "30000",
    "VIGIL_HEARTBEAT_TTL_MS": "60000",
    "VIGIL_TASK_PENDING_TIMEOUT_MS": "600000",
}
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


class _Window:
    """The measured window the rate workers share: it opens once every worker is past
    its warm-up, and lasts RATE_WINDOW_S."""

    def __init__(self, workers: int) -> None:
        self.end: float | None = None
        self.warmed = asyncio.Event()
        self._cold = workers

    def warm(self) -> None:
        self._cold -= 1
        if self._cold == 0:
            self.warmed.set()

    @property
    def open(self) -> bool:
        return self.end is not None

    def over(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


Worker = Callable[[Any, str, _Window, list[float]], Awaitable[None]]


@contextlib.asynccontextmanager
async def _participant(client: Client, role: str) -> AsyncIterator[ParticipantSession]:
    """A live participant of the role held for the block (a claim is bound to one)."""
    session = client.session(RATE_CHATROOM, role, AgentKind.CUSTOM)
    holder = asyncio.create_task(session.run())
    joined = asyncio.create_task(session.joined.wait())
    try:
        await asyncio.wait({holder, joined}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not joined.done():
            if holder.done():
                holder.result()  # raises why it could not join
            raise RuntimeError(f"{role}: not joined within 30 s")
        yield session
    finally:
        joined.cancel()
        session.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(holder, 10)


async def _grpc_lifecycles(addr: str, role: str, window: _Window, out: list[float]) -> None:
    """As an agent does it: a client of its own (its own TCP connection) holding a live
    participant of its role; send, claim (AwaitTask), start, complete."""
    config = replace(
        harness.client_config(addr),
        timings=Timings.from_env(RATE_ENV),
        channel_options=OWN_CONNECTION,
    )
    async with Client(config) as client, _participant(client, role) as session:
        stub, md = client.tasks, client.metadata
        conn = session.connection_id
        epoch = session.epoch
        assert epoch is not None
        for done in itertools.count():
            if done == RATE_WARMUP:
                window.warm()
            if window.over():
                return
            t0 = time.perf_counter()
            sent = await stub.SendMessage(
                tpb.SendMessageRequest(chatroom=RATE_CHATROOM, role=role, text="lifecycle"),
                metadata=md,
            )
            call = stub.AwaitTask(
                tpb.AwaitTaskRequest(
                    chatroom=RATE_CHATROOM, role=role, connection_id=conn, epoch=epoch
                ),
                metadata=md,
            )
            reply = await call.read()
            call.cancel()
            if reply is grpc.aio.EOF or reply.task.id != sent.id:
                raise RuntimeError(f"{role}: claimed {reply!r}, sent {sent.id}")
            ref = tpb.TaskRef(id=sent.id, attempt=reply.task.attempt)
            await stub.StartTask(ref, metadata=md)
            final = await stub.CompleteTask(ref, metadata=md)
            if final.status != TaskStatus.COMPLETED.to_pb():
                raise RuntimeError(f"{role}: task ended {final.status}")
            if window.open:
                out.append((time.perf_counter() - t0) * 1000)


SQL_ACTOR = "admin:bench"  # who sent and claimed, as the service records a principal


async def _sql_lifecycles(pool: asyncpg.Pool, role: str, window: _Window, out: list[float]) -> None:
    """The statements the server runs for a lifecycle's status changes, straight: the
    four server-side functions of its fast paths (send_task, claim_task, start_task,
    complete_task), each one statement in its own implicit transaction, with the same
    arguments the service passes (an admin's calls: no token, no scope)."""
    connection_id = str(uuid.uuid4())
    async with pool.acquire() as conn:
        for done in itertools.count():
            if done == RATE_WARMUP:
                window.warm()
            if window.over():
                return
            t0 = time.perf_counter()
            now = datetime.now(UTC)
            sent = await conn.fetch(
                Q["send_task_fast"], RATE_CHATROOM, role, "lifecycle", now,
                now + timedelta(minutes=10), SQL_ACTOR, None,
            )  # fmt: skip
            task_id = sent[0]["id"]
            now = datetime.now(UTC)
            claimed = await conn.fetch(
                Q["claim_task_fast"], RATE_CHATROOM, role, connection_id, 1, now,
                now + timedelta(minutes=2), SQL_ACTOR, None, "claimed",
            )  # fmt: skip
            if not claimed or claimed[0]["id"] != task_id:
                raise RuntimeError(f"{role}: claimed {claimed!r}, sent {task_id}")
            attempt = claimed[0]["attempt"]
            started = await conn.fetch(
                Q["start_task_fast"], task_id, attempt, None, None, SQL_ACTOR, datetime.now(UTC)
            )
            completed = await conn.fetch(
                Q["complete_task_fast"], task_id, attempt, None, None, SQL_ACTOR,
                datetime.now(UTC), None,
            )  # fmt: skip
            if not started or not completed or completed[0]["status"] != "completed":
                raise RuntimeError(f"{role}: start {started!r}, complete {completed!r}")
            if window.open:
                out.append((time.perf_counter() - t0) * 1000)


async def _rate(
    worker: Worker,
    target: Any,
    roles: list[str],
    meter: common.CpuMeter,
    at_start: Callable[[], Awaitable[None]],
) -> tuple[list[float], float, dict[str, float]]:
    """One worker per role; (latencies in the measured window, lifecycles/s, CPU).
    `at_start` runs when the window opens (workers are running meanwhile)."""
    window = _Window(len(roles))
    samples: list[list[float]] = [[] for _ in roles]
    jobs: list[asyncio.Task[None]] = [
        asyncio.ensure_future(worker(target, r, window, samples[k])) for k, r in enumerate(roles)
    ]
    warmed = asyncio.create_task(window.warmed.wait())
    await asyncio.wait([warmed, *jobs], return_when=asyncio.FIRST_COMPLETED)
    if not warmed.done():  # a worker broke during its warm-up
        warmed.cancel()
        await asyncio.gather(*jobs)
    await at_start()
    meter.start()
    t0 = time.monotonic()
    window.end = t0 + RATE_WINDOW_S
    await asyncio.gather(*jobs)
    elapsed = time.monotonic() - t0
    cpu = meter.stop()
    flat = [x for s in samples for x in s]
    return flat, len(flat) / elapsed, cpu


async def _statement_list(conn: asyncpg.Connection) -> list[tuple[str, int]]:
    """(query, calls) others ran in this database since the last reset, most called first."""
    rows = await conn.fetch(
        f"{BENCH_MARK} SELECT query, calls FROM pg_stat_statements "
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    theirs = [
        (str(r["query"]), int(r["calls"]))
        for r in rows
        if "pg_stat_statements" not in r["query"] and BENCH_MARK not in r["query"]
    ]
    return sorted(theirs, key=lambda x: -x[1])


def _top(statements: list[tuple[str, int]], n: int, k: int = 6) -> str:
    return "; ".join(f"{c / n:.2f} x `{' '.join(q.split())[:70]}`" for q, c in statements[:k])


async def tasks_lifecycle_rate(ctx: Context) -> dict[str, Any]:
    url = await ctx.new_database()
    settings = await common.postgres_settings(url)
    roles = [f"w{k:02d}" for k in range(RATE_WORKERS)]
    conn = await asyncpg.connect(url)
    server = await ctx.start_server(url, RATE_ENV, "rate", args=UP)
    m0: dict[str, float] = {}

    async def grpc_start() -> None:
        if ctx.pg_stat_statements:
            await conn.execute("SELECT pg_stat_statements_reset()")
        m0.update(await common.scrape(server.metrics_port))

    async def sql_start() -> None:
        if ctx.pg_stat_statements:
            await conn.execute("SELECT pg_stat_statements_reset()")

    try:
        async with harness.channel(server.addr) as ch:
            await _create_room(tpb_grpc.TasksStub(ch), RATE_CHATROOM, roles)
        meter = common.CpuMeter(ctx, server.proc.pid, {})
        grpc_ms, grpc_rate, grpc_cpu = await _rate(
            _grpc_lifecycles, server.addr, roles, meter, grpc_start
        )
        grpc_stmts = await _statement_list(conn) if ctx.pg_stat_statements else None
        m1 = await common.scrape(server.metrics_port)
    except Exception:
        print(f"server log (tail):\n{common.log_tail(server.log)}")
        await conn.close()
        raise
    finally:
        await ctx.stop_server(server)
    # Straight through asyncpg, on the same database (and settings) with the server gone;
    # each worker keeps its connection (no pool check-in between statements).
    pool = await asyncpg.create_pool(url, min_size=RATE_WORKERS, max_size=RATE_WORKERS)
    assert pool is not None
    try:
        meter = common.CpuMeter(ctx, 0, {})  # no server process (pid 0 counts nothing)
        sql_ms, sql_rate, sql_cpu = await _rate(_sql_lifecycles, pool, roles, meter, sql_start)
        sql_stmts = await _statement_list(conn) if ctx.pg_stat_statements else None
        leftover = await conn.fetchval(
            f"{BENCH_MARK} SELECT count(*) FROM tasks.tasks WHERE status <> 'completed'"
        )
    finally:
        await pool.close()
        await conn.close()
    grpc_n = max(1, len(grpc_ms))
    sql_n = max(1, len(sql_ms))
    ratio = round(grpc_rate / sql_rate, 2) if sql_rate else 0.0
    passes = common.metric(m1, "vigil_task_scheduler_pass_seconds_count") - common.metric(
        m0, "vigil_task_scheduler_pass_seconds_count"
    )
    per_grpc = sum(c for _q, c in grpc_stmts) / grpc_n if grpc_stmts is not None else None
    per_sql = sum(c for _q, c in sql_stmts) / sql_n if sql_stmts is not None else None
    notes = [
        f"{RATE_WORKERS} concurrent lifecycles (one role each) for {RATE_WINDOW_S:.0f} s each "
        "way, clients in the benchmark process; through gRPC each worker is a client of its "
        "own (its own TCP connection) holding a live participant of its role (default "
        "heartbeat interval), as a claim is bound to one; one lifecycle = SendMessage, "
        "AwaitTask (claim), StartTask, CompleteTask, as the admin, on one `vigil up` (auth, "
        "plaintext); the latency columns are one gRPC lifecycle",
        f"straight through asyncpg: the same four server-side functions the server's fast "
        f"paths call (send_task, claim_task, start_task, complete_task), each worker on a "
        f"connection of its own; one lifecycle {_ms(sql_ms)}",
        f"gRPC {grpc_rate:.0f} lifecycles/s, asyncpg {sql_rate:.0f} lifecycles/s: ratio "
        f"{ratio:.2f} (goal ≥ {RATE_RATIO_GOAL:g})",
        f"PostgreSQL for both: {common.describe_postgres(settings)}",
        f"server scheduler passes per gRPC lifecycle: {passes / grpc_n:.2f}",
        f"CPU via gRPC, % of one core: server {grpc_cpu['server']:.0f}, postgres "
        f"{grpc_cpu['postgres']:.0f}, bench (clients) {grpc_cpu['bench']:.0f}, else "
        f"{grpc_cpu['others']:.0f}",
        f"CPU via asyncpg: postgres {sql_cpu['postgres']:.0f}, bench {sql_cpu['bench']:.0f}, "
        f"else {sql_cpu['others']:.0f}",
    ]
    if grpc_stmts is not None and sql_stmts is not None:
        notes += [
            f"statements per lifecycle (pg_stat_statements, top-level): via gRPC "
            f"{per_grpc:.1f}, straight {per_sql:.1f}",
            f"via gRPC, most called per lifecycle: {_top(grpc_stmts, grpc_n)}",
        ]
    if max(grpc_cpu["others"], sql_cpu["others"]) > common.NOISY_PCT:
        notes.append("NOISY: other work on the machine during the measurement")
    return common.result(
        grpc_ms,
        Goal(),
        checks={
            f"gRPC / asyncpg lifecycles/s ≥ {RATE_RATIO_GOAL:g}": ratio >= RATE_RATIO_GOAL,
            "every task completed": leftover == 0,
        },
        notes=notes,
        workers=RATE_WORKERS,
        grpc_lifecycles_per_s=round(grpc_rate, 1),
        sql_lifecycles_per_s=round(sql_rate, 1),
        ratio=ratio,
        goal_ratio=RATE_RATIO_GOAL,
        sql=common.summarize(sql_ms),
        scheduler_passes_per_lifecycle=round(passes / grpc_n, 2),
        statements_per_lifecycle_grpc=round(per_grpc, 1) if per_grpc is not None else None,
        statements_per_lifecycle_sql=round(per_sql, 1) if per_sql is not None else None,
        postgres=settings,
        cpu_pct_grpc=grpc_cpu,
        cpu_pct_sql=sql_cpu,
    )


# -- the group --------------------------------------------------------------------------

BENCHMARKS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "send_to_receipt": send_to_receipt,
    "deadline_lag": deadline_lag,
    "scheduler_pass_flat": scheduler_pass_flat,
    "tasks_lifecycle_rate": tasks_lifecycle_rate,
}


async def run(ctx: Context) -> dict[str, Any]:
    return await common.run_group("tasks", BENCHMARKS, ctx)
