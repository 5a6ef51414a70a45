"""The TTL sweeper: wakes at the earliest stored deadline and expires, with a
conditional update, whoever is still past it. Every replica runs one; SKIP LOCKED
and the condition make each expiry happen exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from vigil.core.aio import cancel_and_wait
from vigil.core.clock import Clock
from vigil.core.errors import StorageError
from vigil.liveness_service.model import Participant
from vigil.liveness_service.store import LivenessStore

log = logging.getLogger(__name__)

BATCH = 1_000
HOLD_POLL_S = 0.1  # how often a held-off sweeper asks again


class TtlSweeper:
    def __init__(
        self,
        store: LivenessStore,
        clock: Clock,
        max_sleep_s: float,
        on_expired: Callable[[list[Participant]], None],
        may_sweep: Callable[[], Awaitable[bool]] | None = None,
        on_store: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self._store = store
        self._may_sweep = may_sweep
        self._on_store = on_store
        self._clock = clock
        self._max_sleep = max_sleep_s
        self._on_expired = on_expired
        self.holding = False  # the last sweep was held off (the store is just back)
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        """A deadline may now be earlier than the one the sweeper sleeps towards."""
        self._poke.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ttl-sweeper")

    async def stop(self) -> None:
        if self._task:
            await cancel_and_wait(self._task)

    async def sweep_once(self) -> list[Participant]:
        """Expire whoever is past its deadline, unless `may_sweep` says not yet (it writes
        this replica's beats first, and holds off while the store is just back)."""
        self.holding = self._may_sweep is not None and not await self._may_sweep()
        if self.holding:
            return []
        expired: list[Participant] = []
        while True:
            batch = await self._store.expire_due(self._clock.now(), BATCH)
            expired.extend(batch)
            if len(batch) < BATCH:
                break
        if expired:
            self._on_expired(expired)
        return expired

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
                deadline = await self._store.next_deadline()
                sleep = self._max_sleep
                if deadline is not None:
                    sleep = min(sleep, (deadline - self._clock.now()).total_seconds())
                if self.holding:
                    sleep = max(sleep, HOLD_POLL_S)
                self._on_store(True)
            except StorageError as exc:
                log.warning("TTL sweep failed, retrying: %s", exc)
                self._on_store(False)
                sleep = self._max_sleep
            if sleep > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), timeout=sleep)
            self._poke.clear()
