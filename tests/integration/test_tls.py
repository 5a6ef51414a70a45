"""TLS and mutual TLS end to end: a `vigil up` process serving mutual TLS with
certificates from `vigil tls dev-ca`; the CLI, a daemon proving its machine by its
certificate, the example agent it runs, and `wait-for-task` all work over it; a
plaintext client, a client trusting another CA and one without a certificate are
refused; box-1's certificate cannot act as box-2."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from vigil import testing as harness
from vigil.core.timefmt import to_proto
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc
from vigil.v1 import machines_pb2 as mpb
from vigil.v1 import machines_pb2_grpc as mpb_grpc
from vigil.v1 import tasks_pb2 as tpb
from vigil.v1 import tasks_pb2_grpc as tpb_grpc

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow


def dev_ca(out: Path, *args: str) -> None:
    subprocess.run(
        harness.vigil_cmd("tls", "dev-ca", "--out", str(out), *args),
        env=harness.child_env(),
        check=True,
        capture_output=True,
    )


def tls_env(certs: Path, cert: str | None = "client") -> dict[str, str]:
    env = {"VIGIL_TLS_CA": str(certs / "ca.pem")}
    if cert:
        env |= {"VIGIL_TLS_CERT": str(certs / f"{cert}.pem")}
        env |= {"VIGIL_TLS_KEY": str(certs / f"{cert}.key")}
    return env


def vigil_run(addr: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        harness.vigil_cmd(*args),
        env=harness.child_env({"VIGIL_ADDR": addr, **env}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def secure(addr: str, certs: Path, cert: str | None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{cert}.key").read_bytes() if cert else None,
        certificate_chain=(certs / f"{cert}.pem").read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(addr, creds)


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def test_everything_works_over_mutual_tls_and_nothing_else_gets_in(
    db_url: str, tmp: Path
) -> None:
    certs, other = tmp / "certs", tmp / "other"
    dev_ca(certs, "--host", "127.0.0.1", "--machine", "box-1", "--machine", "box-2")
    dev_ca(other, "--host", "127.0.0.1")
    assert (certs / "ca.key").stat().st_mode & 0o077 == 0
    server = harness.start_server_process(
        [
            "up",
            "--addr",
            "127.0.0.1:0",
            "--tls-cert",
            str(certs / "server.pem"),
            "--tls-key",
            str(certs / "server.key"),
            "--tls-client-ca",
            str(certs / "ca.pem"),
        ],
        harness.child_env({"DATABASE_URL": db_url, "VIGIL_METRICS_ADDR": "127.0.0.1:0"}),
        tmp / "up.log",
    )
    daemon: subprocess.Popen[bytes] | None = None
    try:
        assert "(mutual TLS;" in server.log.read_text()
        addr, client = server.addr, tls_env(certs)
        # The CLI over mutual TLS.
        done = vigil_run(addr, client, "machine", "register", "--machine-id", "box-1")
        assert done.returncode == 0, done.stderr
        done = vigil_run(
            addr,
            client,
            "chatroom",
            "create",
            "team",
            "--role",
            "builder=remote:box-1:example",
            "--role",
            "reviewer=custom",
        )
        assert done.returncode == 0, done.stderr

        # The daemon proves box-1 by its certificate alone (no credential file) and
        # hands its agents the plain client certificate, never its own.
        harnesses = harness.write_harness_file(tmp / "box-1.harnesses.toml")
        daemon = subprocess.Popen(
            harness.vigil_cmd(
                "daemon",
                "start",
                "--machine-id",
                "box-1",
                "--state-dir",
                str(tmp / "state"),
                "--harness-file",
                str(harnesses),
                "--agent-tls-cert",
                str(certs / "client.pem"),
                "--agent-tls-key",
                str(certs / "client.key"),
            ),
            env={
                **harness.child_env({"VIGIL_ADDR": addr, **tls_env(certs, "machine-box-1")}),
                "VIGIL_DATA_DIR": str(tmp / "daemon-data"),
            },
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "daemon.log").open("wb"),
        )
        sent = vigil_run(addr, client, "send", "--chatroom", "team", "--role", "builder", "go")
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.split()[0]

        def completed() -> bool:
            shown = vigil_run(addr, client, "task", "show", task_id, "--json")
            return shown.returncode == 0 and json.loads(shown.stdout)["status"] == "completed"

        await harness.wait_for(
            lambda: asyncio.to_thread(completed), 60, what="the example agent's task completed"
        )
        assert "as its client certificate" in (tmp / "daemon.log").read_text()

        # wait-for-task over mutual TLS.
        agent = harness.spawn_agent(addr, "team", "reviewer", tmp, env=client)
        async with secure(addr, certs, "client") as ch:
            md = (("authorization", f"Bearer {harness.ADMIN_TOKENS[addr]}"),)

            async def reviewer_live() -> bool:
                listed = await lpb_grpc.LivenessStub(ch).ListParticipants(
                    lpb.ListParticipantsRequest(chatroom="team", live_only=True),
                    metadata=md,
                )
                return any(p.role == "reviewer" for p in listed.participants)

            await harness.wait_for(reviewer_live, 20, what="wait-for-task live over TLS")
            await tpb_grpc.TasksStub(ch).SendMessage(
                tpb.SendMessageRequest(chatroom="team", role="reviewer", text="review"),
                metadata=md,
            )
        assert await asyncio.to_thread(agent.proc.wait, 20) == 0, agent.stderr()

        # Refused: plaintext, another CA, no client certificate.
        for env in ({}, tls_env(other), tls_env(certs, None)):
            done = vigil_run(addr, {**env, "VIGIL_INSECURE": "1"}, "chatrooms")
            assert done.returncode == 1, (env, done.stdout)
            assert done.stderr.startswith("vigil: error: ") and "Traceback" not in done.stderr
        async with grpc.aio.insecure_channel(addr) as plain:
            code = await _code(
                tpb_grpc.TasksStub(plain).ListChatrooms(tpb.ListChatroomsRequest(), timeout=5)
            )
        assert code == grpc.StatusCode.UNAVAILABLE

        # box-1's certificate is box-1: never box-2, and no operator either.
        now = to_proto(datetime.now(UTC))
        async with secure(addr, certs, "machine-box-1") as box1:
            machines = mpb_grpc.MachinesStub(box1)
            report = mpb.ExitReport(
                machine_id="box-2",
                child=mpb.Child(chatroom="team", role="builder", pid=9, started_at=now),
                exited_at=now,
                classification=mpb.EXIT_CLASSIFICATION_CRASHED,
            )
            assert await _code(machines.ReportExit(report)) == grpc.StatusCode.PERMISSION_DENIED
            call = machines.DaemonSession()
            await call.write(mpb.DaemonMessage(hello=mpb.DaemonMessage.Hello(machine_id="box-2")))
            assert await _code(call.read()) == grpc.StatusCode.PERMISSION_DENIED
            listing = tpb_grpc.TasksStub(box1).ListTasks(tpb.ListTasksRequest())
            assert await _code(listing) == grpc.StatusCode.PERMISSION_DENIED
            register = machines.RegisterMachine(mpb.RegisterMachineRequest(machine_id="box-2"))
            assert await _code(register) == grpc.StatusCode.PERMISSION_DENIED
        # A certificate naming no machine proves nothing by itself.
        async with secure(addr, certs, "client") as anonymous:
            listing = tpb_grpc.TasksStub(anonymous).ListTasks(tpb.ListTasksRequest())
            assert await _code(listing) == grpc.StatusCode.UNAUTHENTICATED

        # Metrics over HTTPS, with the same certificate.
        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        url = f"https://127.0.0.1:{server.metrics_port}/metrics"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, context=context, timeout=5).read().decode()
        )
        assert "vigil_heartbeats_total" in body
    finally:
        if daemon is not None:
            daemon.terminate()
            await asyncio.to_thread(daemon.wait, 15)
        server.stop()


def test_plaintext_off_loopback_refuses_to_start_without_insecure(tmp: Path) -> None:
    env = harness.child_env({"VIGIL_METRICS_ADDR": "127.0.0.1:0"})
    done = subprocess.run(
        harness.vigil_cmd("liveness", "serve", "--addr", "0.0.0.0:0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "vigil: error: VIGIL_ADDR 0.0.0.0:0 is not a loopback address: serve it with TLS "
        "(--tls-cert and --tls-key) or, knowing what that exposes, --insecure"
    ]


async def test_several_endpoints_over_tls_check_one_name(db_url: str, tmp: Path) -> None:
    """`VIGIL_ADDR=A:P,B:Q` over TLS: gRPC would check the certificate against the whole
    list as one name; the client checks the first address (or VIGIL_TLS_SERVER_NAME)."""
    certs = tmp / "certs"
    dev_ca(certs, "--host", "127.0.0.2", "--host", "127.0.0.3")
    server = harness.start_server_process(
        ["up", "--addr", "127.0.0.2:0", "--tls-cert", str(certs / "server.pem"),
         "--tls-key", str(certs / "server.key")],
        harness.child_env({"DATABASE_URL": db_url, "VIGIL_METRICS_ADDR": "127.0.0.1:0"}),
        tmp / "up.log",
    )  # fmt: skip
    try:
        token = harness.ADMIN_TOKENS[server.addr]
        both = f"127.0.0.2:{server.port},127.0.0.2:{server.port}"
        env = {"VIGIL_TOKEN": token, **tls_env(certs, None)}
        done = vigil_run(both, env, "chatroom", "create", "tls-room", "--role", "r=custom")
        assert done.returncode == 0, done.stderr
        # A name no certificate carries is still refused, in one line.
        done = vigil_run(
            both,
            {**env, "VIGIL_TLS_SERVER_NAME": "elsewhere.example"},
            "chatroom",
            "show",
            "tls-room",
        )
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    finally:
        server.stop()
