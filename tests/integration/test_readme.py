"""The README's examples work as written: the Python agent, run from a wheel built from
a clean checkout and installed in a fresh virtualenv with no source tree, takes a task,
starts and completes it; and the remote-role example, run line by line in a shell,
has its task completed by the agent the daemon starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from vigil import testing as harness
from vigil.core.vocab import TaskStatus, TokenKind

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def readme_block(marker: str) -> str:
    """The fenced code block right after `<!-- example:MARKER … -->`."""
    m = re.search(rf"<!-- example:{marker}\b[^>]*-->\s*```\w*\n(.*?)```", README, re.S)
    assert m, f"README has no example:{marker} block"
    return m.group(1)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with Vigil installed from a wheel built from `git archive HEAD`
    (the generated code comes from the build, not from this tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # The same script builds and installs the container image's wheel (deploy/Dockerfile):
    # it checks the source holds no generated code and the wheel installs only `vigil`.
    script = ROOT / "deploy" / "wheel.sh"
    dist = tmp / "dist"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(script), "build", str(dist)], check=True, timeout=600, env=env)
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(script), "install", str(py), str(dist)], check=True, timeout=900)
    yield env_dir


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """No PYTHONPATH, no VIGIL_* of ours: only what the example is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env.pop("PYTHONPATH", None)
    env.update(harness.FAST_ENV)
    env.update(extra)
    return env


async def _wait_completed(addr: str, task_id: str, timeout: float = 60) -> None:
    async with harness.client(addr) as client:

        async def done() -> bool:
            return (await client.get_task(task_id)).status == TaskStatus.COMPLETED.to_pb()

        await harness.wait_for(done, timeout, interval=0.1, what=f"task {task_id} completed")


