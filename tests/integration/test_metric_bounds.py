"""Metric label sets stay bounded: thousands of joins to made-up roles that then go
offline leave no series behind once they are long offline."""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client import generate_latest

from vigil import testing as harness
from vigil.testing import local_server
from vigil.v1 import liveness_pb2 as lpb
from vigil.v1 import liveness_pb2_grpc as lpb_grpc

JOINS = 3_000
# Thousands of joins: not in `make test-fast`.
pytestmark = pytest.mark.slow


def _series(srv: harness.LocalServer) -> list[str]:
    text = generate_latest(srv.registry).decode()
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


async def _refreshed(srv: harness.LocalServer, predicate: object, what: str) -> list[str]:
    async def check() -> list[str] | None:
        lines = _series(srv)
        return lines if predicate(lines) else None  # type: ignore[operator]

    found: list[str] = await harness.wait_for(check, 60, interval=0.2, what=what)
    return found


async def test_series_of_long_offline_roles_are_removed(db_url: str) -> None:
    timings = harness.fast_timings(role_series_kept_ms=30_000)
    async with local_server(db_url, timings) as srv:
        await asyncio.sleep(2.5)  # one refresh of the database-backed gauges
        before = _series(srv)
        async with harness.channel(srv.addr) as ch:
            live = lpb_grpc.LivenessStub(ch)
            for start in range(0, JOINS, 100):
                joined = await asyncio.gather(
                    *(
                        live.Join(harness.join_request("flood", f"r{i}"))
                        for i in range(start, start + 100)
                    )
                )
                await asyncio.gather(
                    *(
                        live.Leave(
                            lpb.LeaveRequest(
                                chatroom="flood",
                                role=j.participant.role,
                                epoch=j.participant.epoch,
                                connection_id=j.participant.connection_id,
                                reason=lpb.OFFLINE_REASON_LEFT,
                            )
                        )
                        for j in joined
                    )
                )
        flooded = await _refreshed(
            srv,
            lambda lines: sum('chatroom="flood"' in ln for ln in lines) >= JOINS,
            "a series per role while they are fresh",
        )
        assert len(flooded) >= len(before) + JOINS
        after = await _refreshed(
            srv,
            lambda lines: not any('chatroom="flood"' in ln for ln in lines),
            "the long-offline roles' series removed",
        )
        # Back to its earlier size, give or take the bounded label sets the activity
        # touched (an offline reason, a histogram's buckets).
        grown = {re.sub(r"\{.*", "", ln) for ln in after} - {
            re.sub(r"\{.*", "", ln) for ln in before
        }
        assert len(after) <= len(before) + 40, sorted(grown)
