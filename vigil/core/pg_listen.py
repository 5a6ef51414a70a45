"""A PostgreSQL LISTEN connection that reconnects by itself and calls back per
notification. Used for wake-ups only: whoever is woken re-reads the database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from vigil.core.aio import cancel_and_wait
from vigil.core.db import DRIVER_ERRORS

log = logging.getLogger(__name__)


class Listener:
    def __init__(self, url: str, handlers: dict[str, Callable[[str], None]]) -> None:
        self._url = url
        self._handlers = handlers
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pg-listener")

    async def stop(self) -> None:
        if self._task:
            await cancel_and_wait(self._task)

    def _callback(self, channel: str) -> Callable[..., None]:
        handler = self._handlers[channel]

        def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            handler(payload)

        return on_notify

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._url)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel in self._handlers:
                    await conn.add_listener(channel, self._callback(channel))
                self.connected.set()
                # Anything sent while we were away is found by the woken re-reading:
                # wake everyone once after (re)connecting.
                for handler in self._handlers.values():
                    handler("")
                await lost.wait()
            except DRIVER_ERRORS as exc:
                # Whatever the driver raises (a refused connection, a standby refusing
                # LISTEN, no host of several being the primary) is retried: a listener
                # that gave up would leave its wake-ups to the slow paths for good.
                log.warning("LISTEN connection failed: %s: %s; retrying", type(exc).__name__, exc)
            finally:
                self.connected.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(0.5)
