"""Running a real Vigil for tests, benchmarks and demos: an embedded PostgreSQL,
databases cloned from a migrated template, Vigil servers in-process or as
subprocesses, `vigil` CLI processes, and small waiting helpers. Shared by Vigil's own
test suite and benchmarks; usable by anyone testing an agent against a real Vigil."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from prometheus_client import CollectorRegistry

from vigil.client import Client, ClientConfig
from vigil.core import migrations
from vigil.core.auth import Authenticator, Principal
from vigil.core.auth.principal import new_token
from vigil.core.auth.tls import ServerTls
from vigil.core.config import Settings
from vigil.core.db import Database
from vigil.core.embedded import EmbeddedPostgres
from vigil.core.limits import Limits
from vigil.core.server import Server
from vigil.core.timings import Timings
from vigil.core.vocab import TokenKind
from vigil.liveness_service.app import LivenessApp
from vigil.server import all_migrations, running
from vigil.task_service.app import TaskApp
from vigil.v1 import common_pb2
from vigil.v1 import liveness_pb2 as pb
from vigil.v1 import liveness_pb2_grpc as pb_grpc

# The folder holding the `vigil` package (the source tree, or site-packages).
ROOT = Path(__file__).resolve().parent.parent.parent

# Millisecond timings used by process-level tests (through the environment).
FAST_ENV = {
    "VIGIL_HEARTBEAT_INTERVAL_MS": "200",
    "VIGIL_HEARTBEAT_TTL_MS": "1000",
    "VIGIL_SHUTDOWN_GRACE_MS": "1000",
    "VIGIL_RECONNECT_JITTER_MS": "200",
}


def fast_timings(**overrides: int) -> Timings:
    env = {**FAST_ENV, **{f"VIGIL_{k.upper()}": str(v) for k, v in overrides.items()}}
    return Timings.from_env(env)


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


async def not_durable(admin_url: str) -> None:
    """Throwaway data: fsync and synchronous commit off (both reload live)."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute("ALTER SYSTEM SET fsync = off")
        await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def create_template(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(with_database(admin_url, name), min_size=1, max_size=2)
    assert pool is not None
    try:
        await migrations.apply(pool, all_migrations())
    finally:
        await pool.close()


async def create_database_from(admin_url: str, template: str) -> str:
    name = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


# -- in-process server -------------------------------------------------------


# The admin token of each server a test started, by address: the harness's own clients,
# stubs and CLI processes authenticate with it.
ADMIN_TOKENS: dict[str, str] = {}
# The principal tests act as when they call a service's methods directly.
ADMIN = Principal(TokenKind.ADMIN, "test")


@dataclass
class LocalServer:
    server: Server
    app: LivenessApp
    tasks: TaskApp
    db: Database
    registry: CollectorRegistry
    admin_token: str
    auth: Authenticator

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@contextlib.asynccontextmanager
async def local_server(
    url: str,
    timings: Timings,
    addr: str = "127.0.0.1:0",
    *,
    limits: Limits | None = None,
    tls: ServerTls | None = None,
) -> AsyncIterator[LocalServer]:
    """A whole Vigil (both services, one port) in this process, with an admin token of
    its own (`srv.admin_token`, also known to the harness's clients by address)."""
    _id, admin_token, _hash = new_token()
    settings = Settings(
        addr=addr,
        timings=timings,
        bootstrap_token=admin_token,
        limits=limits or Limits(),
        tls=tls,
    )
    async with running(settings, url, pool_size=10) as vigil:
        assert vigil.liveness is not None and vigil.tasks is not None
        srv = LocalServer(
            vigil.server,
            vigil.liveness,
            vigil.tasks,
            vigil.db,
            vigil.registry,
            admin_token,
            vigil.auth,
        )
        ADMIN_TOKENS[srv.addr] = admin_token
        try:
            await vigil.tasks.svc.presence.synced.wait()
            yield srv
        finally:
            ADMIN_TOKENS.pop(srv.addr, None)


def client_config(addr: str, token: str | None = None) -> ClientConfig:
    """A client of the server at `addr`, as its admin unless `token` says otherwise."""
    return ClientConfig(liveness_addr=addr, tasks_addr=addr, token=token or ADMIN_TOKENS.get(addr))


def client(addr: str, token: str | None = None) -> Client:
    return Client(client_config(addr, token))


class _Bearer:
    """Adds `authorization: Bearer <token>` to every call of a raw channel (gRPC files an
    interceptor under one call shape only, hence one subclass per shape)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata)


class _BearerUU(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUS(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerSU(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerSS(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def channel(addr: str, token: str | None = None) -> grpc.aio.Channel:
    """A raw channel (for tests of the wire contract) authenticated as the server's
    admin, or with `token` (\"\" for none at all)."""
    token = ADMIN_TOKENS.get(addr) if token is None else token
    return grpc.aio.insecure_channel(addr, interceptors=bearer_interceptors(token))


def bearer_interceptors(token: str | None) -> list[Any]:
    """Interceptors adding `Bearer token` to every call of a raw channel (none without)."""
    shapes = (_BearerUU, _BearerUS, _BearerSU, _BearerSS)
    return [shape(token) for shape in shapes] if token else []


async def make_room(srv: LocalServer, name: str = "room", *custom_roles: str) -> None:
    """A chatroom whose roles (default: builder) are custom agents."""
    from vigil.core.vocab import AgentKind
    from vigil.task_service.model import Role

    roles = [Role(r, AgentKind.CUSTOM) for r in (custom_roles or ("builder",))]
    await srv.tasks.svc.create_chatroom(name, roles)


async def register_machine_direct(srv: LocalServer, machine_id: str) -> str:
    """Register a machine through the service itself (as the test admin); its credential."""
    return await srv.tasks.svc.agents.register_machine(machine_id, "test", [], ADMIN)


# -- subprocesses --------------------------------------------------------------


AGENT_MODES = ("work", "idle", "crash", "sleep")

# What this harness started, so a test that fails half-way leaves nothing running.
_STARTED: list[subprocess.Popen[bytes]] = []
_DAEMON_STATES: list[Path] = []


def _track(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    _STARTED.append(proc)
    return proc


def kill_leftovers() -> list[int]:
    """SIGKILL every process this harness started that still runs, and the agents its
    daemons left (they run in sessions of their own); the pids it had to kill."""
    killed = []
    for state in _DAEMON_STATES:
        try:
            children = json.loads((state / "children.json").read_text())
        except (OSError, ValueError):
            continue
        for child in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(child["pid"]), signal.SIGKILL)
                killed.append(int(child["pid"]))
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            killed.append(proc.pid)
    _STARTED.clear()
    _DAEMON_STATES.clear()
    return killed


def write_harness_file(path: Path, *, allow_any_command: bool = False) -> Path:
    """A machine's harness file for tests: each test-agent mode (vigil.testing.agent) as a
    harness of that name, and `example` (the bundled example agent)."""
    lines = [f"allow_any_command = {'true' if allow_any_command else 'false'}", "[harnesses]"]
    for mode in AGENT_MODES:
        lines.append(
            f'{mode} = [{json.dumps(sys.executable)}, "-m", "vigil.testing.agent", "{mode}"]'
        )
    lines.append(f'example = [{json.dumps(sys.executable)}, "-m", "vigil.example_agent"]')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class MachineDaemon:
    """A real `vigil daemon start` process for a registered machine: its credential and
    harness files written in `tmp`, its log in `tmp/daemon-MACHINE.log`."""

    def __init__(
        self,
        addr: str,
        machine_id: str,
        credential: str,
        tmp: Path,
        *,
        metrics: bool = False,
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """`prefix` goes in front of the command (e.g. `ip netns exec NAME`)."""
        self.addr = addr
        self.machine_id = machine_id
        self.credential = credential
        self.state = tmp / f"daemon-{machine_id}"
        self.cred_file = tmp / f"{machine_id}.credential"
        fd = os.open(self.cred_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"machine_id": machine_id, "credential": credential}, f)
        self.harnesses = write_harness_file(tmp / f"{machine_id}.harnesses.toml")
        self.metrics_port = free_port() if metrics else None
        self.log = tmp / f"daemon-{machine_id}.log"
        self.extra_args = extra_args
        self.env = dict(env or {})
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        args = [
            "daemon",
            "start",
            "--machine-id",
            self.machine_id,
            "--credential-file",
            str(self.cred_file),
            "--state-dir",
            str(self.state),
            "--harness-file",
            str(self.harnesses),
            *self.extra_args,
        ]
        if self.metrics_port is not None:
            args += ["--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        return args

    def start(self, addr: str | None = None) -> MachineDaemon:
        self.proc = _track(
            subprocess.Popen(
                [*self.prefix, *vigil_cmd(*self.args())],
                env=child_env({"VIGIL_ADDR": addr or self.addr, **self.env}),
                stdout=subprocess.DEVNULL,
                stderr=self.log.open("ab"),
            )
        )
        _DAEMON_STATES.append(self.state)
        return self

    async def kill(self, sig: int = signal.SIGKILL, timeout: float = 15) -> int:
        """Signal the daemon and wait for it to exit (without blocking the event loop,
        which may host the very server it talks to on its way out)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def stop(self) -> None:
        """SIGTERM (it stops its agents), then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            await self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            await self.kill(signal.SIGKILL, 5)


async def register_machine(addr: str, machine_id: str, tmp: Path, **kw: Any) -> MachineDaemon:
    """Register `machine_id` through the API; its daemon (not yet started)."""
    from vigil.client import Client

    async with Client(client_config(addr)) as client:
        reply = await client.register_machine(machine_id, "test")
    return MachineDaemon(addr, machine_id, reply.credential, tmp, **kw)


def vigil_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vigil.cli", *args]


@contextlib.asynccontextmanager
async def local_vigil(
    tmp: Path, timings: Timings, *, database_url: str | None = None
) -> AsyncIterator[LocalServer]:
    """A whole Vigil in this process on a free loopback port, on `database_url` or on a
    throwaway embedded PostgreSQL under `tmp` (deleted afterwards)."""
    pg = None
    if database_url is None:
        pg = EmbeddedPostgres(tmp)
        database_url = await asyncio.to_thread(pg.start)
    try:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        assert pool is not None
        try:
            await migrations.apply(pool, all_migrations())
        finally:
            await pool.close()
        async with local_server(database_url, timings) as srv:
            yield srv
    finally:
        if pg is not None:
            await asyncio.to_thread(pg.stop)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = str(ROOT)
    env.update(FAST_ENV)
    if extra:
        env.update(extra)
    # A CLI or agent pointed at a server this harness started acts as its admin unless
    # the test gave it a credential of its own.
    token = ADMIN_TOKENS.get(env.get("VIGIL_ADDR", ""))
    if token and not any(k in env for k in ("VIGIL_TOKEN", "VIGIL_TOKEN_FILE")):
        env["VIGIL_TOKEN"] = token
    return env


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


_SERVING = re.compile(rb"serving .* on [^ ]+:(\d+) \([^;)]*; metrics https?://[^:]+:(\d+)/")


def start_server_process(
    args: list[str], env: dict[str, str], log: Path, timeout: float = 60
) -> ServerProcess:
    """Start `vigil ARGS` in the log's folder and wait for its 'serving … on HOST:PORT'
    line. The server accepts `env`'s VIGIL_BOOTSTRAP_TOKEN (one is made up if missing)
    as its admin; with VIGIL_BOOTSTRAP_TOKEN="" it writes its own admin token file."""
    cwd = log.parent
    env = dict(env)
    token = env.setdefault("VIGIL_BOOTSTRAP_TOKEN", new_token()[1])
    if not token:  # the test wants the server to write its own admin token file
        del env["VIGIL_BOOTSTRAP_TOKEN"]
    out = log.open("wb")
    proc = _track(
        subprocess.Popen(vigil_cmd(*args), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _SERVING.search(log.read_bytes())
        if m:
            started = ServerProcess(proc, int(m.group(1)), int(m.group(2)), log)
            token_file = cwd / (env.get("VIGIL_DATA_DIR") or ".vigil") / "admin.token"
            if not token and token_file.exists():
                token = token_file.read_text().strip()
            ADMIN_TOKENS[started.addr] = token
            return started
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


@dataclass
class Agent:
    """A `vigil wait-for-task` process."""

    proc: subprocess.Popen[bytes]
    role: str
    chatroom: str
    stderr_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def spawn_agent(
    addr: str,
    chatroom: str,
    role: str,
    tmp: Path,
    *,
    kind: str = "custom",
    timeout: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Agent:
    args = ["wait-for-task", "--chatroom", chatroom, "--role", role, "--kind", kind]
    if timeout:
        args += ["--timeout", timeout]
    path = tmp / f"agent-{chatroom}-{role}-{uuid.uuid4().hex[:6]}.err"
    proc = _track(
        subprocess.Popen(
            vigil_cmd(*args),
            env=child_env({"VIGIL_ADDR": addr, **(env or {})}),
            stdout=subprocess.DEVNULL,
            stderr=path.open("wb"),
        )
    )
    return Agent(proc, role, chatroom, path)


# -- observing -----------------------------------------------------------------


async def participant_row(url: str, chatroom: str, role: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow(
            "SELECT * FROM liveness.participants WHERE chatroom = $1 AND role = $2",
            chatroom,
            role,
        )
    finally:
        await conn.close()


async def wait_for(
    predicate: Any, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_live(url: str, chatroom: str, role: str, timeout: float = 15.0) -> asyncpg.Record:
    async def live() -> asyncpg.Record | None:
        row = await participant_row(url, chatroom, role)
        return row if row is not None and row["status"] == "live" else None

    row: asyncpg.Record = await wait_for(live, timeout, what=f"{chatroom}/{role} live")
    return row


async def wait_offline(
    url: str, chatroom: str, role: str, timeout: float = 15.0, epoch: int | None = None
) -> asyncpg.Record:
    async def offline() -> asyncpg.Record | None:
        row = await participant_row(url, chatroom, role)
        if row is None or row["status"] != "offline":
            return None
        return row if epoch is None or row["epoch"] == epoch else None

    row: asyncpg.Record = await wait_for(offline, timeout, what=f"{chatroom}/{role} offline")
    return row


def stub(addr: str, token: str | None = None) -> tuple[grpc.aio.Channel, pb_grpc.LivenessStub]:
    ch = channel(addr, token)
    return ch, pb_grpc.LivenessStub(ch)


def join_request(
    chatroom: str, role: str, kind: common_pb2.AgentKind.ValueType = common_pb2.AGENT_KIND_CUSTOM
) -> pb.JoinRequest:
    return pb.JoinRequest(chatroom=chatroom, role=role, kind=kind, connection_id=str(uuid.uuid4()))


class StreamFailures(logging.Handler):
    """When (monotonic) the client package logged that a session stream failed: the
    moments a client noticed its connection was gone."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "session stream failed" in record.getMessage():
            self.at.append(time.monotonic())


@contextlib.contextmanager
def stream_failures() -> Iterator[StreamFailures]:
    """Record this process's clients' session stream failures for the block."""
    handler = StreamFailures()
    logger = logging.getLogger("vigil.client")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


class CountedCalls:
    """Stands in for a client stub's method and counts the calls made through it
    (`client.tasks.SendMessages = CountedCalls(client.tasks.SendMessages)`)."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.calls = 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.method(*args, **kw)


def count_calls(client: Client, *names: str) -> list[CountedCalls]:
    """Count the calls of these methods of `client.tasks`, one counter each."""
    counters = [CountedCalls(getattr(client.tasks, name)) for name in names]
    for name, counter in zip(names, counters, strict=True):
        setattr(client.tasks, name, counter)
    return counters


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
