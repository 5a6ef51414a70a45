"""Timestamps in one format everywhere: RFC 3339 UTC with microseconds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

from google.protobuf.timestamp_pb2 import Timestamp


@overload
def to_proto(dt: datetime) -> Timestamp: ...
@overload
def to_proto(dt: None) -> None: ...
@overload
def to_proto(dt: datetime | None) -> Timestamp | None: ...


def to_proto(dt: datetime | None) -> Timestamp | None:
    if dt is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(dt.astimezone(UTC))
    return ts


def from_proto(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def rfc3339(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
