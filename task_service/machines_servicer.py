"""gRPC adapter of the Machines service: daemons register, hold a session that
carries their commands, and report exits; people list and steer agents."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any, TypeAlias

import grpc

from vigil.core import validation
from vigil.core.errors import FailedPrecondition, InvalidArgument, VigilError, grpc_errors
from vigil.core.timefmt import from_proto
from vigil.task_service.agents import Agents, ChildInfo, ExitInfo
from vigil.v1 import machines_pb2 as pb
from vigil.v1 import machines_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Machines"].full_name
Ctx: TypeAlias = grpc.aio.ServicerContext

_CLASS = {
    pb.EXIT_CLASSIFICATION_INTENTIONAL: "intentional",
    pb.EXIT_CLASSIFICATION_SIGNAL: "signal",
    pb.EXIT_CLASSIFICATION_EXITED_OK: "exited_ok",
    pb.EXIT_CLASSIFICATION_CRASHED: "crashed",
}
_TYPE = {"start": pb.COMMAND_TYPE_START, "stop": pb.COMMAND_TYPE_STOP}
SESSION_RECHECK_S = 5.0


def _child(c: pb.Child) -> ChildInfo:
    validation.name(c.chatroom, "child chatroom")
    validation.name(c.role, "child role")
    validation.positive(c.pid, "child pid")
    if not c.HasField("started_at"):
        raise InvalidArgument("child started_at is required (it identifies the incarnation)")
    return ChildInfo(c.chatroom, c.role, c.pid, from_proto(c.started_at))


def _ts(msg: Any, field: str, value: datetime | None) -> None:
    if value is not None:
        getattr(msg, field).FromDatetime(value)


def command(row: Any) -> pb.Command:
    msg = pb.Command(
        id=row["id"],
        type=_TYPE[row["type"]],
        chatroom=row["chatroom"],
        role=row["role"],
        command=row["command"] or "",
        status=row["status"],
        machine_id=row["machine_id"],
        reason=row["reason"],
    )
    _ts(msg, "deadline_at", row["deadline_at"])
    _ts(msg, "created_at", row["created_at"])
    return msg


def agent(row: Any) -> pb.Agent:
    msg = pb.Agent(
        chatroom=row["chatroom"],
        role=row["role"],
        machine_id=row["machine_id"],
        desired_state=row["desired_state"],
        status=row["status"],
        pid=row["pid"] or 0,
        restart_count=row["restart_count"],
        has_last_exit=row["last_exit_at"] is not None,
        last_exit_code=row["last_exit_code"] or 0,
        last_exit_signal=row["last_exit_signal"] or 0,
        last_exit_classification=row["last_exit_classification"] or "",
    )
    _ts(msg, "last_exit_at", row["last_exit_at"])
    _ts(msg, "next_restart_at", row["next_restart_at"])
    return msg


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
        classification = _CLASS.get(request.classification)
        if classification is None:
            raise InvalidArgument("classification is required")
        if not request.HasField("exited_at"):
            raise InvalidArgument("exited_at is required")
        ex = ExitInfo(
            _child(request.child),
            request.exit_code if request.has_exit_code else None,
            request.signal or None,
            from_proto(request.exited_at),
            classification,
        )
        recorded = await self.agents.report_exit(machine, ex)
        return pb.ExitAck(duplicate=not recorded)

    @grpc_errors
    async def ListMachines(
        self, request: pb.ListMachinesRequest, context: Ctx
    ) -> pb.ListMachinesResponse:
        out = []
        for row, online in await self.agents.list_machines():
            m = pb.Machine(
                machine_id=row["machine_id"],
                hostname=row["hostname"],
                harnesses=list(row["harnesses"]),
                online=online,
            )
            m.registered_at.FromDatetime(row["registered_at"])
            out.append(m)
        return pb.ListMachinesResponse(machines=out)

    @grpc_errors
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Ctx
    ) -> pb.ListAgentsResponse:
        return pb.ListAgentsResponse(
            agents=[agent(r) for r in await self.agents.list_agents(request.chatroom)]
        )

    @grpc_errors
    async def ListCommands(
        self, request: pb.ListCommandsRequest, context: Ctx
    ) -> pb.ListCommandsResponse:
        rows = await self.agents.list_commands(request.machine_id, request.limit)
        return pb.ListCommandsResponse(commands=[command(r) for r in rows])

    @grpc_errors
    async def StartAgent(self, request: pb.AgentRef, context: Ctx) -> pb.Agent:
        return agent(await self.agents.set_desired(request.chatroom, request.role, "running"))

    @grpc_errors
    async def StopAgent(self, request: pb.AgentRef, context: Ctx) -> pb.Agent:
        return agent(await self.agents.set_desired(request.chatroom, request.role, "stopped"))

    async def DaemonSession(  # type: ignore[override]  # read/write style
        self, request_iterator: object, context: Ctx
    ) -> None:
        """hello (with the children the daemon runs) -> welcome, then commands pushed
        as they are issued; the daemon answers each with a result."""
        try:
            first = await context.read()
            if first is grpc.aio.EOF:
                return
            if first.WhichOneof("msg") != "hello":
                raise FailedPrecondition("the first DaemonSession message must be hello")
            hello = first.hello
            machine = await self.agents.authenticate(hello.machine_id, hello.credential)
            lost = await self.agents.reconcile(machine, [_child(c) for c in hello.children])
        except VigilError as exc:
            await context.abort(exc.code, str(exc))
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
                for row in await self.agents.open_commands(machine):
                    if row["id"] in sent:
                        continue
                    sent.add(row["id"])
                    if row["status"] == "pending":
                        await self.agents.mark_command(machine, row["id"], "delivered")
                    await context.write(pb.ServerMessage(command=command(row)))
                waits: set[asyncio.Future[Any]] = {reader, asyncio.ensure_future(woken.wait())}
                _done, pending = await asyncio.wait(
                    waits, timeout=SESSION_RECHECK_S, return_when=asyncio.FIRST_COMPLETED
                )
                for p in pending:
                    if p is not reader:
                        p.cancel()
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
                continue
            r = msg.result
            child = _child(r.child) if r.HasField("child") and r.child.pid else None
            await self.agents.command_result(machine, r.command_id, r.outcome, child, r.message)
