"""The chaos soak: a real Vigil topology on this machine, seeded faults, and the
independent checker over what Vigil showed.

    python -m chaos --seed 7 --duration 60s [--remote-roles 10] [--out chaos/results]

Topology: one embedded PostgreSQL, two `vigil up` replicas on it serving TLS (clients
get both addresses, VIGIL_ADDR=A,B), two machines' daemons (each its own state dir)
running the bundled example agent for the remote roles, custom roles driven by scripted
one-shot `wait-for-task` loops (chaos/custom_agent.py), senders at a steady rate plus
bursts. Machine m2's daemon (so its agents) and the last custom role's driver run in a
network namespace of the soak's own (chaos/netns.py), reaching the replicas over a veth
pair: the partitions and the slow network act on that link.

The fault schedule is drawn from `--seed` alone (printed; the same seed gives the same
schedule, listed in the report). Faults overlap; each heals itself. After `--duration`
the faults stop, everything is healed, the tasks drain, and the collector reads the
final state; the checker (chaos/checker.py) then decides. Exit status: 0 with no
violation, 1 with any (the first violating events printed), 2 when the run itself broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chaos import checker
from chaos.collect import EventLog, collect_final, sample, sampler, watch_presence
from chaos.netns import SLOW_QUEUE, SLOW_RATE, Netns, NetnsError
from vigil import testing as harness
from vigil.client import Client, RPCError, TlsConfig
from vigil.core.auth.principal import new_token
from vigil.core.embedded import EmbeddedPostgres
from vigil.core.vocab import TaskStatus, TokenKind
from vigil.v1 import common_pb2
from vigil.v1 import tasks_pb2 as tpb

CHATROOM = "chaos"
MACHINES = ("m1", "m2")
CUT_MACHINE = "m2"  # its daemon and agents run in the soak's network namespace
# 5 s: keepalive 1.67 s + 0.83 s. At 2 s (a 333 ms ping timeout) a 25-minute soak was
# clean until a neighbour's 10,000-connection benchmark starved this 2-core machine for
# a minute (chaos/results/30.md): too short a timeout for a machine shared with others.
TTL_S = 5.0
# HTTP/2 keepalive derived from the TTL (vigil/core/timings.py): a ping every TTL/3,
# answered within TTL/6. A process stopped for longer than the timeout may miss a ping
# and be dropped (keepalive cannot tell a frozen process from a dead link); a shorter
# stop must be survived.
KEEPALIVE_TIMEOUT_S = TTL_S / 6
GRACE_S = TTL_S  # after a fault ends, how long its effects are excused
# Fast timings so that minutes of soak cover many recoveries, restarts and deadlines.
ENV = {
    **harness.FAST_ENV,
    "VIGIL_HEARTBEAT_TTL_MS": str(int(TTL_S * 1000)),
    "VIGIL_HEARTBEAT_INTERVAL_MS": str(int(TTL_S * 1000 / 4)),
    "VIGIL_TASK_PENDING_TIMEOUT_MS": "8000",
    "VIGIL_TASK_ACK_TIMEOUT_MS": "8000",
    "VIGIL_COMMAND_DEADLINE_MS": "4000",
    "VIGIL_RESTART_BACKOFF_BASE_MS": "200",
    "VIGIL_RESTART_BACKOFF_CAP_MS": "2000",
    "VIGIL_CIRCUIT_EXITS": "6",
    "VIGIL_CIRCUIT_WINDOW_MS": "20000",
    "VIGIL_CIRCUIT_COOLDOWN_MS": "3000",
    "VIGIL_AGENT_MIN_UPTIME_MS": "1000",
    "VIGIL_EXAMPLE_WORK_SECONDS": "0.15",
    "VIGIL_LOG_LEVEL": "WARNING",
}
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)

# Fault kinds and their weights in the default mix.
FAULTS = {
    "agent_kill": 5,
    "agent_pause_short": 2,
    "agent_pause_long": 2,
    "waiter_kill": 2,
    "waiter_pause_long": 1,
    "daemon_kill": 2,
    "replica_restart": 1,
    "replica_kill": 1,
    "pg_restart": 1,
    "operator_stop": 2,
    "burst": 1,
    "partition": 2,
    "slow_network": 1,
}


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the start
    fault: str
    target: str  # a role, a machine or a replica index
    hold: float  # how long the fault lasts (s)
    busy: bool = False  # agent kills: wait for the agent to be mid-task


def plan(seed: int, duration: float, remote: list[str], custom: list[str]) -> list[Planned]:
    """The fault schedule: a function of the seed and the topology only."""
    rng = random.Random(seed)
    kinds, weights = zip(*FAULTS.items(), strict=True)
    mean_gap = 2.5
    out: list[Planned] = []
    t = 3.0
    while True:
        t += rng.expovariate(1 / mean_gap)
        if t >= duration:
            return out
        kind = rng.choices(kinds, weights)[0]
        if kind.startswith("waiter"):
            target, hold = rng.choice(custom), (TTL_S * 2.5 if "pause" in kind else 0.0)
        elif kind.startswith("agent") or kind in ("operator_stop", "burst"):
            target = rng.choice(remote)
            hold = {
                "agent_pause_short": KEEPALIVE_TIMEOUT_S * 0.5,
                "agent_pause_long": TTL_S * 2.5,
                "operator_stop": rng.uniform(2, 5),
            }.get(kind, 0.0)
        elif kind == "daemon_kill":
            target, hold = rng.choice(MACHINES), rng.uniform(0.5, 3)
        elif kind.startswith("replica"):
            target, hold = str(rng.randrange(2)), rng.uniform(0.2, 2)
        elif kind == "partition":  # from one replica, or (1 in 4) from both
            target, hold = rng.choice(("0", "1", "0", "1", "both")), rng.uniform(0.5, 6)
        elif kind == "slow_network":
            target, hold = "netns", rng.uniform(3, 10)
        else:  # pg_restart
            target, hold = "pg", rng.uniform(1, 3)
        out.append(Planned(round(t, 3), kind, target, round(hold, 3), rng.random() < 0.5))


def schedule_digest(schedule: list[Planned]) -> str:
    text = json.dumps([p.__dict__ for p in schedule], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m)")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


@dataclass
class Replica:
    index: int
    port: int
    env: dict[str, str]
    tmp: Path
    proc: harness.ServerProcess | None = None
    incarnation: int = 0

    def start(self, patience: float = 120) -> None:
        """Start it; while PostgreSQL is down (another fault) it refuses: try again."""
        deadline = time.monotonic() + patience
        while True:
            self.incarnation += 1
            log = self.tmp / f"replica-{self.index}-{self.incarnation}.log"
            try:
                self.proc = harness.start_server_process(["up"], self.env, log)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None


@dataclass
class Soak:
    seed: int
    duration: float
    tmp: Path
    out_dir: Path
    remote_roles: int = 10
    custom_roles: int = 3
    rate: float = 3.0  # tasks/s, steady
    drain_s: float = 120.0
    verbose: bool = True
    log: EventLog = field(init=False)
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"[chaos {time.time() - self.t0:7.2f}s] {text}", flush=True)

    # -- topology -----------------------------------------------------------------

    async def setup(self) -> None:
        self.t0 = time.time()
        self.remote = [f"r{i}" for i in range(self.remote_roles)]
        self.custom = [f"c{i}" for i in range(self.custom_roles)]
        self.cut_custom = self.custom[-1]  # its driver runs in the network namespace
        self.role_machine = {r: MACHINES[i % len(MACHINES)] for i, r in enumerate(self.remote)}
        self.log = EventLog(self.tmp / "events.jsonl")
        self.log.add("clock", proc_start_offset=proc_start_offset())
        self.pg = EmbeddedPostgres(self.tmp / "pg")
        self.url = await asyncio.to_thread(self.pg.start)
        await harness.not_durable(self.url)
        self.admin = new_token()[1]
        # The replicas listen on the host's end of the namespace's veth pair: not loopback,
        # so over TLS (certificates from `vigil tls dev-ca` for those addresses).
        self.net = await asyncio.to_thread(Netns(replicas=2).create)
        certs = self.tmp / "certs"
        hosts = [self.net.replica_host(i) for i in range(2)]
        await asyncio.to_thread(
            subprocess.run,
            harness.vigil_cmd(
                "tls", "dev-ca", "--out", str(certs), *(a for h in hosts for a in ("--host", h))
            ),
            env=harness.child_env(),
            check=True,
            capture_output=True,
        )
        tls_env = {"VIGIL_TLS_CA": str(certs / "ca.pem")}
        env = {
            "DATABASE_URL": self.url,
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            "VIGIL_BOOTSTRAP_TOKEN": self.admin,
            "VIGIL_SERVER_TLS_CERT": str(certs / "server.pem"),
            "VIGIL_SERVER_TLS_KEY": str(certs / "server.key"),
            **ENV,
        }
        self.replicas = []
        for i, host in enumerate(hosts):
            port = harness.free_port()
            renv = harness.child_env({**env, "VIGIL_ADDR": f"{host}:{port}"})
            self.replicas.append(Replica(i, port, renv, self.tmp))
        for rep in self.replicas:  # one after the other: the first migrates
            await asyncio.to_thread(rep.start)
        self.addrs = ",".join(f"{h}:{r.port}" for h, r in zip(hosts, self.replicas, strict=True))
        config = replace(
            harness.client_config(self.addrs, self.admin),
            channel_options=OWN_CONNECTION,
            tls=TlsConfig(ca_file=certs / "ca.pem"),
        )
        self.client = Client(config)
        self.watcher_client = Client(config)
        self.sender = Client(config)
        await self.client.wait_ready(30)
        self.stop_watch = asyncio.Event()
        self.bg = [
            asyncio.create_task(watch_presence(self.watcher_client, self.log, self.stop_watch)),
        ]
        self.daemons: dict[str, harness.MachineDaemon] = {}
        for m in MACHINES:
            reply = await self.client.register_machine(m, "chaos")
            d = harness.MachineDaemon(
                self.addrs,
                m,
                reply.credential,
                self.tmp,
                env={**ENV, **tls_env},
                prefix=tuple(self.net.exec_prefix()) if m == CUT_MACHINE else (),
            )
            self.daemons[m] = d.start()
        roles = [
            tpb.Role(
                role=r,
                kind=common_pb2.AGENT_KIND_REMOTE,
                machine=self.role_machine[r],
                harness="example",
            )
            for r in self.remote
        ] + [tpb.Role(role=r, kind=common_pb2.AGENT_KIND_CUSTOM) for r in self.custom]
        await self.client.create_chatroom(CHATROOM, roles)
        self.drivers: dict[str, subprocess.Popen[bytes]] = {}
        for r in self.custom:
            token = await self.client.create_token(
                TokenKind.CHATROOM, f"chaos {r}", chatroom=CHATROOM, role=r
            )
            denv = harness.child_env(
                {"VIGIL_ADDR": self.addrs, "VIGIL_TOKEN": token.secret, **ENV, **tls_env}
            )
            self.drivers[r] = self._spawn_driver(r, denv, inside=r == self.cut_custom)
        for r in self.remote:
            await self.client.start_agent(CHATROOM, r)
        self.agents: dict[str, dict[str, Any]] = {}
        self.sent: dict[str, str] = {}  # task id -> role
        self.paused: set[int] = set()
        self.locks: dict[str, asyncio.Lock] = {}
        self.active: dict[object, float] = {}  # faults going on -> when they began
        self.live_violations: list[dict[str, Any]] = []
        self.say(
            f"topology: PostgreSQL, 2 replicas ({self.addrs}), daemons {list(MACHINES)}, "
            f"{len(self.remote)} remote roles (example agent), {len(self.custom)} custom roles"
        )

    def _spawn_driver(
        self, role: str, env: dict[str, str], inside: bool
    ) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"driver-{role}.log").open("ab")
        proc = subprocess.Popen(
            [
                *(self.net.exec_prefix() if inside else []),
                sys.executable,
                "-m",
                "chaos.custom_agent",
                "--chatroom",
                CHATROOM,
                "--role",
                role,
                "--pid-file",
                str(self.tmp / f"waiter-{role}.pid"),
                "--ops",
                str(self.tmp / f"ops-{role}.jsonl"),
                "--seed",
                str(self.seed),
            ],
            env={**env, "PYTHONPATH": f"{harness.ROOT}{os.pathsep}{Path.cwd()}"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return harness._track(proc)

    # -- load -------------------------------------------------------------------------

    async def until_accepted(self, call: Callable[[], Awaitable[object]], what: str) -> None:
        """An operator's call, repeated while Vigil answers a retryable status (60 s)."""
        for _ in range(600):
            try:
                await call()
                return
            except RPCError as exc:
                if not exc.retryable:
                    raise
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the operator's {what} was not accepted within 60 s")

    async def send(self, role: str, text: str) -> None:
        """One logical send, repeated with its request id while Vigil is away: it must
        make one task however many attempts reach the server (the checker's 7)."""
        request_id = str(uuid.uuid4())
        for _ in range(300):
            try:
                task = await self.sender.send(CHATROOM, role, text, request_id=request_id)
            except RPCError as exc:
                if exc.retryable:
                    await asyncio.sleep(0.1)
                    continue
                self.errors.append(f"send to {role}: {exc}")
                return
            self.sent[task.id] = role
            self.log.add(
                "send",
                task=task.id,
                chatroom=CHATROOM,
                role=role,
                status=TaskStatus.from_pb(task.status).value,
                attempt=task.attempt,
            )
            self.counts["tasks_sent"] += 1
            return
        self.errors.append(f"send to {role}: unavailable for 30 s")

    async def senders(self, until: float) -> None:
        rng = random.Random(f"{self.seed}/send")
        pending: set[asyncio.Task[None]] = set()
        n = 0
        while time.time() < until:
            role = rng.choice(self.custom) if rng.random() < 0.08 else rng.choice(self.remote)
            n += 1
            t = asyncio.create_task(self.send(role, f"steady {n}"))
            pending.add(t)
            t.add_done_callback(pending.discard)
            await asyncio.sleep(rng.expovariate(self.rate))
        if pending:
            await asyncio.gather(*pending)

    # -- faults -----------------------------------------------------------------------

    def fault(self, kind: str, t: float, end: float | None = None, **kw: Any) -> None:
        self.counts[f"fault:{kind}"] += 1
        self.log.add("fault", t, fault=kind, end=end if end is not None else t, **kw)

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    async def agent_pid(self, role: str, busy: bool) -> int | None:
        """The running agent process of a remote role (from `ListAgents`), optionally
        waiting (≤ 3 s) for it to be mid-task; checked to be the example agent."""
        deadline = time.time() + (3 if busy else 0)
        unavailable_until = time.time() + 10
        while True:
            try:
                agents = {a.role: a for a in await self.client.list_agents(CHATROOM)}
                a = agents.get(role)
                pid = int(a.pid) if a is not None and a.pid else 0
                if busy and pid and time.time() < deadline:
                    in_progress = await self.client.list_tasks(CHATROOM, TaskStatus.IN_PROGRESS)
                    if not any(t.role == role for t in in_progress):
                        await asyncio.sleep(0.1)
                        continue
            except RPCError as exc:
                if exc.retryable and time.time() < unavailable_until:
                    await asyncio.sleep(0.2)  # a replica or the database is down: wait
                    continue
                raise
            break
        return pid if pid and _runs(pid, b"vigil.example_agent") else None

    def waiter_pid(self, role: str) -> int | None:
        try:
            pid = int((self.tmp / f"waiter-{role}.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _runs(pid, b"wait-for-task") else None

    async def inject(self, p: Planned) -> None:
        key = object()
        self.active[key] = time.time()  # logged when it ends: the live check waits for it
        try:
            await self._inject(p)
        except RPCError as exc:
            self.say(f"fault {p.fault} {p.target}: {exc} (skipped)")
            self.counts[f"skipped:{p.fault}"] += 1
        except Exception as exc:  # the run itself broke (exit 2), not Vigil
            self.errors.append(f"fault {p.fault} {p.target} at {p.at}s: {exc!r}"[:2000])
            self.say(self.errors[-1])
        finally:
            del self.active[key]

    async def live_checks(self, every: float = 30.0, settle: float = 10.0) -> None:
        """The checker during the run (`checker.LIVE_CHECKS`), every `every` seconds on
        the records older than `settle` seconds and than any fault still going on (a
        fault is logged when it ends); each violation printed when first seen."""
        seen: set[str] = set()
        while True:
            await asyncio.sleep(every)
            cut = min([time.time() - settle, *(t - 1.0 for t in self.active.values())])
            snapshot = [r for r in self.log.records if r["t"] < cut]
            snapshot += [self.run_record(cut), *self.role_records()]
            found = await asyncio.to_thread(checker.check, snapshot, final=False, live=True)
            self.counts["live_checks"] += 1
            for v in found:
                if v.message not in seen:
                    seen.add(v.message)
                    self.live_violations.append({**v.to_json(), "seen_at": time.time()})
                    self.say(f"checker (live): invariant {v.name}: {v.message}")

    def role_records(self) -> list[dict[str, Any]]:
        """The roles as this run created them (the final collection reads them back from
        `GetChatroom`; the live check needs them before)."""
        return [
            {"kind": "role", "t": self.start, "chatroom": CHATROOM, "role": r,
             "role_kind": "remote" if r in self.role_machine else "custom",
             "machine": self.role_machine.get(r, "")}
            for r in [*self.remote, *self.custom]
        ]  # fmt: skip

    def run_record(self, end: float) -> dict[str, Any]:
        return {
            "kind": "run",
            "t": self.start,
            "seed": self.seed,
            "start": self.start,
            "end": end,
            "duration_s": self.duration,
            "ttl_s": TTL_S,
            "grace_s": GRACE_S,
            "kill_offline_ms": 100,
            "pending_idle_s": 1.0,
        }

    async def _inject(self, p: Planned) -> None:
        kind, target = p.fault, p.target
        if kind in ("agent_kill", "waiter_kill"):
            if kind == "agent_kill":
                pid = await self.agent_pid(target, p.busy)
            else:
                pid = self.waiter_pid(target)
            if pid is None:
                self.counts[f"skipped:{kind}"] += 1
                return
            busy = False
            if kind == "agent_kill":
                with contextlib.suppress(RPCError):
                    listed = await self.client.list_tasks(CHATROOM, TaskStatus.IN_PROGRESS)
                    busy = any(t.role == target for t in listed)
            t = time.time()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.fault(
                kind,
                t,
                chatroom=CHATROOM,
                role=target,
                machine=self.role_machine.get(target, ""),
                pid=pid,
                busy=busy,
                paused=pid in self.paused,
                scope="role",
            )
            self.counts["agents_killed"] += 1
        elif kind in ("agent_pause_short", "agent_pause_long", "waiter_pause_long"):
            pid = (
                await self.agent_pid(target, False)
                if kind.startswith("agent")
                else (self.waiter_pid(target))
            )
            if pid is None or pid in self.paused:
                self.counts[f"skipped:{kind}"] += 1
                return
            t = time.time()
            self.paused.add(pid)
            try:
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(p.hold)
            except ProcessLookupError:
                pass
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                self.paused.discard(pid)
            # A pause short of the TTL excuses nothing: the agent must stay live.
            long = "long" in kind
            self.fault(
                kind,
                t,
                time.time(),
                chatroom=CHATROOM,
                role=target,
                machine=self.role_machine.get(target, ""),
                pid=pid,
                scope="role" if long else "",
            )
        elif kind == "daemon_kill":
            async with self.lock(f"daemon:{target}"):
                d = self.daemons[target]
                t = time.time()
                try:
                    await d.kill(signal.SIGKILL)
                    await asyncio.sleep(p.hold)
                    d.start()
                finally:
                    self.fault(kind, t, time.time(), machine=target, scope="machine")
        elif kind in ("replica_restart", "replica_kill"):
            async with self.lock("replicas"):
                r = self.replicas[int(target)]
                assert r.proc is not None
                t = time.time()
                sig = signal.SIGTERM if kind == "replica_restart" else signal.SIGKILL
                try:
                    try:
                        await asyncio.to_thread(r.proc.stop, sig, 20)
                    except subprocess.TimeoutExpired:
                        r.proc.proc.kill()
                        await asyncio.to_thread(r.proc.proc.wait, 5)
                    await asyncio.sleep(p.hold)
                    await asyncio.to_thread(r.start)
                finally:  # declared even if healing failed: the outage was real
                    self.fault(kind, t, time.time(), target=f"replica-{target}", scope="global")
                self.counts["replica_restarts"] += 1
        elif kind == "pg_restart":
            async with self.lock("pg"):
                t = time.time()
                try:
                    await asyncio.to_thread(self.pg.stop)
                    await asyncio.sleep(p.hold)
                    await asyncio.to_thread(self.pg.start)
                finally:
                    self.fault(kind, t, time.time(), scope="global")
        elif kind == "operator_stop":
            async with self.lock(f"role:{target}"):
                await self.client.stop_agent(CHATROOM, target)
                t = time.time()
                await asyncio.sleep(p.hold)
                end = time.time()
                try:
                    # A person starts it again, and tries again while Vigil is away (a
                    # PostgreSQL restart may overlap): the role must not stay stopped.
                    await self.until_accepted(
                        lambda: self.client.start_agent(CHATROOM, target), f"start {target}"
                    )
                    end = time.time()
                finally:
                    self.fault(
                        kind,
                        t,
                        end,
                        chatroom=CHATROOM,
                        role=target,
                        machine=self.role_machine[target],
                        scope="role",
                    )
        elif kind == "partition":
            indexes = [0, 1] if target == "both" else [int(target)]
            async with contextlib.AsyncExitStack() as held:
                for i in indexes:  # in order: two partitions never wait on each other
                    await held.enter_async_context(self.lock(f"net:{i}"))
                t = time.time()
                try:
                    for i in indexes:
                        await asyncio.to_thread(self.net.partition, i)
                    await asyncio.sleep(p.hold)
                finally:
                    for i in indexes:
                        await asyncio.to_thread(self.net.heal, i)
                    self.fault(
                        kind,
                        t,
                        time.time(),
                        target="replicas" if target == "both" else f"replica-{target}",
                        machine=CUT_MACHINE,
                        roles=[f"{CHATROOM}/{self.cut_custom}"],
                        scope="group",
                    )
                self.counts["partitions"] += 1
        elif kind == "slow_network":
            # Slow, not cut: nobody may be marked offline for it.
            async with self.lock("net:slow"):
                t = time.time()
                try:
                    await asyncio.to_thread(self.net.slow_down)
                    await asyncio.sleep(p.hold)
                finally:
                    await asyncio.to_thread(self.net.speed_up)
                    self.fault(
                        kind,
                        t,
                        time.time(),
                        machine=CUT_MACHINE,
                        rate=SLOW_RATE,
                        queue=SLOW_QUEUE,
                        scope="",
                    )
        elif kind == "burst":
            t = time.time()
            await asyncio.gather(*(self.send(target, f"burst {t:.0f} {i}") for i in range(100)))
            self.fault(kind, t, time.time(), chatroom=CHATROOM, role=target, n=100, scope="")

    async def faults(self, schedule: list[Planned]) -> None:
        running: set[asyncio.Task[None]] = set()
        for p in schedule:
            delay = self.start + p.at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.say(f"fault {p.fault} {p.target} hold {p.hold}s")
            t = asyncio.create_task(self.inject(p))
            running.add(t)
            t.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)

    # -- the run --------------------------------------------------------------------------

    async def drain(self) -> int:
        """Wait until no task sent is still open (needing attention counts as done);
        the number left open."""
        deadline = time.time() + self.drain_s
        while True:
            open_ = []
            with contextlib.suppress(RPCError):
                for status in (
                    TaskStatus.PENDING,
                    TaskStatus.ACKNOWLEDGED,
                    TaskStatus.IN_PROGRESS,
                    TaskStatus.QUEUED,
                ):
                    open_ += [
                        t
                        for t in await self.client.list_tasks(CHATROOM, status)
                        if not t.needs_attention
                    ]
                if not open_:
                    return 0
            if time.time() > deadline:
                return len(open_)
            await asyncio.sleep(0.5)

    async def run(self) -> dict[str, Any]:
        schedule = plan(self.seed, self.duration, self.remote, self.custom)
        digest = schedule_digest(schedule)
        print(
            f"chaos: seed {self.seed}, duration {self.duration:.0f}s, {len(schedule)} faults "
            f"planned (schedule {digest})",
            flush=True,
        )
        stop_sampling = asyncio.Event()
        self.start = time.time()
        self.bg.append(asyncio.create_task(sampler(self.client, self.log, stop_sampling)))
        self.bg.append(asyncio.create_task(self.live_checks()))
        until = self.start + self.duration
        await asyncio.gather(self.senders(until), self.faults(schedule))
        self.say("faults over: draining")
        for d in self.daemons.values():
            if d.proc is None or d.proc.poll() is not None:
                d.start()
        left = await self.drain()
        self.say(f"drained ({left} tasks still open)")
        await asyncio.sleep(1.0)
        await sample(self.client, self.log)
        stop_sampling.set()
        end = time.time()
        await collect_final(self.client, self.log, self.say)
        await asyncio.sleep(0.5)  # the presence stream's last events
        self.stop_watch.set()
        for task in self.bg:
            task.cancel()
        await asyncio.gather(*self.bg, return_exceptions=True)
        for r in self.custom:
            with contextlib.suppress(FileNotFoundError):
                for line in (self.tmp / f"ops-{r}.jsonl").read_text().splitlines():
                    rec = json.loads(line)
                    self.log.add(rec.pop("kind"), rec.pop("t"), **rec)
        run = self.run_record(end)
        self.log.add(run.pop("kind"), run.pop("t"), **run, schedule=digest)
        records = self.log.records
        violations = checker.check(records)
        figures = checker.figures(records)
        figures["faults_planned"] = len(schedule)
        figures["faults_skipped"] = {
            k.split(":", 1)[1]: v for k, v in self.counts.items() if k.startswith("skipped:")
        }
        figures["agents_killed"] = self.counts["agents_killed"]
        figures["replica_restarts"] = self.counts["replica_restarts"]
        figures["pg_restarts"] = figures["faults"].get("pg_restart", 0)
        figures["partitions"] = self.counts["partitions"]
        figures["tasks_left_open_after_drain"] = left
        figures["live_checks"] = self.counts["live_checks"]
        figures["live_violations"] = len(self.live_violations)
        return {
            "seed": self.seed,
            "schedule_digest": digest,
            "schedule": [p.__dict__ for p in schedule],
            "duration_s": self.duration,
            "started_at": self.start,
            "ended_at": end,
            "topology": {
                "replicas": 2,
                "machines": list(MACHINES),
                "remote_roles": len(self.remote),
                "custom_roles": len(self.custom),
                "steady_rate_per_s": self.rate,
                "ttl_s": TTL_S,
                "env": ENV,
            },
            "figures": figures,
            "errors": self.errors,
            "violations": [v.to_json() for v in violations],
            "live_violations": self.live_violations,
            "timeline": timeline(records, self.start, end),
        }

    async def teardown(self) -> None:
        try:
            await self._teardown()
        finally:  # the namespace goes whatever else failed
            net = getattr(self, "net", None)
            if net is not None:
                await asyncio.to_thread(net.close)

    async def _teardown(self) -> None:
        for proc in self.drivers.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for d in self.daemons.values():
            with contextlib.suppress(Exception):
                await d.stop()
        for c in (self.client, self.watcher_client, self.sender):
            await c.close()
        for r in self.replicas:
            if r.alive():
                assert r.proc is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(r.proc.stop, signal.SIGTERM, 15)
        await asyncio.to_thread(harness.kill_leftovers)
        await asyncio.to_thread(self.pg.stop)
        self.log.close()


def proc_start_offset() -> float:
    """Process start times from /proc count from `btime`, the boot time in whole seconds:
    the true boot time (now - uptime) minus it, to bring them onto the wall clock."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    now = time.time()
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return round(now - uptime - float(line.split()[1]), 3)
    return 0.0


def _runs(pid: int, marker: bytes) -> bool:
    """Whether `pid` is (still) the process we mean: never signal a reused pid."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def timeline(
    records: list[checker.Record], start: float, end: float, buckets: int = 30
) -> list[dict[str, Any]]:
    """Per time slice: faults begun, live participants, open tasks (sampled), violations."""
    width = max((end - start) / buckets, 1e-3)
    rows = [
        {"t": round(i * width, 1), "faults": 0, "live": 0, "open_tasks": 0} for i in range(buckets)
    ]

    def idx(t: float) -> int | None:
        i = int((t - start) / width)
        return i if 0 <= i < buckets else None

    live: dict[tuple[str, str], bool] = {}
    for r in sorted((r for r in records if r["kind"] == "presence"), key=lambda r: r["revision"]):
        live[(r["chatroom"], r["role"])] = r["type"] != "offline"
        i = idx(r["t"])
        if i is not None:
            rows[i]["live"] = sum(1 for (c, _), v in live.items() if v and c != "vigil.machines")
    for r in records:
        i = idx(r["t"])
        if i is None:
            continue
        if r["kind"] == "fault":
            rows[i]["faults"] += 1
        elif r["kind"] == "task_sample":
            rows[i]["open_tasks"] = max(rows[i]["open_tasks"], len(r["tasks"]))
    for i in range(1, buckets):
        if rows[i]["live"] == 0:
            rows[i]["live"] = rows[i - 1]["live"]
    return rows


