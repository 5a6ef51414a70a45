"""Verifying the audit log: each task's transitions form a hash chain (see migration
0007_audit_chain.sql), recomputed here independently of the database's own function.

A task's chain is whole when every row names the previous row's hash, every hash is
the digest of its row, each row starts where the previous one ended, and the last row
ends where the task stands (its status and attempt). A task with no transitions must
still be waiting on its first attempt. Pure functions: the service feeds them rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

BORN = ("pending", "queued")  # how a task starts (not audited: its creation is)


@dataclass(frozen=True)
class AuditRow:
    id: int
    task_id: str
    from_status: str
    to_status: str
    trigger: str
    actor: str
    reason: str
    attempt: int
    at: datetime
    prev_hash: bytes | None
    hash: bytes

    @classmethod
    def from_row(cls, row: Any) -> AuditRow:
        return cls(
            id=row["id"],
            task_id=str(row["task_id"]),
            from_status=row["from_status"],
            to_status=row["to_status"],
            trigger=row["trigger"],
            actor=row["actor"],
            reason=row["reason"],
            attempt=row["attempt"],
            at=row["at"],
            prev_hash=bytes(row["prev_hash"]) if row["prev_hash"] is not None else None,
            hash=bytes(row["hash"]),
        )


@dataclass(frozen=True)
class Broken:
    """The first link found broken: which task, which audit row (0: none in particular),
    and what is wrong."""

    task_id: str
    transition_id: int
    problem: str

    def __str__(self) -> str:
        where = f"row {self.transition_id} of task {self.task_id}"
        if not self.transition_id:
            where = f"task {self.task_id}"
        return f"{where}: {self.problem}"


def _field(value: str) -> str:
    return f"{len(value.encode())}:{value}"


def digest(prev: bytes | None, row: AuditRow) -> bytes:
    """SHA-256 over the previous hash and the row's length-prefixed fields (the same
    bytes as tasks.transition_digest)."""
    stamp = row.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    content = "".join(
        _field(v)
        for v in (
            row.task_id,
            row.from_status,
            row.to_status,
            row.trigger,
            row.actor,
            row.reason,
            str(row.attempt),
            stamp,
        )
    )
    return hashlib.sha256((prev or b"") + content.encode()).digest()


def verify_task(task_id: str, status: str, attempt: int, rows: Sequence[AuditRow]) -> Broken | None:
    """The first broken link of one task's chain (rows in id order), or None."""
    prev: AuditRow | None = None
    for row in rows:
        expected_prev = prev.hash if prev else None
        if row.prev_hash != expected_prev:
            what = "does not follow the row before it" if prev else "claims a predecessor"
            return Broken(task_id, row.id, f"{what} (a row was removed or inserted)")
        if digest(expected_prev, row) != row.hash:
            return Broken(task_id, row.id, "its content does not match its hash (edited)")
        if prev is not None and row.from_status != prev.to_status:
            return Broken(
                task_id, row.id, f"starts at {row.from_status}, the row before ended at "
                f"{prev.to_status}",
            )  # fmt: skip
        prev = row
    if prev is None:
        if status not in BORN or attempt != 0:
            return Broken(
                task_id, 0, f"is {status} on attempt {attempt} with no audited transition"
            )
        return None
    if (prev.to_status, prev.attempt) != (status, attempt):
        return Broken(
            task_id,
            prev.id,
            f"the log ends at {prev.to_status} attempt {prev.attempt}, the task is "
            f"{status} attempt {attempt} (later rows were removed)",
        )
    return None
