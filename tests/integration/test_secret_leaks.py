"""No secret leaks: with a real server and daemon logging at DEBUG, a daemon-run agent,
and the CLI used for everything (successes and refusals), no token or credential value
appears in any log, argv of a spawned agent, CLI output or error, `/metrics`, or a
daemon's state files — except the one `vigil token create` that prints its new secret,
and the owner-only files that hold them."""

from __future__ import annotations

import asyncio
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.core.auth.principal import parse

# Spawns real processes (servers, agents, daemons, the CLI): not in `make test-fast`.
pytestmark = pytest.mark.slow


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _pieces(token: str) -> set[str]:
    """Every 16-character run of a token's secret part: a truncated leak is a leak."""
    parsed = parse(token)
    assert parsed is not None, "not a token"
    secret = parsed[1]
    return {secret[i : i + 16] for i in range(len(secret) - 15)}


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def test_no_secret_appears_anywhere_it_should_not(db_url: str, tmp: Path) -> None:
    seen: dict[str, str] = {}  # where -> what it showed

    env = harness.child_env(
        {
            "DATABASE_URL": db_url,
            "VIGIL_METRICS_ADDR": "127.0.0.1:0",
            "VIGIL_LOG_LEVEL": "DEBUG",
            "VIGIL_BOOTSTRAP_TOKEN": "",  # it makes its own admin token
        }
    )
    server = harness.start_server_process(["up", "--addr", "127.0.0.1:0"], env, tmp / "up.log")
    addr = server.addr
    admin = harness.ADMIN_TOKENS[addr]
    secrets = {"admin": admin}
    daemon_env = {"VIGIL_ADDR": addr, "VIGIL_LOG_LEVEL": "DEBUG", "VIGIL_DATA_DIR": str(tmp)}
    daemon: subprocess.Popen[bytes] | None = None

    def cli(*args: str, token: str | None = None, ok: bool = True) -> str:
        extra = {"VIGIL_ADDR": addr, "VIGIL_DATA_DIR": str(tmp)}
        if token is not None:
            extra["VIGIL_TOKEN"] = token
        done = subprocess.run(
            harness.vigil_cmd(*args),
            env=harness.child_env(extra),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp,
        )
        assert (done.returncode == 0) == ok, (args, done.stderr)
        seen[f"vigil {' '.join(args)}"] = done.stdout + done.stderr
        return done.stdout

    try:
        cli("machine", "register", "--machine-id", "m1", "--harness", "work")
        credential_file = tmp / "machines" / "m1.credential"
        secrets["machine"] = credential_file.read_text().split('"credential": "')[1].split('"')[0]
        harness.write_harness_file(tmp / "machines" / "m1.harnesses.toml")
        daemon = subprocess.Popen(
            harness.vigil_cmd(
                "daemon", "start", "--machine-id", "m1", "--metrics-addr", "127.0.0.1:0"
            ),
            env=harness.child_env(daemon_env),
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "daemon.log").open("wb"),
        )
        cli("chatroom", "create", "room", "--role", "builder=remote:m1:work", "--role", "r=custom")
        created = subprocess.run(
            harness.vigil_cmd("token", "create", "--chatroom", "room", "--name", "ci"),
            env=harness.child_env({"VIGIL_ADDR": addr, "VIGIL_TOKEN": admin}),
            capture_output=True,
            text=True,
            check=True,
        )
        secrets["chatroom"] = created.stdout.strip()  # the one place a secret is shown
        assert parse(secrets["chatroom"]) is not None and not created.stderr
        cli("send", "--chatroom", "room", "--role", "builder", "build it")

        async def agent_pid() -> int:
            for line in cli("agents", "--chatroom", "room").splitlines()[1:]:
                cells = line.split()
                if cells[1] == "builder" and cells[5].isdigit():
                    return int(cells[5])
            return 0

        pid = await harness.wait_for(agent_pid, 30, what="the agent running")
        secrets["agent"] = environ(pid)["VIGIL_TOKEN"]
        seen["agent argv"] = cmdline(pid)

        # Refusals and listings, with each kind of credential.
        cli("chatroom", "create", "x", "--role", "a=custom", token=secrets["chatroom"], ok=False)
        cli("chatrooms", token=admin[:-4] + "AAAA", ok=False)  # forged
        cli("send", "--chatroom", "other", "--role", "r", "hi", token=secrets["agent"], ok=False)
        cli("token", "revoke", "0" * 16, ok=False)
        cli("chatrooms", token="not-a-token", ok=False)
        for args in (
            ("token", "list", "--all", "--json"),
            ("machines", "--json"),
            ("commands", "--json"),
            ("agents", "--json"),
            ("participants", "--json"),
            ("tasks", "--json"),
            ("notifications", "--json"),
        ):
            cli(*args)
        token_id = parse(secrets["chatroom"])
        assert token_id is not None
        cli("token", "revoke", token_id[0], "--reason", "rotated")
        cli("chatrooms", token=secrets["chatroom"], ok=False)  # revoked

        found = re.search(r"metrics http://127.0.0.1:(\d+)/", (tmp / "daemon.log").read_text())
        assert found, (tmp / "daemon.log").read_text()
        for port, name in ((server.metrics_port, "server"), (int(found.group(1)), "daemon")):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                seen[f"{name} /metrics"] = r.read().decode()
    finally:
        if daemon is not None:
            daemon.terminate()
            await asyncio.to_thread(daemon.wait, 15)
        server.stop()

    seen["server log"] = (tmp / "up.log").read_text(errors="replace")
    seen["daemon log"] = (tmp / "daemon.log").read_text(errors="replace")
    for path in (tmp / "daemon").rglob("*"):
        if path.is_file():
            seen[f"daemon state {path.name}"] = path.read_text(errors="replace")
    assert "DEBUG" in seen["server log"] and "DEBUG" in seen["daemon log"]  # it said a lot
    assert len(seen) > 15
    leaks = [
        f"{kind} secret in {where}"
        for where, text in seen.items()
        for kind, secret in secrets.items()
        if any(piece in text for piece in _pieces(secret))
    ]
    assert not leaks, "\n".join(leaks)
