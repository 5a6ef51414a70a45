"""Stopping a background task whose cancellation is lost (vigil.core.aio)."""

from __future__ import annotations

import asyncio

import pytest

from vigil.core import aio


async def test_a_lost_cancellation_is_sent_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aio, "RECANCEL_S", 0.02)
    swallowed = 0

    async def swallows_one() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 1:
                    continue  # as asyncio.wait_for can lose one (gh-86296)
                raise

    task = asyncio.create_task(swallows_one())
    await asyncio.sleep(0)
    await asyncio.wait_for(aio.cancel_and_wait(task, timeout=5), 2)
    assert task.cancelled() and swallowed == 2


async def test_a_task_that_never_stops_is_left_after_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(aio.cancel_and_wait(task, timeout=0.2), 2)
    assert not task.done()
    assert "stubborn did not stop within" in caplog.text
    stop.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)


async def test_an_error_the_task_ended_with_is_retrieved() -> None:
    async def fails() -> None:
        raise RuntimeError("its own business")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await aio.cancel_and_wait(task)  # no "exception was never retrieved" later
    assert task.done() and isinstance(task.exception(), RuntimeError)
    await aio.cancel_and_wait(None)