async def test_the_readme_agent_runs_from_an_installed_wheel(
    wheel_venv: Path, db_url: str, tmp: Path
) -> None:
    py = wheel_venv / "bin" / "python"
    # The wheel installs only Vigil-owned import names, and no source tree is in sight.
    where = subprocess.run(
        [str(py), "-c", "import vigil, vigil.client, vigil.v1.tasks_pb2; print(vigil.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=_clean_env({}),
        check=True,
    ).stdout.strip()
    assert str(wheel_venv) in where
    top = {p.name for p in (wheel_venv / "lib").glob("python3*/site-packages/*")}
    assert {"cli", "daemon", "liveness_service", "task_service"}.isdisjoint(top)

    agent_py = tmp / "agent.py"
    agent_py.write_text(readme_block("agent"))
    async with harness.local_server(db_url, harness.fast_timings()) as srv:
        await harness.make_room(srv, "demo", "reviewer")
        # Away from the server's host an agent runs with a token of its own scope, as
        # the README says: `vigil token create --chatroom demo --role reviewer`.
        async with harness.client(srv.addr) as admin:
            made = await admin.create_token(
                TokenKind.CHATROOM, "reviewer", chatroom="demo", role="reviewer"
            )
        token_file = tmp / "reviewer.token"
        token_file.write_text(made.secret + "\n")
        token_file.chmod(0o600)
        out = tmp / "agent.out"
        proc = subprocess.Popen(
            [str(py), str(agent_py)],
            cwd=tmp,
            env=_clean_env(
                {
                    "VIGIL_ADDR": srv.addr,
                    "VIGIL_CHATROOM": "demo",
                    "VIGIL_ROLE": "reviewer",
                    "VIGIL_TOKEN_FILE": str(token_file),
                }
            ),
            stdout=out.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            await harness.wait_live(db_url, "demo", "reviewer")
            task = await srv.tasks.svc.send(
                "demo", "reviewer", "review the release notes", harness.ADMIN
            )
            await _wait_completed(srv.addr, task.id)
            assert "working on 'review the release notes'" in out.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 15)
        assert rc == 0, out.read_text()
        row = await harness.wait_offline(db_url, "demo", "reviewer")
        assert row["offline_reason"] == "signal"  # it left, with its reason


async def test_the_readme_remote_role_example_runs_as_written(db_url: str, tmp: Path) -> None:
    lines = [ln for ln in readme_block("remote").splitlines() if ln.strip()]
    bin_dir = Path(sys.executable).parent
    env = harness.child_env({"DATABASE_URL": db_url, "VIGIL_METRICS_ADDR": "127.0.0.1:0"})
    # The server writes its admin token into ./.vigil; the README's commands, run in
    # the same folder, find it by themselves (no token in their environment).
    server = harness.start_server_process(
        ["up", "--addr", "127.0.0.1:0"], {**env, "VIGIL_BOOTSTRAP_TOKEN": ""}, tmp / "up.log"
    )
    assert (tmp / ".vigil" / "admin.token").stat().st_mode & 0o077 == 0
    shell_env = harness.child_env(
        {"VIGIL_ADDR": server.addr, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    )
    shell_env.pop("VIGIL_TOKEN")
    # Every line but the last (which only looks): as written, in one shell, in a new
    # session so the daemon it puts in the background can be stopped with it.
    script = "set -e\n" + "\n".join(lines[:-1]) + "\n"
    log = tmp / "shell.log"  # a file, not a pipe: the daemon in the background keeps it
    shell = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp,
        env=shell_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        rc = await asyncio.to_thread(shell.wait, 60)
        out = log.read_text()
        assert rc == 0, out
        sent = [ln for ln in out.splitlines() if " team/builder " in ln]
        assert sent, out
        task_id = sent[-1].split()[0]
        await _wait_completed(server.addr, task_id)
        looked = subprocess.run(
            ["bash", "-c", lines[-1]], cwd=tmp, env=shell_env, capture_output=True, text=True
        )
        assert f"{task_id}" in looked.stdout and "completed" in looked.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGTERM)  # the daemon stops its agent on the way out
        await asyncio.sleep(1)
        server.stop()


def test_the_installed_wheel_runs_the_two_minute_tour(wheel_venv: Path, tmp: Path) -> None:
    """From the wheel alone, in a folder with no source tree: `vigil up` (its embedded
    PostgreSQL), `chatroom create`, `wait-for-task`, `send` — the task arrives; the
    local CLI finds the bootstrap token by itself."""
    vigil = str(wheel_venv / "bin" / "vigil")
    here = tmp / "fresh"
    here.mkdir()
    env = _clean_env(
        {
            "VIGIL_ADDR": f"127.0.0.1:{harness.free_port()}",
            "VIGIL_METRICS_ADDR": f"127.0.0.1:{harness.free_port()}",
        }
    )
    env.pop("DATABASE_URL", None)

    def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [vigil, *args], cwd=here, env=env, capture_output=True, text=True, timeout=timeout
        )

    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip(), version
    up = subprocess.Popen(
        [vigil, "up"], cwd=here, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        while (listed := run("chatrooms")).returncode != 0:
            assert up.poll() is None, up.communicate()[0]
            assert time.monotonic() < deadline, listed.stderr
            time.sleep(0.3)
        made = run("chatroom", "create", "demo", "--role", "reviewer=custom")
        assert made.returncode == 0, made.stderr
        waiter = subprocess.Popen(
            [vigil, "wait-for-task", "--chatroom", "demo", "--role", "reviewer", "--json"],
            cwd=here,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while "reviewer" not in (seen := run("participants", "--chatroom", "demo")).stdout:
                assert waiter.poll() is None, waiter.communicate()
                assert time.monotonic() < deadline, seen
                time.sleep(0.2)
            sent = run("send", "--chatroom", "demo", "--role", "reviewer", "ship it")
            assert sent.returncode == 0, sent.stderr
            out, err = waiter.communicate(timeout=30)
        finally:
            if waiter.poll() is None:
                waiter.kill()
        assert waiter.returncode == 0, err
        assert json.loads(out)["text"] == "ship it"
        # What the process runs, for a fleet's dashboards: the same version as --version.
        page = urllib.request.urlopen(f"http://{env['VIGIL_METRICS_ADDR']}/metrics").read()
        info = re.search(r"^vigil_build_info\{([^}]*)\} 1\.0$", page.decode(), re.M)
        assert info is not None, "no vigil_build_info"
        assert f'version="{version.stdout.split()[-1]}"' in info.group(1), info.group(1)
    finally:
        up.send_signal(signal.SIGTERM)
        rc = up.wait(60)
    assert rc == 0, up.communicate()[0]
