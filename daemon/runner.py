"""The machine daemon: holds its presence, takes commands the moment they are issued,
is the single authority over its agent processes, and reports every exit durably."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Mapping
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from vigil.client import Client, ParticipantSession, RPCError
from vigil.core.aio import cancel_and_wait
from vigil.core.clock import Clock, SystemClock
from vigil.core.timefmt import from_proto, to_proto
from vigil.core.timings import Timings
from vigil.core.vocab import (
    MACHINES_CHATROOM,
    AgentKind,
    CommandStatus,
    CommandType,
    OfflineReason,
)
from vigil.daemon.children import Child, Children, Exit
from vigil.daemon.harnesses import Harnesses, Refused
from vigil.daemon.metrics import DaemonMetrics
from vigil.daemon.outbox import Outbox
from vigil.v1 import machines_pb2 as pb

log = logging.getLogger("vigil.daemon")

EXIT_OK = 0
EXIT_REFUSED = 1  # the server refused this daemon's credential
_REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# A command pushed closed: the server withdrew it.
_CLOSED = {CommandStatus.FAILED.to_pb(), CommandStatus.EXPIRED.to_pb()}


def _child_pb(c: Child) -> pb.Child:
    return pb.Child(chatroom=c.chatroom, role=c.role, pid=c.pid, started_at=to_proto(c.started_at))


class Daemon:
    def __init__(
        self,
        client: Client,
        machine_id: str,
        state_dir: Path,
        timings: Timings,
        *,
        agent_env: Mapping[str, str],
        harnesses: Harnesses,
        stop_agents_on_exit: bool = True,
        metrics: DaemonMetrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics or DaemonMetrics(CollectorRegistry())
        self.clock = clock or SystemClock()
        self.machine_id = machine_id
        self.harnesses = harnesses
        self.timings = timings
        self.stop_agents_on_exit = stop_agents_on_exit
        self.outbox = Outbox(state_dir / "outbox", self.metrics)
        self.children = Children(state_dir, agent_env, self._exited, self.clock)
        self._stopping = asyncio.Event()
        self.exit_code = EXIT_OK
        self._running: set[asyncio.Task[None]] = set()
        # Starts the server withdrew before they ran (a person stopped the role while
        # the start waited its turn behind a stop): never run.
        self._withdrawn: set[int] = set()

    def _exited(self, ex: Exit) -> None:
        c = ex.child
        self.metrics.exits.labels(ex.classification).inc()
        self.metrics.children.set(len(self.children.running))
        self.outbox.add(
            pb.ExitReport(
                machine_id=self.machine_id,
                child=_child_pb(c),
                has_exit_code=ex.exit_code is not None,
                exit_code=ex.exit_code or 0,
                signal=ex.signal or 0,
                exited_at=to_proto(ex.exited_at),
                classification=ex.classification.to_pb(),
            )
        )

    def refused(self, why: str) -> None:
        """The server does not accept this daemon: stop, and exit non-zero."""
        log.error("the server refused this daemon: %s", why)
        self.exit_code = EXIT_REFUSED
        self._stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        for ex in self.children.adopt():
            self._exited(ex)  # gone while the daemon was away: report them
        presence = self.client.session(
            MACHINES_CHATROOM,
            self.machine_id,
            AgentKind.REMOTE,
            say=lambda line: log.info("presence: %s", line),
        )
        tasks = [
            asyncio.create_task(self.outbox.run(self.client, self.machine_id)),
            asyncio.create_task(self._sessions()),
            asyncio.create_task(self._presence(presence)),
        ]
        await self._stopping.wait()
        if self.exit_code == EXIT_OK:
            log.info(
                "stopping: %s",
                "stopping agents" if self.stop_agents_on_exit else "leaving agents running",
            )
            if self.stop_agents_on_exit:
                await asyncio.gather(*(self.children.stop(k) for k in list(self.children.running)))
            # Give the exit reports of the agents we stopped a moment to be delivered.
            for _ in range(40):
                if not self.outbox.pending():
                    break
                await asyncio.sleep(0.05)
        presence.stop(OfflineReason.LEFT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(tasks[2]), 2)
        for t in tasks:
            await cancel_and_wait(t)
        return self.exit_code

    async def _presence(self, presence: ParticipantSession) -> None:
        while not self._stopping.is_set():
            try:
                await presence.run()
                return
            except RPCError as exc:
                if exc.code in _REFUSED:
                    self.refused(exc.message)
                    return
                log.warning("presence: %s; retrying", exc)  # unreachable: we are a daemon
                await asyncio.sleep(1)

    async def _sessions(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _REFUSED:
                    self.refused(exc.details() or exc.code().name)
                    return
                attempt += 1
                log.info("daemon session: %s; reconnecting", exc.code().name)
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1))

    async def _session(self) -> None:
        # Exits recorded while we were away go first: reconciliation below would
        # otherwise record those agents as merely lost (daemon_lost), losing their
        # exit code and signal.
        await self.outbox.send_pending(self.client, self.machine_id)
        call = self.client.daemon_session()
        try:
            # Reconcile: the full list of the children we still run.
            await call.write(
                pb.DaemonMessage(
                    hello=pb.DaemonMessage.Hello(
                        machine_id=self.machine_id,
                        children=[_child_pb(c) for c in self.children.running.values()],
                    )
                )
            )
            welcome = await call.read()
            if welcome is grpc.aio.EOF:
                return
            log.info("session open (reconciled, %d marked lost)", welcome.welcome.reconciled_lost)
            done: set[int] = set()
            writing = asyncio.Lock()  # one write at a time on a stream
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                if msg.WhichOneof("msg") == "command" and msg.command.status in _CLOSED:
                    self._withdrawn.add(msg.command.id)
                    continue
                if msg.WhichOneof("msg") == "command" and msg.command.id not in done:
                    done.add(msg.command.id)
                    task = asyncio.create_task(self._execute(call, writing, msg.command))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
        finally:
            call.cancel()

    async def _execute(
        self, call: grpc.aio.StreamStreamCall, writing: asyncio.Lock, cmd: pb.Command
    ) -> None:
        key = (cmd.chatroom, cmd.role)
        kind = CommandType.from_pb(cmd.type)
        async with writing:  # read: the server shows it delivered
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(
                    pb.DaemonMessage(received=pb.DaemonMessage.Received(command_id=cmd.id))
                )
        result = pb.DaemonMessage.CommandResult(command_id=cmd.id)
        async with self.children.lock(key):  # one spawn lock per (chatroom, role)
            if self.clock.now() > from_proto(cmd.deadline_at):
                result.outcome = CommandStatus.EXPIRED.to_pb()
                result.message = "arrived after its deadline; not executed"
                log.warning("command %d (%s %s/%s) expired", cmd.id, kind, *key)
            elif kind == CommandType.STOP:
                await self.children.stop(key)
                result.outcome = CommandStatus.DONE.to_pb()
            elif cmd.id in self._withdrawn:
                log.info("command %d (start %s/%s) was withdrawn: not run", cmd.id, *key)
                return
            else:
                child = self.children.running.get(key)
                what = cmd.harness or cmd.command
                try:
                    if child is None:
                        # The exit of the role's previous process is reported before
                        # its next start is: nobody sees the new pid while the old one's
                        # exit is still on its way. (If the server cannot be reached,
                        # the report goes first on the next session.)
                        await self.outbox.send_pending(self.client, self.machine_id)
                        argv = self.harnesses.argv(cmd.harness, cmd.command)
                        child = await self.children.spawn(
                            cmd.chatroom, cmd.role, argv, cmd.agent_token
                        )
                    result.outcome = CommandStatus.DONE.to_pb()
                    result.child.CopyFrom(_child_pb(child))
                except Refused as exc:
                    result.outcome = CommandStatus.FAILED.to_pb()
                    result.message = f"refused: {exc}"
                    log.error("command %d (%s/%s): %s", cmd.id, *key, result.message)
                except OSError as exc:
                    result.outcome = CommandStatus.FAILED.to_pb()
                    result.message = f"cannot start {what!r}: {exc.strerror or exc}"
                    log.error("command %d (%s/%s): %s", cmd.id, *key, result.message)
        outcome = CommandStatus.from_pb(result.outcome)
        self.metrics.commands.labels(kind, outcome).inc()
        self.metrics.children.set(len(self.children.running))
        # A result lost with its stream is not lost: on reconnect the server hands the
        # still-open command over again, and running it again is idempotent.
        async with writing:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(pb.DaemonMessage(result=result))