def markdown(result: dict[str, Any]) -> str:
    f = result["figures"]
    lines = [
        f"# Chaos soak, seed {result['seed']}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(result['started_at']))} UTC, "
        f"{result['duration_s']:.0f} s of faults; schedule {result['schedule_digest']} "
        f"({len(result['schedule'])} faults planned). Topology: PostgreSQL, 2 `vigil up` "
        f"replicas, daemons {', '.join(result['topology']['machines'])}, "
        f"{result['topology']['remote_roles']} remote roles (example agent), "
        f"{result['topology']['custom_roles']} custom roles (wait-for-task loops); "
        f"TTL {result['topology'].get('ttl_s', TTL_S)} s. Machine {CUT_MACHINE}'s daemon and "
        "agents and one custom role run in a network namespace: the partitions and the "
        "slow network act on its link.",
        "",
        f"**Violations: {len(result['violations'])}**",
        "",
        f"Checked during the run too (invariants 1 and 5, every 30 s): {f['live_checks']} "
        f"checks, {f['live_violations']} violations seen live.",
        "",
    ]
    for v in result["violations"][:20]:
        lines += [f"- `{v['invariant']}`: {v['message']}"]
    lines += [
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| faults: {k} | {v} |" for k, v in f["faults"].items()],
        f"| faults skipped (no target at the time) | {f['faults_skipped'] or 0} |",
        f"| agents killed (SIGKILL) | {f['agents_killed']} |",
        f"| replica restarts (graceful + SIGKILL) | {f['replica_restarts']} |",
        f"| PostgreSQL restarts | {f['pg_restarts']} |",
        f"| network partitions | {f['partitions']} |",
        f"| tasks sent | {f['tasks_sent']} |",
        f"| tasks at the end | {f['tasks_final']} |",
        f"| audit rows checked | {f['transitions']} |",
        f"| presence events checked | {f['presence_events']} |",
        f"| exits recorded | {f['exits_recorded']} {f['exits_by_classification']} |",
        f"| kill → offline (ms) | {_pct(f['kill_to_offline_ms'])} |",
        f"| exit → recorded (ms) | {_pct(f['exit_to_recorded_ms'])} |",
        "",
        "## Timeline",
        "",
        "```",
        "   t(s)  faults  live  open tasks",
    ]
    peak = max((r["open_tasks"] for r in result["timeline"]), default=1) or 1
    for r in result["timeline"]:
        bar = "#" * round(20 * r["open_tasks"] / peak)
        lines.append(
            f"{r['t']:7.1f}  {'*' * r['faults']:<6}  {r['live']:>4}  {r['open_tasks']:>4} {bar}"
        )
    lines += ["```", ""]
    return "\n".join(lines)


