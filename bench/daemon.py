"""Machine-daemon benchmarks.

kill_to_recorded  SIGKILL the agent of a remote role: a `vigil.testing.agent sleep`
                  process that a real `vigil daemon start` runs for a real `vigil up`.
                  Time from the kill until the server records the exit
                  (`tasks.agent_exits.recorded_at`, the server's timestamp) with
                  signal 9 and classification signal; the agent's pid must be cleared
                  and its status updated by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench import common
from bench.common import Context, Goal
from vigil import testing as harness
from vigil.core.vocab import AgentStatus, ExitClassification
from vigil.v1 import common_pb2
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

# -- kill_to_recorded -------------------------------------------------------------------

KILL_ITERATIONS = 50
# Agents are started in rounds (one per role) and killed one by one once all of them are
# idle, so no agent's start-up (a CPU-heavy Python import on a 2-core machine) runs during
# a kill; each round restarts every role with Machines.StartAgent.
KILL_ROLES = 10
KILL_SETTLE_S = 0.3  # after the whole round is running and idle
KILL_SPACING_S = 0.05  # between two kills
POLL_S = 0.001  # how often the exits table is read while waiting for a kill's row
KILL_GOAL = Goal(median_ms=20, p99_ms=100)
KILL_CHATROOM = "bench-daemon"
MACHINE = "m1"
AGENT_MODULE = "vigil.testing.agent"
HOUR_MS = "3600000"
# This measures reporting, not restarting: no automatic restart within the run (the
# benchmark restarts the agents itself), and no circuit opening after 3 exits of a role.
# Heartbeats every second with a TTL far away, for the daemon's own presence.
KILL_ENV = {
    "VIGIL_HEARTBEAT_INTERVAL_MS": "1000",
    "VIGIL_HEARTBEAT_TTL_MS": "5000",
    "VIGIL_RESTART_BACKOFF_BASE_MS": HOUR_MS,
    "VIGIL_RESTART_BACKOFF_CAP_MS": HOUR_MS,
    "VIGIL_CIRCUIT_EXITS": "1000",
}
EXIT_SQL = (
    "SELECT id, pid, signal, exit_code, classification, exited_at, recorded_at "
    "FROM tasks.agent_exits WHERE id > $1 AND role = $2 AND pid = $3"
)


def _roles() -> list[str]:
    return [f"r{i:02d}" for i in range(KILL_ROLES)]


def _write_credential(path: Path, machine_id: str, credential: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"machine_id": machine_id, "credential": credential}, f)


def _is_agent(pid: int, addr: str | None = None) -> bool:
    """The pid is (still) one of our worker processes, not a reused pid; with `addr`, one
    started for that server (read from its environment)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if addr else []
    except (OSError, IndexError):
        return False
    if state == "Z" or AGENT_MODULE.encode() not in cmdline:
        return False
    return addr is None or (
        f"VIGIL_ADDR={addr}".encode() in env and f"VIGIL_CHATROOM={KILL_CHATROOM}".encode() in env
    )


def _kill_leftovers(addr: str) -> list[int]:
    """SIGKILL any agent of this run the daemon left behind (they run in sessions of their
    own, so nothing else ends them); the pids that were still there."""
    left = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]
    left = [pid for pid in left if _is_agent(pid, addr)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


async def _agents(stub: mpb_grpc.MachinesStub) -> dict[str, mpb.Agent]:
    reply = await stub.ListAgents(mpb.ListAgentsRequest(chatroom=KILL_CHATROOM))
    return {a.role: a for a in reply.agents}


async def _start_round(
    stub: mpb_grpc.MachinesStub,
    daemon: subprocess.Popen[bytes],
    daemon_log: Path,
    roles: list[str],
    old_pids: set[int],
) -> dict[str, int]:
    """StartAgent for every role; role -> pid once all of them run and are idle."""
    for role in roles:
        await stub.StartAgent(mpb.AgentRef(chatroom=KILL_CHATROOM, role=role))
    deadline = time.monotonic() + 60
    while True:
        agents = await _agents(stub)
        pids = {
            r: int(agents[r].pid)
            for r in roles
            if (
                agents[r].status == AgentStatus.RUNNING.to_pb()
                and agents[r].pid
                and agents[r].pid not in old_pids
            )
        }
        if len(pids) == len(roles):
            break
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited {daemon.returncode}:\n{common.log_tail(daemon_log)}")
        if time.monotonic() > deadline:
            state = {r: (AgentStatus.from_pb(a.status).value, a.pid) for r, a in agents.items()}
            raise RuntimeError(
                f"agents not running within 60 s: {state}\n{common.log_tail(daemon_log)}"
            )
        await asyncio.sleep(0.02)
    await _wait_idle([*pids.values(), daemon.pid])
    await asyncio.sleep(KILL_SETTLE_S)
    return pids


async def _wait_idle(pids: list[int], window_s: float = 0.1, timeout: float = 30) -> None:
    """Until none of the processes used CPU (to the clock tick) during a whole window:
    the agents are asleep in time.sleep, the daemon has nothing left to do."""
    deadline = time.monotonic() + timeout
    before = [common.cpu_of([p]) for p in pids]
    while True:
        await asyncio.sleep(window_s)
        after = [common.cpu_of([p]) for p in pids]
        if after == before:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} never went idle")
        before = after


