"""`vigil.core.batch.Batcher`, the group commit of concurrent sends: batches form only
while others run, every request gets its own answer, a failing batch is redone item by
item, the store being away is every item's answer, a cancelled request is left out."""

from __future__ import annotations

import asyncio

import pytest

from vigil.core.batch import Batcher
from vigil.core.errors import InvalidArgument, StorageError


class Store:
    """Records each call; a call waits on `gate` (set: answer at once)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_many: Exception | None = None
        self.bad: set[int] = set()

    async def many(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await self.gate.wait()
        if self.fail_many is not None:
            raise self.fail_many
        return [i * 10 for i in items]

    async def one(self, item: int) -> int:
        self.calls.append([item])
        await self.gate.wait()
        if item in self.bad:
            raise InvalidArgument(f"bad item {item}")
        return item * 10


async def test_a_request_alone_goes_alone_at_once() -> None:
    store = Store()
    batcher = Batcher(store.many, store.one)
    assert await batcher.submit(1) == 10
    assert store.calls == [[1]]


async def test_requests_arriving_while_batches_run_go_together() -> None:
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.many, store.one, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)  # the first goes, and waits in the store
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    assert store.calls == [[1]]  # the others wait for the batch in flight
    store.gate.set()
    assert await first == 10
    assert [await r for r in rest] == [20, 30, 40]
    assert store.calls == [[1], [2, 3, 4]]


async def test_requests_in_one_loop_iteration_share_a_batch_up_to_its_size() -> None:
    store = Store()
    batcher = Batcher(store.many, store.one, max_size=3, max_in_flight=2)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(7)))
    assert results == [i * 10 for i in range(7)]
    assert store.calls[:2] == [[0, 1, 2], [3, 4, 5]]  # two in flight, then the last
    assert store.calls[2:] == [[6]]


async def test_a_failing_batch_is_redone_item_by_item() -> None:
    store = Store()
    store.fail_many = InvalidArgument("one of them is bad")
    store.bad = {2}
    batcher = Batcher(store.many, store.one)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert outcomes[0] == 10 and outcomes[2] == 30
    assert isinstance(outcomes[1], InvalidArgument) and "bad item 2" in str(outcomes[1])
    assert store.calls == [[1, 2, 3], [1], [2], [3]]


async def test_the_store_away_is_every_items_answer_without_redoing() -> None:
    store = Store()
    store.fail_many = StorageError("the database is unavailable")
    batcher = Batcher(store.many, store.one)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in (1, 2)), return_exceptions=True)
    assert all(isinstance(o, StorageError) for o in outcomes)
    assert store.calls == [[1, 2]]


async def test_a_request_cancelled_before_its_batch_is_left_out() -> None:
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.many, store.one, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gone = asyncio.create_task(batcher.submit(2))
    kept = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    store.gate.set()
    assert await first == 10 and await kept == 30
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert store.calls == [[1], [3]]


async def test_a_batch_cancelled_even_before_it_began_cancels_its_waiters() -> None:
    store = Store()
    store.gate.clear()
    batcher = Batcher(store.many, store.one)
    waiting = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for task in list(batcher._running):
        task.cancel()
    for w in waiting:
        with pytest.raises(asyncio.CancelledError):
            await w
    assert batcher._in_flight == 0
