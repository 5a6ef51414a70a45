"""Group commit: concurrent requests of one kind run together, one database call (and
one commit) for all of them.

`Batcher.submit(item)` waits for its own item's result. Up to `max_in_flight` batches
run at once; a request that arrives while they all run waits for the next batch, with
everything else that arrived meanwhile (up to `max_size` a batch). A request that finds
a batch free goes at the end of the current event-loop iteration, with whatever else
arrives in that iteration: alone, it waits for nothing. So batches form only under
load, exactly when a round trip and a commit shared are worth having.

A batch whose call fails, other than with the store away (StorageError, which is every
item's answer), is run again item by item with `one`, so that each item gets its own
outcome (one bad item does not fail the others). A request cancelled before its batch
starts is left out of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from vigil.core.errors import StorageError

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")  # its result


class Batcher(Generic[I, R]):
    def __init__(
        self,
        many: Callable[[list[I]], Awaitable[Sequence[R]]],
        one: Callable[[I], Awaitable[R]],
        *,
        max_size: int = 64,
        max_in_flight: int = 2,
    ) -> None:
        self._many = many
        self._one = one
        self._max_size = max_size
        self._max_in_flight = max_in_flight
        self._waiting: list[tuple[I, asyncio.Future[R]]] = []
        self._in_flight = 0
        self._flush_due = False
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if self._flush_due or self._in_flight >= self._max_in_flight or not self._waiting:
            return
        self._flush_due = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        while self._waiting and self._in_flight < self._max_in_flight:
            batch = [(i, f) for i, f in self._waiting[: self._max_size] if not f.done()]
            del self._waiting[: self._max_size]
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.create_task(self._run(batch), name="batch")
            self._running.add(task)
            task.add_done_callback(lambda t, b=batch: self._ended(t, b))  # type: ignore[misc]

    def _ended(self, task: asyncio.Task[None], batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        # Also when the batch was cancelled, even before it began: nobody waits forever.
        self._running.discard(task)
        for _, f in batch:
            f.cancel()  # only those left unanswered
        self._in_flight -= 1
        self._schedule()

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        if len(batch) == 1:
            await self._alone(*batch[0])
            return
        try:
            results = await self._many([i for i, _ in batch])
        except StorageError as exc:
            for _, f in batch:
                _fail(f, exc)
            return
        except Exception:
            await asyncio.gather(*(self._alone(i, f) for i, f in batch))
            return
        for (_, f), result in zip(batch, results, strict=True):
            if not f.done():
                f.set_result(result)

    async def _alone(self, item: I, future: asyncio.Future[R]) -> None:
        try:
            result = await self._one(item)
        except Exception as exc:  # the item's own answer
            _fail(future, exc)
        else:
            if not future.done():
                future.set_result(result)


def _fail(future: asyncio.Future[R], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
