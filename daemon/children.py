"""The agent processes this daemon runs: spawned one per (chatroom, role) under a
spawn lock, watched until they exit, stopped with SIGTERM then SIGKILL, and recorded
on disk so a restarted daemon finds the ones still running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from vigil.core.clock import Clock
from vigil.core.vocab import ExitClassification
from vigil.daemon import proc

log = logging.getLogger(__name__)

Key = tuple[str, str]
# The daemon's own credentials: never inherited by the agents it starts.
_DAEMON_SECRETS = frozenset({"VIGIL_TOKEN", "VIGIL_TOKEN_FILE", "VIGIL_TLS_CERT", "VIGIL_TLS_KEY"})


@dataclass
class Child:
    chatroom: str
    role: str
    pid: int
    started_at: datetime
    log_path: str
    stopping: bool = False  # told to stop: its exit is intentional
    exited: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Exit:
    child: Child
    exit_code: int | None  # None: unknown (an adopted process, not our child any more)
    signal: int | None
    exited_at: datetime
    classification: ExitClassification


def classify(
    stopping: bool, returncode: int | None
) -> tuple[ExitClassification, int | None, int | None]:
    """(classification, exit code, signal) in the order that matters (lesson 4):
    intentional (we were told to stop it) > signal > exited_ok (code 0) > crashed.
    `returncode` None means unknown (a process we adopted and can no longer wait for)."""
    if returncode is None:
        what = ExitClassification.INTENTIONAL if stopping else ExitClassification.CRASHED
        return what, None, None
    sig = -returncode if returncode < 0 else None
    code = returncode if returncode >= 0 else None
    if stopping:
        return ExitClassification.INTENTIONAL, code, sig
    if sig is not None:
        return ExitClassification.SIGNAL, None, sig
    if code == 0:
        return ExitClassification.EXITED_OK, code, None
    return ExitClassification.CRASHED, code, None


class Children:
    def __init__(
        self,
        state_dir: Path,
        agent_env: Mapping[str, str],
        on_exit: Callable[[Exit], None],
        clock: Clock,
        stop_grace_s: float = 5.0,
    ) -> None:
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._file = state_dir / "children.json"
        self._agent_env = dict(agent_env)
        self._clock = clock
        self._on_exit = on_exit
        self._grace = stop_grace_s
        self._locks: dict[Key, asyncio.Lock] = {}
        self.running: dict[Key, Child] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def lock(self, key: Key) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _save(self) -> None:
        data = [
            {
                "chatroom": c.chatroom,
                "role": c.role,
                "pid": c.pid,
                "started_at": c.started_at.timestamp(),
                "log": c.log_path,
            }
            for c in self.running.values()
        ]
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._file)

    def adopt(self) -> list[Exit]:
        """After a daemon restart: keep watching the recorded children still running;
        those gone while we were away are returned as exits of unknown status."""
        gone: list[Exit] = []
        if not self._file.exists():
            return gone
        for d in json.loads(self._file.read_text()):
            started = datetime.fromtimestamp(d["started_at"], UTC)
            child = Child(d["chatroom"], d["role"], d["pid"], started, d["log"])
            if proc.same_process(child.pid, started):
                self.running[(child.chatroom, child.role)] = child
                self._watch_adopted(child)
            else:
                gone.append(Exit(child, None, None, self._clock.now(), ExitClassification.CRASHED))
        self._save()
        return gone

    async def spawn(self, chatroom: str, role: str, argv: list[str], token: str = "") -> Child:
        """Start `argv` for the role, its own credential `token` in its environment."""
        log_path = self.logs / f"{chatroom}--{role}.log"
        # Where Vigil is and who the agent is, in its environment (never its argv):
        # `vigil wait-for-task` and the client library read these with no flags.
        env = {
            **{k: v for k, v in os.environ.items() if k not in _DAEMON_SECRETS},
            **self._agent_env,
            "VIGIL_CHATROOM": chatroom,
            "VIGIL_ROLE": role,
            "VIGIL_KIND": "remote",
        }
        if token:
            env["VIGIL_TOKEN"] = token
        with open(log_path, "ab") as out:  # noqa: ASYNC230  # a local file, handed to the child
            p = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # its own group: it outlives a killed daemon
            )
        started = proc.start_time(p.pid) or self._clock.now()
        child = Child(chatroom, role, p.pid, started, str(log_path))
        self.running[(chatroom, role)] = child
        self._save()
        task = asyncio.create_task(self._wait(child, p))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        log.info("started %s/%s: pid %d (%s)", chatroom, role, p.pid, argv[0])
        return child

    async def _wait(self, child: Child, p: asyncio.subprocess.Process) -> None:
        returncode = await p.wait()
        self._exited(child, returncode)

    def _watch_adopted(self, child: Child) -> None:
        """Not our child any more (we restarted): a pidfd says when it exits."""
        try:
            fd = os.pidfd_open(child.pid)
        except ProcessLookupError:
            self._exited(child, None)
            return
        loop = asyncio.get_running_loop()

        def on_exit() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self._exited(child, None)

        loop.add_reader(fd, on_exit)

    def _exited(self, child: Child, returncode: int | None) -> None:
        key = (child.chatroom, child.role)
        if self.running.get(key) is child:
            del self.running[key]
            self._save()
        classification, code, sig = classify(child.stopping, returncode)
        child.exited.set()
        log.info(
            "%s/%s pid %d exited: %s (code %s, signal %s)",
            child.chatroom,
            child.role,
            child.pid,
            classification,
            code,
            sig,
        )
        self._on_exit(Exit(child, code, sig, self._clock.now(), classification))

    async def stop(self, key: Key) -> None:
        """SIGTERM, then SIGKILL after the grace; a process already gone is fine."""
        child = self.running.get(key)
        if child is None:
            return
        child.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(child.exited.wait(), self._grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            await asyncio.wait_for(child.exited.wait(), 10)