async def _kill_and_observe(
    conn: asyncpg.Connection,
    stub: mpb_grpc.MachinesStub,
    role: str,
    pid: int,
    last_id: int,
) -> tuple[asyncpg.Record, float, float, mpb.Agent]:
    """SIGKILL the agent; (its exit row, kill wall time, wall time the row was seen,
    the agent as ListAgents shows it right after)."""
    if not _is_agent(pid):
        raise RuntimeError(f"{role}: pid {pid} is not a running agent")
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        row = await conn.fetchrow(EXIT_SQL, last_id, role, pid)
        if row is not None:
            t_seen = time.time()
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{role}: no exit recorded for pid {pid} 15 s after SIGKILL")
        await asyncio.sleep(POLL_S)
    # The exit row and the agent's new state are written in one transaction: the pid is
    # cleared by the time the row is visible.
    after = (await _agents(stub))[role]
    return row, t_kill, t_seen, after


def _histogram(
    m0: dict[str, float], m1: dict[str, float], name: str
) -> tuple[float, float, dict[float, float]]:
    """(count, sum, {upper bound: cumulative count}) of a histogram between two scrapes."""

    def delta(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    buckets: dict[float, float] = {}
    prefix = f"{name}_bucket{{le="
    for key in m1:
        if key.startswith(prefix):
            buckets[float(key[len(prefix) : -1])] = delta(key)
    return delta(f"{name}_count"), delta(f"{name}_sum"), dict(sorted(buckets.items()))


def _bucket_bound(buckets: dict[float, float], count: float, q: float) -> float | None:
    """The upper bound of the bucket holding the q-th percentile (seconds)."""
    for bound, cumulative in buckets.items():
        if cumulative >= count * q / 100:
            return bound
    return None


def _ms_summary(values: list[float]) -> str:
    s = common.summarize(values)
    if not s["n"]:
        return "none"
    return "median {median_ms} / p90 {p90_ms} / p99 {p99_ms} / max {max_ms} ms".format(**s)


async def kill_to_recorded(ctx: Context) -> dict[str, Any]:
    url = await ctx.new_database()
    server = await ctx.start_server(url, KILL_ENV, "daemon", args=("up",))
    roles = _roles()
    state = ctx.tmp / f"daemon-{MACHINE}"
    cred_file = ctx.tmp / f"{MACHINE}.credential"
    daemon_log = ctx.tmp / f"daemon-{MACHINE}.log"
    daemon: subprocess.Popen[bytes] | None = None
    conn: asyncpg.Connection | None = None
    ch = harness.channel(server.addr)
    seen_pids: set[int] = set()
    latencies: list[float] = []  # kill -> recorded_at
    visible: list[float] = []  # kill -> row seen by a polling client (after commit)
    detected: list[float] = []  # kill -> exited_at (the daemon's timestamp)
    reported: list[float] = []  # exited_at -> recorded_at
    bad_exits: list[str] = []  # a recorded exit that is not signal 9 / signal
    bad_agents: list[str] = []  # an agent whose pid or status was not updated with it
    signals: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    cpu_windows: list[tuple[float, dict[str, float]]] = []
    leftovers: list[int] = []
    started = time.monotonic()
    try:
        stub = mpb_grpc.MachinesStub(ch)
        reply = await stub.RegisterMachine(
            mpb.RegisterMachineRequest(machine_id=MACHINE, hostname="bench")
        )
        _write_credential(cred_file, MACHINE, reply.credential)
        await tpb_grpc.TasksStub(ch).CreateChatroom(
            tpb.CreateChatroomRequest(
                name=KILL_CHATROOM,
                roles=[
                    tpb.Role(
                        role=r,
                        kind=common_pb2.AGENT_KIND_REMOTE,
                        machine=MACHINE,
                        harness="sleep",  # vigil.testing.agent sleep: no Vigil at all
                    )
                    for r in roles
                ],
            )
        )
        daemon = ctx.spawn(
            harness.vigil_cmd(
                "daemon",
                "start",
                "--machine-id", MACHINE,
                "--credential-file", str(cred_file),
                "--state-dir", str(state),
                "--harness-file", str(harness.write_harness_file(ctx.tmp / "m.harnesses.toml")),
            ),
            harness.child_env({"VIGIL_ADDR": server.addr, **KILL_ENV}),
            daemon_log.stem,
        )  # fmt: skip
        conn = await asyncpg.connect(url)
        last_id = 0
        m0 = await common.scrape(server.metrics_port)
        while len(latencies) < KILL_ITERATIONS:
            batch = roles[: min(KILL_ROLES, KILL_ITERATIONS - len(latencies))]
            pids = await _start_round(stub, daemon, daemon_log, batch, seen_pids)
            seen_pids.update(pids.values())
            meter = common.CpuMeter(ctx, server.proc.pid, {"daemon": [daemon.pid]})
            t_round = time.monotonic()
            meter.start()
            for role in batch:
                pid = pids[role]
                row, t_kill, t_seen, after = await _kill_and_observe(conn, stub, role, pid, last_id)
                last_id = row["id"]
                latencies.append((row["recorded_at"].timestamp() - t_kill) * 1000)
                visible.append((t_seen - t_kill) * 1000)
                detected.append((row["exited_at"].timestamp() - t_kill) * 1000)
                reported.append((row["recorded_at"] - row["exited_at"]).total_seconds() * 1000)
                signals[str(row["signal"])] += 1
                classes[str(row["classification"])] += 1
                statuses[AgentStatus.from_pb(after.status).value] += 1
                if row["signal"] != 9 or row["classification"] != "signal":
                    bad_exits.append(
                        f"{role} pid {pid}: recorded signal {row['signal']}, "
                        f"classification {row['classification']}"
                    )
                if (
                    after.pid != 0
                    or after.status != AgentStatus.BACKOFF.to_pb()
                    or after.last_exit_signal != 9
                    or after.last_exit_classification != ExitClassification.SIGNAL.to_pb()
                ):
                    bad_agents.append(
                        f"{role} pid {pid}: ListAgents right after shows pid {after.pid}, "
                        f"status {after.status}, last exit signal {after.last_exit_signal} "
                        f"({after.last_exit_classification})"
                    )
                await asyncio.sleep(KILL_SPACING_S)
            cpu_windows.append((time.monotonic() - t_round, meter.stop()))
        m1 = await common.scrape(server.metrics_port)
        elapsed = time.monotonic() - started
    except Exception:
        print(f"server log (tail):\n{common.log_tail(server.log)}")
        print(f"daemon log (tail):\n{common.log_tail(daemon_log)}")
        raise
    finally:
        if conn is not None:
            await conn.close()
        await ch.close()
        if daemon is not None and daemon.poll() is None:
            # The daemon stops its agents (SIGTERM, intentional) when it is stopped.
            daemon.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(daemon.wait, 15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                await asyncio.to_thread(daemon.wait, 5)
        leftovers = _kill_leftovers(server.addr)
        ctx.reaper.forget_finished()
        await ctx.stop_server(server)

    total = sum(d for d, _ in cpu_windows)
    cpu_pct = {
        k: round(sum(d * pct[k] for d, pct in cpu_windows) / total, 1) for k in cpu_windows[0][1]
    }
    count, total_s, buckets = _histogram(m0, m1, "vigil_exit_report_latency_seconds")
    notes = [
        f"{len(latencies)} SIGKILLs over {KILL_ROLES} roles in {elapsed:.1f} s "
        f"(agents restarted with StartAgent in rounds, killed once idle)",
        f"recorded signals {dict(signals)}, classifications {dict(classes)}; "
        f"agent status right after: {dict(statuses)}",
        f"kill -> exited_at (the daemon noticed the exit): {_ms_summary(detected)}",
        f"exited_at -> recorded_at (outbox write + fsync, ReportExit, server up to the "
        f"INSERT): {_ms_summary(reported)}",
        f"kill -> row seen committed by a client polling every {POLL_S * 1000:g} ms: "
        f"{_ms_summary(visible)}",
    ]
    server_mean_ms = None
    if count:
        server_mean_ms = total_s / count * 1000
        p50 = _bucket_bound(buckets, count, 50)
        p99 = _bucket_bound(buckets, count, 99)
        notes.append(
            f"server vigil_exit_report_latency_seconds (exit -> report handled): n {count:.0f}, "
            f"mean {server_mean_ms:.2f} ms, median ≤ {p50 and p50 * 1000:g} ms, "
            f"p99 ≤ {p99 and p99 * 1000:g} ms (bucket bounds)"
        )
    notes += common.cpu_notes(cpu_pct)
    if leftovers:
        notes.append(f"SUSPICIOUS: agents {leftovers} outlived the daemon; killed")
    notes += bad_exits[:5] + bad_agents[:5]
    return common.result(
        latencies,
        KILL_GOAL,
        checks={
            "signal 9, classification signal": not bad_exits,
            "pid cleared, status backoff": not bad_agents,
            "no agent outlives the daemon": not leftovers,
        },
        notes=notes,
        detected=common.summarize(detected),
        reported=common.summarize(reported),
        visible=common.summarize(visible),
        server_exit_report_mean_ms=server_mean_ms,
        server_exit_report_count=count,
        cpu_pct=cpu_pct,
        elapsed_s=round(elapsed, 1),
        samples_ms=[round(x, 2) for x in latencies],  # in kill order
    )


# -- the group --------------------------------------------------------------------------

BENCHMARKS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "kill_to_recorded": kill_to_recorded,
}


async def run(ctx: Context) -> dict[str, Any]:
    return await common.run_group("daemon", BENCHMARKS, ctx)
