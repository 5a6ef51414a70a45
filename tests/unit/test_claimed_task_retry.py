"""`ClaimedTask.start`/`complete` across a failover: a call that failed in transit is
repeated (the attempt fences it); a repeat refused because the first call had taken
effect is success; a real refusal still reaches the agent."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from vigil.client import ClaimedTask, RPCError
from vigil.client._errors import from_grpc
from vigil.core.vocab import TaskStatus
from vigil.v1 import tasks_pb2 as tpb

GONE = RPCError(grpc.StatusCode.UNAVAILABLE, "Stream removed (ping timeout)")
REFUSED = RPCError(grpc.StatusCode.FAILED_PRECONDITION, "task is in_progress")


class FakeClient:
    """Answers each start/complete from a script of results; get_task returns `now`."""

    def __init__(self, script: list[Any], now: tpb.Task | None = None) -> None:
        self.script = script
        self.now = now
        self.calls = 0

    async def _next(self, task_id: str, attempt: int) -> tpb.Task:
        self.calls += 1
        result = self.script.pop(0)
        if isinstance(result, Exception):
            raise result
        assert isinstance(result, tpb.Task)
        return result

    start_task = complete_task = _next

    async def get_task(self, task_id: str) -> tpb.Task:
        assert self.now is not None
        return self.now


def _task(status: TaskStatus, attempt: int = 2) -> tpb.Task:
    return tpb.Task(id="t1", attempt=attempt, status=status.to_pb())


def _claimed(client: FakeClient) -> ClaimedTask:
    return ClaimedTask(client, _task(TaskStatus.ACKNOWLEDGED))  # type: ignore[arg-type]


async def test_a_call_lost_in_transit_is_repeated() -> None:
    client = FakeClient([GONE, GONE, _task(TaskStatus.IN_PROGRESS)])
    task = _claimed(client)
    await task.start()
    assert client.calls == 3 and task.status == TaskStatus.IN_PROGRESS


async def test_a_repeat_refused_because_the_first_call_took_effect_is_success() -> None:
    client = FakeClient([GONE, REFUSED], now=_task(TaskStatus.COMPLETED))
    task = _claimed(client)
    await task.complete()
    assert task.status == TaskStatus.COMPLETED


async def test_a_repeat_refused_for_a_newer_attempt_is_an_error() -> None:
    # Recovered meanwhile and completed by the next claimer: not ours.
    client = FakeClient([GONE, REFUSED], now=_task(TaskStatus.COMPLETED, attempt=3))
    with pytest.raises(RPCError) as refused:
        await _claimed(client).complete()
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_first_refusal_is_not_repeated_or_explained_away() -> None:
    client = FakeClient([REFUSED], now=_task(TaskStatus.IN_PROGRESS))
    with pytest.raises(RPCError):
        await _claimed(client).start()
    assert client.calls == 1


def _from_wire(code: grpc.StatusCode, details: str) -> RPCError:
    return from_grpc(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details))


async def test_a_call_a_stopping_replica_cancelled_is_repeated() -> None:
    # A replica that stops cancels the calls it still holds (or that arrive as it stops):
    # CANCELLED from the other side is a call lost in transit.
    cancelled = _from_wire(grpc.StatusCode.CANCELLED, "CANCELLED")
    assert cancelled.retryable and cancelled.cancelled_remotely
    client = FakeClient([cancelled, _task(TaskStatus.COMPLETED)])
    task = _claimed(client)
    await task.complete()
    assert client.calls == 2 and task.status == TaskStatus.COMPLETED


async def test_a_cancellation_of_our_own_is_not_repeated() -> None:
    ours = RPCError(grpc.StatusCode.CANCELLED, "the session was stopped")
    assert not ours.retryable
    client = FakeClient([ours])
    with pytest.raises(RPCError):
        await _claimed(client).complete()
    assert client.calls == 1
