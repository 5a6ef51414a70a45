"""Stopping a background task, bounded.

`task.cancel()` then `await task` hangs for good if the cancellation is lost: Python
3.11's `asyncio.wait_for` can swallow a cancellation that arrives as the awaited
future completes (gh-86296), and a loop that then goes on waiting never ends. A server
whose graceful stop waits on such a task never exits (seen once in ~750 tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

RECANCEL_S = 0.5  # a cancellation lost is sent again this often


async def cancel_and_wait(task: asyncio.Task[object] | None, timeout: float = 5.0) -> None:
    """Cancel `task` and wait until it ends, cancelling again every RECANCEL_S (a lost
    cancellation lands on its next await); after `timeout` seconds leave it, with a
    warning naming it."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("task %s did not stop within %.0f s; left behind", task.get_name(), timeout)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(RECANCEL_S, remaining))
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()  # retrieved: an error it ended with was its own business
