"""`Client.send` is exactly once across lost answers: every attempt carries the same
request id, repeated only on UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED by the server
(a replica that stops), a bounded number of times, each within its own deadline."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from vigil.client import Client, ClientConfig, RPCError, _client
from vigil.v1 import tasks_pb2 as tpb


def _failure(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "fake")


class FakeTasks:
    """SendMessage answering from a script: a status code fails that attempt."""

    def __init__(self, *script: grpc.StatusCode | None) -> None:
        self.script = list(script)
        self.requests: list[tpb.SendMessageRequest] = []
        self.timeouts: list[float] = []

    async def SendMessage(
        self, request: tpb.SendMessageRequest, *, metadata: Any, timeout: float
    ) -> tpb.Task:
        self.requests.append(request)
        self.timeouts.append(timeout)
        step = self.script.pop(0) if self.script else None
        if step is not None:
            raise _failure(step)
        return tpb.Task(id="t1", chatroom=request.chatroom, role=request.role, text=request.text)


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client(ClientConfig(liveness_addr="127.0.0.1:9", tasks_addr="127.0.0.1:9"))
    # The retry policy, over unary SendMessage calls (what a client uses with a server
    # without SendMessages); the stream's repeats: tests/integration/test_send_stream.py.
    c._sends.supported = False
    try:
        yield c
    finally:
        await c.close()


async def test_a_lost_answer_is_sent_again_with_the_same_request_id(client: Client) -> None:
    fake = FakeTasks(
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        None,
    )
    client.tasks = fake  # type: ignore[assignment]
    task = await client.send("room", "builder", "once")
    assert task.id == "t1" and len(fake.requests) == 4
    assert len({r.SerializeToString() for r in fake.requests}) == 1  # the same request
    assert uuid.UUID(fake.requests[0].request_id).version == 4
    assert all(0 < t <= _client.DEFAULT_TIMEOUT_S for t in fake.timeouts)


async def test_each_send_gets_its_own_request_id_unless_given(client: Client) -> None:
    fake = FakeTasks()
    client.tasks = fake  # type: ignore[assignment]
    await client.send("room", "builder", "a")
    await client.send("room", "builder", "a")
    await client.send("room", "builder", "a", request_id="job-7")
    await client.send("room", "builder", "a", request_id="job-7")
    ids = [r.request_id for r in fake.requests]
    assert ids[0] != ids[1] and ids[2] == ids[3] == "job-7"


async def test_the_retries_are_bounded(client: Client) -> None:
    fake = FakeTasks(*[grpc.StatusCode.UNAVAILABLE] * 10)
    client.tasks = fake  # type: ignore[assignment]
    with pytest.raises(RPCError) as err:
        await client.send("room", "builder", "never answered")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.retryable
    assert len(fake.requests) == _client.SEND_ATTEMPTS
    assert len({r.request_id for r in fake.requests}) == 1


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
    ],
)
async def test_a_refusal_is_not_retried(client: Client, code: grpc.StatusCode) -> None:
    fake = FakeTasks(code)
    client.tasks = fake  # type: ignore[assignment]
    with pytest.raises(RPCError) as err:
        await client.send("room", "builder", "refused")
    assert err.value.code == code and len(fake.requests) == 1
