"""Presence events from every replica: LISTEN for the NOTIFY that each write sends,
read the new rows in revision order, and fan them out to local subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from vigil.core.aio import cancel_and_wait
from vigil.core.db import DRIVER_ERRORS
from vigil.core.errors import StorageError
from vigil.liveness_service.model import PresenceEvent
from vigil.liveness_service.store import NOTIFY_CHANNEL, LivenessStore

log = logging.getLogger(__name__)

SUBSCRIBER_QUEUE = 10_000
SAFETY_POLL_S = 1.0  # read anyway now and then, in case a notification was missed


class Subscription:
    """Events after `start_revision`, in order. If the subscriber falls too far
    behind, `overflowed` is set and it must re-read from the store."""

    def __init__(self, start_revision: int) -> None:
        self.start_revision = start_revision
        self.queue: asyncio.Queue[PresenceEvent] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.overflowed = False
        self.wake = asyncio.Event()

    def push(self, event: PresenceEvent) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
        self.wake.set()


class EventHub:
    def __init__(
        self,
        store: LivenessStore,
        url: str,
        on_event: Callable[[PresenceEvent], None],
    ) -> None:
        self._store = store
        self._url = url
        self._on_event = on_event
        self._subs: set[Subscription] = set()
        self._wake = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_revision = 0

    async def start(self) -> None:
        self.last_revision = await self._store.current_revision()
        await self._listen()
        self._task = asyncio.create_task(self._run(), name="presence-events")

    async def _listen(self) -> None:
        try:
            self._conn = await asyncpg.connect(self._url)
            await self._conn.add_listener(NOTIFY_CHANNEL, self._notified)
        except DRIVER_ERRORS as exc:
            self._conn = None
            raise StorageError(f"cannot listen for presence events: {exc}") from exc

    def _notified(self, *_args: object) -> None:
        self._wake.set()

    def subscribe(self) -> Subscription:
        sub = Subscription(self.last_revision)
        self._subs.add(sub)
        return sub

    def wake_all(self) -> None:
        for sub in list(self._subs):
            sub.wake.set()

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    async def stop(self) -> None:
        if self._task:
            await cancel_and_wait(self._task)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=SAFETY_POLL_S)
            self._wake.clear()
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._listen()
                await self._catch_up()
            except StorageError as exc:
                log.warning("presence events: %s; retrying", exc)
                await asyncio.sleep(0.5)

    async def _catch_up(self) -> None:
        while True:
            events = await self._store.events_since(self.last_revision)
            for ev in events:
                self.last_revision = ev.revision
                try:
                    self._on_event(ev)
                except Exception:
                    log.exception("presence event handler failed")
                for sub in list(self._subs):
                    sub.push(ev)
            if len(events) < 1000:
                return
