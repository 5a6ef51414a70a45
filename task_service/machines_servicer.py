"""gRPC adapter of the Machines service: daemons register, hold a session that
carries their commands, and report exits; people list and steer agents."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeAlias

import grpc

from vigil.core import paging
from vigil.core.auth import Authenticator, Principal
from vigil.core.auth.rules import machine_scope
from vigil.core.errors import FailedPrecondition, InvalidArgument
from vigil.core.rpc import caller, rpc
from vigil.core.vocab import CommandStatus, CommandType, DesiredState, ExitClassification
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


def _own_machine(principal: Principal, claimed: str) -> str:
    """The caller's machine (a daemon acts only for its own)."""
    assert principal.machine is not None
    if claimed:
        machine_scope(principal, claimed)
    return principal.machine


class MachinesServicer(pb_grpc.MachinesServicer):
    service_name = SERVICE_NAME

    def __init__(self, agents: Agents, auth: Authenticator) -> None:
        self.agents = agents
        self.auth = auth

    @rpc
    async def RegisterMachine(
        self, request: pb.RegisterMachineRequest, context: Ctx
    ) -> pb.RegisterMachineResponse:
        credential = await self.agents.register_machine(
            request.machine_id, request.hostname, list(request.harnesses), caller()
        )
        return pb.RegisterMachineResponse(machine_id=request.machine_id, credential=credential)

    @rpc
    async def UnregisterMachine(
        self, request: pb.UnregisterMachineRequest, context: Ctx
    ) -> pb.UnregisterMachineResponse:
        revoked, recovered = await self.agents.unregister_machine(
            request.machine_id, request.reason, caller()
        )
        return pb.UnregisterMachineResponse(
            machine_id=request.machine_id, credentials_revoked=revoked, tasks_recovered=recovered
        )

    @rpc
    async def ReportExit(self, request: pb.ExitReport, context: Ctx) -> pb.ExitAck:
        machine = _own_machine(caller(), request.machine_id)
        recorded = await self.agents.report_exit(machine, _exit(request))
        return pb.ExitAck(duplicate=not recorded)

    @rpc
    async def ListMachines(
        self, request: pb.ListMachinesRequest, context: Ctx
    ) -> pb.ListMachinesResponse:
        page = paging.page("machines", request.page_size, request.page_token)
        machines = await self.agents.list_machines(page)
        shown, token = paging.split(machines, page, lambda m: (m[0].machine_id,))
        return pb.ListMachinesResponse(
            machines=[codec.machine(m, on) for m, on in shown], next_page_token=token
        )

    @rpc
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Ctx
    ) -> pb.ListAgentsResponse:
        page = paging.page("agents", request.page_size, request.page_token)
        agents = await self.agents.list_agents(request.chatroom, page)
        shown, token = paging.split(agents, page, lambda a: (a.chatroom, a.role))
        return pb.ListAgentsResponse(agents=[codec.agent(a) for a in shown], next_page_token=token)

    @rpc
    async def ListCommands(
        self, request: pb.ListCommandsRequest, context: Ctx
    ) -> pb.ListCommandsResponse:
        page = paging.page("commands", request.page_size, request.page_token)
        commands = await self.agents.list_commands(request.machine_id, page)
        shown, token = paging.split(commands, page, lambda c: (c.id,))
        return pb.ListCommandsResponse(
            commands=[codec.command(c) for c in shown], next_page_token=token
        )

    @rpc
    async def ListExits(self, request: pb.ListExitsRequest, context: Ctx) -> pb.ListExitsResponse:
        page = paging.page("exits", request.page_size, request.page_token)
        exits = await self.agents.list_exits(request.chatroom, request.role, page)
        shown, token = paging.split(exits, page, lambda e: (e.id,))
        return pb.ListExitsResponse(
            exits=[codec.recorded_exit(e) for e in shown], next_page_token=token
        )

    @rpc
    async def StartAgent(self, request: pb.AgentRef, context: Ctx) -> pb.Agent:
        return codec.agent(
            await self.agents.set_desired(
                request.chatroom, request.role, DesiredState.RUNNING, caller()
            )
        )

    @rpc
    async def StopAgent(self, request: pb.AgentRef, context: Ctx) -> pb.Agent:
        return codec.agent(
            await self.agents.set_desired(
                request.chatroom, request.role, DesiredState.STOPPED, caller()
            )
        )

    @rpc
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
        machine = _own_machine(caller(), hello.machine_id)
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
                opened = await self.agents.open_commands(machine)
                for cmd in opened:
                    if cmd.id in sent:
                        continue
                    sent.add(cmd.id)
                    msg = codec.command(cmd)
                    if cmd.type == CommandType.START:
                        msg.agent_token = await self.agents.agent_credential(cmd)
                    await context.write(pb.ServerMessage(command=msg))
                # Pushed and closed since: a start withdrawn before it ran (a person
                # stopped the role) is pushed again, closed, so the daemon skips it.
                gone = sent - {c.id for c in opened}
                for cmd in await self.agents.closed_commands(machine, sorted(gone)):
                    sent.discard(cmd.id)
                    if cmd.type == CommandType.START and cmd.status == CommandStatus.FAILED:
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
            which = msg.WhichOneof("msg")
            if which == "received":
                # Delivered only once the daemon says it read it.
                await self.agents.mark_command(
                    machine, msg.received.command_id, CommandStatus.DELIVERED
                )
                continue
            if which != "result":
                raise FailedPrecondition(
                    "after hello, a daemon sends only received acknowledgements and results"
                )
            r = msg.result
            outcome = codec.enum(CommandStatus, r.outcome, "command result outcome")
            child = codec.child_from_pb(r.child) if r.HasField("child") and r.child.pid else None
            await self.agents.command_result(machine, r.command_id, outcome, child, r.message)
