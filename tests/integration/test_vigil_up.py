"""`vigil up` (what `make run` runs) on the embedded default: its admin token file,
health (open), reflection (off unless asked), metrics, and data that survives a
restart."""

from __future__ import annotations

import signal
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vigil import testing as harness
from vigil.v1 import common_pb2
from vigil.v1 import liveness_pb2 as pb
from vigil.v1 import liveness_pb2_grpc as pb_grpc

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow


def _up(data: Path, log: Path, *args: str) -> harness.ServerProcess:
    env = harness.child_env(
        {
            "VIGIL_DATA_DIR": str(data),
            "VIGIL_ADDR": "127.0.0.1:0",
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            "VIGIL_BOOTSTRAP_TOKEN": "",  # as `make run`: it writes its own admin token
        }
    )
    return harness.start_server_process(["up", *args], env, log, timeout=120)


async def _reflected(addr: str) -> list[str]:
    async with harness.channel(addr, "") as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        names: list[str] = []
        async for r in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = [s.name for s in r.list_services_response.service]
        return names


async def test_up_serves_on_the_embedded_default_and_keeps_its_data(tmp: Path) -> None:
    data = tmp / "state"
    up = _up(data, tmp / "up1.log")
    try:
        text = up.log.read_text()
        assert "database: embedded PostgreSQL" in text and "(plaintext;" in text
        token_file = data / "admin.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        admin = token_file.read_text().strip()
        assert admin == harness.ADMIN_TOKENS[up.addr] and admin not in text  # never logged
        async with harness.channel(up.addr, "") as anonymous:
            health = health_pb2_grpc.HealthStub(anonymous)
            for service in ("", "vigil.v1.Liveness"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.LivenessStub(anonymous).ListParticipants(pb.ListParticipantsRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _reflected(up.addr)  # off unless --reflection
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with harness.channel(up.addr) as ch:
            live = pb_grpc.LivenessStub(ch)
            await live.Join(
                pb.JoinRequest(
                    chatroom="keep",
                    role="me",
                    kind=common_pb2.AGENT_KIND_REMOTE,
                    connection_id=str(uuid.uuid4()),
                )
            )
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{up.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        for name in (
            "vigil_heartbeats_total",
            "vigil_participant_offline_total",
            "vigil_session_streams",
            "vigil_heartbeat_lateness_seconds_bucket",
        ):
            assert name in metrics
    finally:
        assert up.stop(signal.SIGTERM) == 0
    assert (data / "pg" / "PG_VERSION").exists()

    again = _up(data, tmp / "up2.log", "--reflection")
    try:
        assert (data / "admin.token").read_text().strip() == admin  # the same token
        names = await _reflected(again.addr)
        assert "vigil.v1.Liveness" in names and "grpc.health.v1.Health" in names
        async with harness.channel(again.addr) as ch:
            listed = await pb_grpc.LivenessStub(ch).ListParticipants(
                pb.ListParticipantsRequest(chatroom="keep")
            )
        assert [p.role for p in listed.participants] == ["me"]
    finally:
        assert again.stop(signal.SIGTERM) == 0


async def test_two_servers_starting_at_once_apply_migrations_once(
    pg_admin_url: str, tmp: Path
) -> None:
    url = await harness.create_database_from(pg_admin_url, "postgres")  # empty database
    env = harness.child_env({"DATABASE_URL": url, "VIGIL_METRICS_ADDR": "127.0.0.1:0"})
    import subprocess

    procs = [
        subprocess.Popen(
            harness.vigil_cmd("liveness", "serve", "--addr", "127.0.0.1:0"),
            env=env,
            stdout=(tmp / f"s{i}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for i in range(3)
    ]
    servers = []
    try:
        for i, p in enumerate(procs):
            log = tmp / f"s{i}.log"
            servers.append(
                harness.ServerProcess(p, *_wait_ports(log), log)  # all must come up
            )
    finally:
        for s in servers:
            s.stop(signal.SIGTERM)
        for p in procs:
            if p.poll() is None:
                p.kill()
    import asyncpg

    conn = await asyncpg.connect(url)
    rows = await conn.fetch("SELECT service, version FROM public.vigil_migrations")
    await conn.close()
    expected = sorted((m.service, m.version) for m in harness.all_migrations())
    assert sorted((r["service"], r["version"]) for r in rows) == expected


def _wait_ports(log: Path) -> tuple[int, int]:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = harness._SERVING.search(log.read_bytes())
        if m:
            return int(m.group(1)), int(m.group(2))
        time.sleep(0.05)
    raise AssertionError(f"server did not start:\n{log.read_text()}")


def test_a_busy_port_is_one_line_and_exit_2(db_url: str, tmp: Path) -> None:
    import socket
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            harness.vigil_cmd("liveness", "serve", "--addr", f"127.0.0.1:{port}"),
            env=harness.child_env({"DATABASE_URL": db_url, "VIGIL_METRICS_ADDR": "127.0.0.1:0"}),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp,
        )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vigil: error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in done.stderr


async def test_a_second_up_on_the_same_data_dir_is_refused_and_migrate_attaches(
    tmp: Path,
) -> None:
    """One server owns the embedded PostgreSQL of a data folder: a second `vigil up` on
    it is refused in one line (exit 2) and takes nothing from the first; `vigil migrate`
    (and `--status`) use the running server and leave it running; the owner's graceful
    stop stops it."""
    import json
    import subprocess

    from vigil.core.embedded import Postmaster

    data = tmp / "state"
    pgdata = (data / "pg").resolve()
    first = _up(data, tmp / "first.log")
    try:
        pm = Postmaster.read(pgdata)
        assert pm is not None
        env = harness.child_env(
            {
                "VIGIL_DATA_DIR": str(data),
                "VIGIL_ADDR": "127.0.0.1:0",
                "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            }
        )

        def vigil(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                harness.vigil_cmd(*args), env=env, cwd=tmp, capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip

        second = vigil("up", "--no-ui")
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr and "serving" not in second.stderr
        errors = [x for x in second.stderr.splitlines() if x.startswith("vigil: error:")]
        assert errors == [
            f"vigil: error: the embedded PostgreSQL in {pgdata} is owned by another process "
            f"(pid {first.proc.pid}), e.g. another `vigil up`: stop it, or give this server "
            "its own VIGIL_DATA_DIR or a DATABASE_URL"
        ], second.stderr

        status = vigil("migrate", "--status", "--json")
        assert status.returncode == 0, status.stderr
        rows = json.loads(status.stdout)
        assert len(rows) == len(harness.all_migrations())
        assert {r["status"] for r in rows} == {"applied"}
        applied = vigil("migrate")
        assert applied.returncode == 0, applied.stderr
        assert "migrations applied: none" in applied.stdout

        assert Postmaster.read(pgdata) == pm and _running(pm.pid)
        async with harness.channel(first.addr) as ch:  # the first still serves
            await pb_grpc.LivenessStub(ch).ListParticipants(pb.ListParticipantsRequest())
    finally:
        assert first.stop(signal.SIGTERM) == 0
    assert not _running(pm.pid)
    assert Postmaster.read(pgdata) is None


def _running(pid: int) -> bool:
    """A live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
