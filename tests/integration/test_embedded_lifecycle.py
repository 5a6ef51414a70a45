"""The embedded PostgreSQL's life cycle with real processes (issue 11, must-show 5): a
`vigil up` SIGKILLed, with or without its PostgreSQL, starts again cleanly every time;
the server a killed owner left running is adopted and stopped by the next graceful
stop; a killed postmaster nobody reaps (a zombie) does not block a start; a
`postmaster.pid` naming a pid that is not this folder's postgres is not trusted; a
schema newer than this Vigil is refused in one line; `vigil migrate --status`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from vigil import testing as harness
from vigil.core.embedded import EmbeddedPostgres, Postmaster, bin_dir
from vigil.v1 import common_pb2
from vigil.v1 import liveness_pb2 as pb
from vigil.v1 import liveness_pb2_grpc as pb_grpc

# Spawns real processes (servers, PostgreSQL): not in `make test-fast`.
pytestmark = pytest.mark.slow

RUNS = 20


def _env(data: Path, **extra: str) -> dict[str, str]:
    return harness.child_env(
        {
            "VIGIL_DATA_DIR": str(data),
            "VIGIL_ADDR": "127.0.0.1:0",
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            "VIGIL_BOOTSTRAP_TOKEN": "",  # as `make run`: it writes its own admin token
            **extra,
        }
    )


def _up(data: Path, log: Path) -> harness.ServerProcess:
    return harness.start_server_process(["up", "--no-ui"], _env(data), log, timeout=120)


def _vigil(data: Path, cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        harness.vigil_cmd(*args),
        env=_env(data, **extra),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def live_postgres_of(pgdata: Path) -> list[int]:
    """Live (not zombie) processes working in `pgdata`: the server of that folder and
    its backends. Written here, apart from vigil.core.embedded, so a bug there cannot
    hide one."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == str(pgdata) and _state(int(entry)) not in (None, "Z", "X"):
            found.append(int(entry))
    return found