def _pct(p: dict[str, Any]) -> str:
    return f"n {p['n']}, p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, max {p['max']}"


async def soak(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="vigil-chaos-"))
    s = Soak(
        args.seed,
        args.duration,
        tmp,
        args.out,
        remote_roles=args.remote_roles,
        custom_roles=args.custom_roles,
        rate=args.rate,
        verbose=not args.quiet,
    )
    print(f"chaos: seed {args.seed} (replay: python -m chaos --seed {args.seed}); scratch {tmp}")
    try:
        await s.setup()
        result = await s.run()
    finally:
        with contextlib.suppress(Exception):
            await s.teardown()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / str(args.seed)
    base.with_suffix(".json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    base.with_suffix(".md").write_text(markdown(result))
    if result["violations"]:  # the evidence, for whoever fixes it
        with (
            (tmp / "events.jsonl").open("rb") as src,
            gzip.open(base.with_suffix(".events.jsonl.gz"), "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
    f = result["figures"]
    print(json.dumps({k: f[k] for k in sorted(f)}, indent=1))
    print(f"report: {base.with_suffix('.md')}  results: {base.with_suffix('.json')}")
    if result["errors"]:
        print("run errors:", *result["errors"][:10], sep="\n  ")
    if result["errors"] and not result["violations"]:
        print(f"chaos: the run broke (seed {args.seed}); scratch kept in {tmp}")
        return 2
    if result["violations"]:
        print(f"chaos: {len(result['violations'])} VIOLATIONS (seed {args.seed}); the first:")
        for v in result["violations"][:5]:
            print(f"invariant {v['invariant']}: {v['message']}")
            for e in v["events"]:
                print("    " + json.dumps(e, sort_keys=True))
        return 1
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"chaos: 0 violations (seed {args.seed})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="fault schedule seed (default: random)")
    p.add_argument("--duration", type=parse_duration, default=60.0, help="e.g. 90s, 30m")
    p.add_argument("--remote-roles", type=int, default=10)
    p.add_argument("--custom-roles", type=int, default=3)
    p.add_argument("--rate", type=float, default=3.0, help="steady tasks/s")
    p.add_argument("--out", type=Path, default=Path("chaos/results"))
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)

    def interrupted(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM too: the teardown runs (namespace, processes)

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return asyncio.run(soak(args))
    except NetnsError as exc:
        print(
            f"chaos: cannot make the soak's network namespace (it needs root and iproute2): {exc}"
        )
        return 2
    finally:
        harness.kill_leftovers()
