"""gRPC adapter of the Machines service: daemons register, hold a session that
carries their commands, and report exits; people list and steer agents."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeAlias

import grpc

from vigil.core.errors import FailedPrecondition, InvalidArgument, grpc_errors
from vigil.core.vocab import CommandStatus, DesiredState, ExitClassification
from vigil.task_service import codec
from vigil.task_service.agents import Agents
from vigil.task_service.model import Exit
from vigil.v1 import machines_pb2 as pb
from vigil.v1 import machines_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Machines"].full_name
Ctx: TypeAlias = grpc.aio.ServicerContext
SESSION_RECHECK_S = 5.0


def _exit(request: pb.ExitReport) -> Exit:
    classification = codec.enum(ExitClassification, request.classification, "classification")
    if classification == ExitClassification.DAEMON_LOST:
        raise InvalidArgument("daemon_lost is the server's to record, not a daemon's")
    return Exit(
        codec.child_from_pb(request.child),
        request.exit_code if request.has_exit_code else None,
        request.signal or None,
        codec.timestamp(request, "exited_at"),
        classification,
    )


class MachinesServicer(pb_grpc.MachinesServicer):
    def __init__(self, agents: Agents) -> None:
        self.agents = agents

    @grpc_errors
    async def RegisterMachine(
        self, request: pb.RegisterMachineRequest, context: Ctx
    ) -> pb.RegisterMachineResponse:
        credential = await self.agents.register_machine(
            request.machine_id, request.hostname, list(request.harnesses)
        )
        return pb.RegisterMachineResponse(machine_id=request.machine_id, credential=credential)

    @grpc_errors
    async def ReportExit(self, request: pb.ExitReport, context: Ctx) -> pb.ExitAck:
        machine = await self.agents.authenticate(request.machine_id, request.credential)
        recorded = await self.agents.report_exit(machine, _exit(request))
        return pb.ExitAck(duplicate=not recorded)

    @grpc_errors
    async def ListMachines(
        self, request: pb.ListMachinesRequest, context: Ctx
    ) -> pb.ListMachinesResponse:
        machines = await self.agents.list_machines()
        return pb.ListMachinesResponse(machines=[codec.machine(m, on) for m, on in machines])

    @grpc_errors
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Ctx
    ) -> pb.ListAgentsResponse:
        agents = await self.agents.list_agents(request.chatroom)
        return pb.ListAgentsResponse(agents=[codec.agent(a) for a in agents])

    @grpc_errors
    async def ListCommands(
        self, request: pb.ListCommandsRequest, context: Ctx
    ) -> pb.ListCommandsResponse:
        commands = await self.agents.list_commands(request.machine_id, request.limit)
        return pb.ListCommandsResponse(commands=[codec.command(c) for c in commands])

    @grpc_errors
    async def ListExits(self, request: pb.ListExitsRequest, context: Ctx) -> pb.ListExitsResponse:
        exits = await self.agents.list_exits(request.chatroom, request.role, request.limit)
        return pb.ListExitsResponse(exits=[codec.recorded_exit(e) for e in exits])

    @grpc_errors
    async def StartAgent(self, request: pb.AgentRef, context: Ctx) -> pb.Agent:
        return codec.agent(
            await self.agents.set_desired(request.chatroom, request.role, DesiredState.RUNNING)
        )

    @grpc_errors
    async def StopAgent(self, request: pb.AgentRef, context: Ctx) -> pb.Agent:
        return codec.agent(
            await self.agents.set_desired(request.chatroom, request.role, DesiredState.STOPPED)
        )

    @grpc_errors
    async def DaemonSession(  # type: ignore[override]  # read/write style
        self, request_iterator: object, context: Ctx
    ) -> None:
        """hello (with the children the daemon runs) -> welcome, then commands pushed
        as they are issued; the daemon answers each with a result. One task writes
        (this one); the results are read by another and never write."""
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("msg") != "hello":
            raise FailedPrecondition("the first DaemonSession message must be hello")
        hello = first.hello
        machine = await self.agents.authenticate(hello.machine_id, hello.credential)
        children = [codec.child_from_pb(c) for c in hello.children]
        lost = await self.agents.reconcile(machine, children)
        await context.write(
            pb.ServerMessage(welcome=pb.ServerMessage.Welcome(reconciled_lost=lost))
        )
        woken = asyncio.Event()
        self.agents.sessions.setdefault(machine, set()).add(woken)
        reader = asyncio.create_task(self._results(machine, context))
        sent: set[int] = set()
        try:
            while not reader.done():
                woken.clear()
                for cmd in await self.agents.open_commands(machine):
                    if cmd.id in sent:
                        continue
                    sent.add(cmd.id)
                    if cmd.status == CommandStatus.PENDING:
                        await self.agents.mark_command(machine, cmd.id, CommandStatus.DELIVERED)
                    await context.write(pb.ServerMessage(command=codec.command(cmd)))
                waits: set[asyncio.Future[Any]] = {reader, asyncio.ensure_future(woken.wait())}
                _done, pending = await asyncio.wait(
                    waits, timeout=SESSION_RECHECK_S, return_when=asyncio.FIRST_COMPLETED
                )
                for p in pending:
                    if p is not reader:
                        p.cancel()
            reader.result()  # a malformed result ends the session with its status
        finally:
            self.agents.sessions[machine].discard(woken)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _results(self, machine: str, context: Ctx) -> None:
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("msg") != "result":
                raise FailedPrecondition("after hello, a daemon sends only command results")
            r = msg.result
            outcome = codec.enum(CommandStatus, r.outcome, "command result outcome")
            child = codec.child_from_pb(r.child) if r.HasField("child") and r.child.pid else None
            await self.agents.command_result(machine, r.command_id, outcome, child, r.message)
