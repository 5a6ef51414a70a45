"""Heartbeats are cheap in memory: their deadlines reach the database in batched,
bounded writes, one statement per batch instead of one per beat (lesson 9)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from vigil.core.aio import cancel_and_wait
from vigil.core.errors import StorageError
from vigil.core.vocab import HeartbeatStatus
from vigil.liveness_service.metrics import LivenessMetrics
from vigil.liveness_service.model import Key
from vigil.liveness_service.store import LivenessStore

log = logging.getLogger(__name__)

MAX_BATCH = 5_000  # rows per statement
URGENT_COALESCE_S = 0.001  # how long an urgent flush waits for company

Beat = tuple[int, datetime, datetime]  # epoch, ready_until, beat_at


class HeartbeatBatcher:
    def __init__(
        self,
        store: LivenessStore,
        interval_s: float,
        metrics: LivenessMetrics,
        on_result: Callable[[Key, int, datetime, HeartbeatStatus], None],
        on_store: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self._store = store
        self._interval = interval_s
        self._metrics = metrics
        self._on_result = on_result
        self._on_store = on_store  # told whether each write reached the store
        self._flushing = asyncio.Lock()  # one flush at a time: a sweep waits for it
        self._pending: dict[Key, Beat] = {}
        self._waiters: dict[Key, list[asyncio.Future[HeartbeatStatus]]] = {}
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, key: Key, epoch: int, ready_until: datetime, beat_at: datetime) -> None:
        """Queue a beat; the latest beat of a participant replaces an unflushed older one."""
        self._pending[key] = (epoch, ready_until, beat_at)

    async def submit_and_wait(
        self, key: Key, epoch: int, ready_until: datetime, beat_at: datetime
    ) -> HeartbeatStatus:
        """Queue a beat and wait until it is written: OK if the participant was still
        live with that epoch (the beat counted), else SUPERSEDED or REJOIN_REQUIRED."""
        self.submit(key, epoch, ready_until, beat_at)
        fut: asyncio.Future[HeartbeatStatus] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(fut)
        self._urgent.set()
        return await fut

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat-batcher")

    async def stop(self) -> None:
        if self._task:
            await cancel_and_wait(self._task)
        await self.flush()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._urgent.wait(), timeout=self._interval)
                await asyncio.sleep(URGENT_COALESCE_S)
            except TimeoutError:
                pass
            self._urgent.clear()
            try:
                await self.flush()
            except StorageError as exc:
                log.warning("heartbeat flush failed, will retry: %s", exc)

    async def flush(self) -> None:
        """Write the beats pending now (not those arriving meanwhile: they wait for the
        next flush, so a busy server still writes about once per interval). Flushes run
        one at a time, so when one returns, no beat queued before it is still in flight."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        keys = list(pending)
        for start in range(0, len(keys), MAX_BATCH):
            batch = {k: pending[k] for k in keys[start : start + MAX_BATCH]}
            waiters = {k: self._waiters.pop(k) for k in batch if k in self._waiters}
            rows = [(k[0], k[1], b[0], b[1], b[2]) for k, b in batch.items()]
            try:
                updated = await self._store.flush_heartbeats(rows)
            except StorageError as exc:
                # Put the unwritten beats back (unless newer ones arrived), fail the waiters.
                for k in keys[start:]:
                    self._pending.setdefault(k, pending[k])
                for futs in waiters.values():
                    for f in futs:
                        if not f.done():
                            f.set_exception(exc)
                self._on_store(False)
                raise
            self._on_store(True)
            self._metrics.flush_statements.inc()
            self._metrics.flush_rows.inc(len(rows))
            for k, (epoch, ready_until, _) in batch.items():
                status = updated.get((k[0], k[1], epoch), HeartbeatStatus.REJOIN_REQUIRED)
                self._on_result(k, epoch, ready_until, status)
                for f in waiters.get(k, []):
                    if not f.done():
                        f.set_result(status)