def _cleanup(pgdata: Path) -> None:
    """After a failed test: no server of the folder keeps running (SIGKILL is enough for
    a throwaway folder)."""
    for pid in live_postgres_of(pgdata):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(pgdata: Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := live_postgres_of(pgdata)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def data(tmp: Path) -> Iterator[Path]:
    """A data folder whose PostgreSQL is killed after the test if it still runs."""
    yield tmp / "state"
    _cleanup((tmp / "state" / "pg").resolve())
    _cleanup((tmp / "own" / "pg").resolve())


async def _join_and_list(addr: str, role: str) -> set[str]:
    """A real RPC on each service path that needs the database: join, then list."""
    async with harness.channel(addr) as ch:
        live = pb_grpc.LivenessStub(ch)
        await live.Join(
            pb.JoinRequest(
                chatroom="crash",
                role=role,
                kind=common_pb2.AGENT_KIND_REMOTE,
                connection_id=str(uuid.uuid4()),
            ),
            timeout=10,
        )
        listed = await live.ListParticipants(
            pb.ListParticipantsRequest(chatroom="crash"), timeout=10
        )
    return {p.role for p in listed.participants}


async def test_sigkill_of_up_with_and_without_its_postgres_then_up_again(
    tmp: Path, data: Path
) -> None:
    """Must-show 5: RUNS times, SIGKILL `vigil up` (every other time its postmaster too,
    and restart at once), start again: it serves and every earlier write is there. The
    last kill leaves the postmaster running; the graceful stop that follows stops it."""
    pgdata = (data / "pg").resolve()
    began = time.monotonic()
    up = _up(data, tmp / "up-0.log")
    assert await _join_and_list(up.addr, "r0") == {"r0"}
    restarts: list[float] = []
    zombies = adopted = cleared = 0
    for i in range(RUNS):
        pm = Postmaster.read(pgdata)
        assert pm is not None and pm.pid in live_postgres_of(pgdata)
        up.proc.kill()
        up.proc.wait(10)
        with_postgres = i % 2 == 0
        if with_postgres:
            os.kill(pm.pid, signal.SIGKILL)
        else:
            time.sleep(0.2)
            assert pm.pid in live_postgres_of(pgdata), "the orphaned postmaster runs on"
        t0 = time.monotonic()
        up = _up(data, tmp / f"up-{i + 1}.log")  # at once: no waiting for anything
        restarts.append(time.monotonic() - t0)
        if with_postgres:  # killed and not reaped while the new one started?
            zombies += _state(pm.pid) == "Z"
        roles = await _join_and_list(up.addr, f"r{i + 1}")
        assert roles == {f"r{n}" for n in range(i + 2)}, f"run {i + 1}: writes lost"
        text = up.log.read_text()
        if with_postgres:
            assert "adopted" not in text
            cleared += "removing the lock files" in text
        else:
            assert f"adopted the embedded PostgreSQL (pid {pm.pid})" in text, text
            adopted += 1
            assert Postmaster.read(pgdata) == pm  # the very server the killed owner left
    assert cleared == RUNS // 2  # each killed postmaster's lock files, and only those
    last = Postmaster.read(pgdata)
    assert last is not None
    assert up.stop(signal.SIGTERM, timeout=60) == 0
    left = _wait_gone(pgdata, 5)
    assert left == [], f"postgres processes of {pgdata} left after a graceful stop: {left}"
    assert _state(last.pid) in (None, "Z", "X")
    assert not (pgdata / "postmaster.pid").exists()
    print(
        f"\nmust-show 5: {RUNS} SIGKILLs of `vigil up` ({RUNS // 2} with its postmaster, "
        f"{zombies} of those a zombie nobody reaped), {RUNS} clean restarts; adopted {adopted}, "
        f"stale lock files cleared {cleared}; restart to serving: median "
        f"{statistics.median(restarts):.2f} s, max {max(restarts):.2f} s; graceful stop "
        f"left 0 postgres processes; total {time.monotonic() - began:.1f} s"
    )


def _start_postmaster_as_child(pgdata: Path, socket_dir: Path) -> subprocess.Popen[bytes]:
    """The folder's postgres run directly as this process's child (so that, killed and
    not reaped, it stays a zombie whatever the machine's init does)."""
    user = "embedded_postgres" if os.geteuid() == 0 else None
    proc = subprocess.Popen(
        [str(bin_dir() / "postgres"), "-D", str(pgdata), "-h", "", "-k", str(socket_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=user,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
            if len(lines) > 7 and lines[0] == str(proc.pid) and lines[7].strip() == "ready":
                return proc
        assert proc.poll() is None, "postgres did not start"
        time.sleep(0.05)
    raise AssertionError("postgres did not become ready")


async def test_a_killed_postmaster_left_a_zombie_nobody_reaps(tmp: Path, data: Path) -> None:
    pgdata = (data / "pg").resolve()
    first = _up(data, tmp / "first.log")
    pm = Postmaster.read(pgdata)
    assert pm is not None
    assert first.stop(signal.SIGTERM, timeout=60) == 0
    assert _wait_gone(pgdata) == []

    zombie = _start_postmaster_as_child(pgdata, pm.socket_dir)
    try:
        os.kill(zombie.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _state(zombie.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(zombie.pid) == "Z"  # dead, unreaped: its pid still "exists"
        assert Postmaster.read(pgdata) is not None  # and its lock files are still there

        up = _up(data, tmp / "after-zombie.log")
        assert await _join_and_list(up.addr, "after") >= {"after"}
        assert _state(zombie.pid) == "Z"  # it was not waited for forever
        assert "removing the lock files" in up.log.read_text()
        assert up.stop(signal.SIGTERM, timeout=60) == 0
        assert _wait_gone(pgdata) == []
    finally:
        if zombie.poll() is None:
            zombie.kill()
        zombie.wait(10)


async def test_a_postmaster_pid_naming_someone_else_is_not_trusted(
    tmp: Path, data: Path, pg_admin_url: str
) -> None:
    """After a crash and a reboot, `postmaster.pid` may name a pid now used by another
    process: a live non-postgres process, or another folder's postgres. Neither is
    adopted (its URL would lead nowhere, or to the wrong database); a fresh server
    starts and is stopped."""
    pg = EmbeddedPostgres(tmp / "own")
    await _start(pg)
    pg.stop()
    other_pgdata = Path(parse_qs(urlsplit(pg_admin_url).query)["host"][0])
    other = Postmaster.read(other_pgdata)
    assert other is not None and other.pid in live_postgres_of(other_pgdata)
    for impostor in (os.getpid(), other.pid):
        (pg.pgdata / "postmaster.pid").write_text(
            f"{impostor}\n{pg.pgdata}\n1700000000\n5432\n{pg.pgdata}\n\n  1  2\nready   \n"
        )
        url = await _start(pg)
        try:
            pm = Postmaster.read(pg.pgdata)
            assert pm is not None and pm.pid != impostor and pg.adopted is None
            conn = await asyncpg.connect(url)
            try:
                assert await conn.fetchval("SHOW data_directory") == str(pg.pgdata)
            finally:
                await conn.close()
        finally:
            pg.stop()
        assert _wait_gone(pg.pgdata) == []
        assert _state(other.pid) not in (None, "Z")  # the other folder's server untouched


async def _start(pg: EmbeddedPostgres) -> str:
    return await asyncio.to_thread(pg.start)


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("vigil: error:")]


async def test_a_schema_newer_than_this_vigil_is_refused(
    tmp: Path, data: Path, pg_admin_url: str
) -> None:
    known = harness.all_migrations()
    latest_tasks = max(m.version for m in known if m.service == "tasks")

    # An empty database: everything pending; migrate applies it; then all applied.
    url = await harness.create_database_from(pg_admin_url, "postgres")
    done = _vigil(tmp / "x", tmp, "migrate", "--status", DATABASE_URL=url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(known) and all(line.endswith(" pending") for line in lines)
    assert lines[0] == f"{known[0].service} {known[0].version:04d}_{known[0].name} pending"
    assert _vigil(tmp / "x", tmp, "migrate", DATABASE_URL=url).returncode == 0
    done = _vigil(tmp / "x", tmp, "migrate", "--status", "--json", DATABASE_URL=url)
    rows = json.loads(done.stdout)
    assert [(r["service"], r["version"]) for r in rows] == [(m.service, m.version) for m in known]
    assert {r["status"] for r in rows} == {"applied"} and all(r["applied_at"] for r in rows)

    # The embedded default, migrated by `vigil up`, then by a "newer Vigil".
    pgdata = (data / "pg").resolve()
    up = _up(data, tmp / "up.log")
    assert up.stop(signal.SIGTERM, timeout=60) == 0
    pg = EmbeddedPostgres(data)
    owner_url = await _start(pg)
    try:
        conn = await asyncpg.connect(owner_url)
        await conn.execute(
            "INSERT INTO public.vigil_migrations (service, version, name) "
            "VALUES ('tasks', $1, 'from_the_future')",
            latest_tasks + 1,
        )
        await conn.close()
    finally:
        pg.stop()
    expected = (
        f"vigil: error: the database schema is at tasks {latest_tasks + 1:04d}, newer than "
        f"this Vigil knows (tasks {latest_tasks:04d}): upgrade Vigil"
    )
    for how, args, extra in (
        ("vigil up", ("up", "--no-ui"), {}),
        ("vigil up, VIGIL_MIGRATE=0", ("up", "--no-ui"), {"VIGIL_MIGRATE": "0"}),
        ("vigil migrate", ("migrate",), {}),
    ):
        t0 = time.monotonic()
        done = _vigil(data, tmp, *args, **extra)
        assert done.returncode == 1, f"{how}: {done.returncode}\n{done.stderr}"
        assert _error_lines(done.stderr) == [expected], f"{how}:\n{done.stderr}"
        assert "serving" not in done.stderr
        assert _wait_gone(pgdata, 5) == [], f"{how} left its PostgreSQL running"
        print(f"\n{how}: refused in {time.monotonic() - t0:.2f} s: {expected}")
    done = _vigil(data, tmp, "migrate", "--status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(known) + 1
    assert lines[-1].startswith(f"tasks {latest_tasks + 1:04d}_from_the_future unknown ")
    assert sum(" applied " in line for line in lines) == len(known)
    assert _wait_gone(pgdata, 5) == []
