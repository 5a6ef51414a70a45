"""Timestamps in one format everywhere: RFC 3339 UTC with microseconds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@overload
def to_proto(dt: datetime) -> Timestamp: ...
@overload
def to_proto(dt: None) -> None: ...
@overload
def to_proto(dt: datetime | None) -> Timestamp | None: ...


def to_proto(dt: datetime | None) -> Timestamp | None:
    if dt is None:
        return None
    # Exact integer arithmetic on an aware datetime, several times faster than
    # Timestamp.FromDatetime (a task carries up to six of them in every answer).
    since = (dt if dt.tzinfo is not None else dt.astimezone(UTC)) - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def from_proto(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def rfc3339(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
