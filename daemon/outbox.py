"""Exit reports kept on disk until the server acknowledges them: a server or network
blip loses none, and the server's per-incarnation idempotency means a retry after a
lost acknowledgement counts nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import grpc

from vigil.client import Client, RPCError
from vigil.core.timefmt import from_proto, to_proto
from vigil.daemon.metrics import DaemonMetrics
from vigil.v1 import machines_pb2 as pb

log = logging.getLogger(__name__)

_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
}


class Outbox:
    def __init__(self, folder: Path, metrics: DaemonMetrics) -> None:
        self.metrics = metrics
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "refused").mkdir(exist_ok=True)
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        self.sent = 0

    def add(self, report: pb.ExitReport) -> Path:
        """Write the report durably (fsync, then rename) before anyone is told."""
        c = report.child
        started = from_proto(c.started_at).timestamp()
        path = self.folder / f"{c.pid}-{started:.6f}.json"
        data = {
            "chatroom": c.chatroom,
            "role": c.role,
            "pid": c.pid,
            "started_at": started,
            "has_exit_code": report.has_exit_code,
            "exit_code": report.exit_code,
            "signal": report.signal,
            "exited_at": from_proto(report.exited_at).timestamp(),
            "classification": report.classification,
        }
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.metrics.outbox.set(len(self.pending()))
        self._wake.set()
        return path

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("*.json"))

    @staticmethod
    def _load(path: Path, machine_id: str) -> pb.ExitReport:
        from datetime import UTC, datetime

        d: dict[str, Any] = json.loads(path.read_text())
        return pb.ExitReport(
            machine_id=machine_id,
            child=pb.Child(
                chatroom=d["chatroom"],
                role=d["role"],
                pid=d["pid"],
                started_at=to_proto(datetime.fromtimestamp(d["started_at"], UTC)),
            ),
            has_exit_code=d["has_exit_code"],
            exit_code=d["exit_code"],
            signal=d["signal"],
            exited_at=to_proto(datetime.fromtimestamp(d["exited_at"], UTC)),
            classification=d["classification"],
        )

    async def send_pending(self, client: Client, machine_id: str) -> bool:
        """Send every report on disk, oldest first; False if the server could not be
        reached (the rest stay for the next try). Sending twice is harmless: the server
        records each incarnation once."""
        async with self._sending:
            for path in self.pending():
                try:
                    report = self._load(path, machine_id)
                    await client.report_exit(report)
                except RPCError as exc:
                    if exc.code in _FATAL:
                        log.error("exit report %s refused: %s", path.name, exc)
                        os.replace(path, self.folder / "refused" / path.name)
                        self.metrics.reports.labels("refused").inc()
                        continue
                    self.metrics.reports.labels("retry").inc()
                    return False
                except (ValueError, KeyError) as exc:
                    log.error("exit report %s is unreadable: %s", path.name, exc)
                    os.replace(path, self.folder / "refused" / path.name)
                    continue
                finally:
                    self.metrics.outbox.set(len(self.pending()))
                path.unlink(missing_ok=True)
                self.sent += 1
                self.metrics.reports.labels("sent").inc()
            self.metrics.outbox.set(len(self.pending()))
            return True

    async def run(self, client: Client, machine_id: str) -> None:
        """Send every report until acknowledged, retrying with jittered backoff."""
        attempt = 0
        while True:
            self._wake.clear()
            if await self.send_pending(client, machine_id):
                attempt = 0
                delay = 5.0  # nothing to send: wait to be woken
            else:
                attempt += 1
                delay = min(5.0, 0.05 * 2 ** min(attempt, 7)) * random.uniform(0.5, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
