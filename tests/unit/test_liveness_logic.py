"""The liveness logic on a fake clock and an in-memory store: fencing, resume and
rejoin, heartbeat batching, and the TTL sweeper."""

from __future__ import annotations

from datetime import timedelta
from typing import cast

import pytest
from prometheus_client import CollectorRegistry

from tests.unit.fakes import FakeLivenessStore, conn_id
from vigil.core.clock import FakeClock
from vigil.core.errors import FailedPrecondition, InvalidArgument, StorageError
from vigil.core.timings import Timings
from vigil.core.vocab import AgentKind, HeartbeatStatus, OfflineReason, ParticipantStatus
from vigil.liveness_service.batcher import HeartbeatBatcher
from vigil.liveness_service.metrics import LivenessMetrics
from vigil.liveness_service.model import Participant
from vigil.liveness_service.service import Liveness
from vigil.liveness_service.store import LivenessStore
from vigil.liveness_service.sweeper import TtlSweeper

T = Timings.from_env({"VIGIL_HEARTBEAT_INTERVAL_MS": "1000", "VIGIL_HEARTBEAT_TTL_MS": "5000"})


@pytest.fixture
def store() -> FakeLivenessStore:
    return FakeLivenessStore()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def live(store: FakeLivenessStore, clock: FakeClock) -> Liveness:
    return Liveness(
        cast(LivenessStore, store),
        "postgresql://unused",
        T,
        clock,
        LivenessMetrics(CollectorRegistry()),
    )


# -- fencing -----------------------------------------------------------------------


async def test_an_older_epoch_can_change_nothing(live: Liveness) -> None:
    first_conn, second_conn = conn_id(), conn_id()
    old = await live.join("room", "builder", AgentKind.CUSTOM, first_conn)
    new = await live.join("room", "builder", AgentKind.CUSTOM, second_conn)
    assert new.epoch == old.epoch + 1
    for call in (
        live.leave("room", "builder", old.epoch, first_conn, OfflineReason.LEFT),
        live.beat_unary("room", "builder", old.epoch, first_conn),
    ):
        with pytest.raises(FailedPrecondition, match="superseded"):
            await call
    # The same epoch from another connection is refused too.
    with pytest.raises(FailedPrecondition, match="does not hold"):
        await live.leave("room", "builder", new.epoch, first_conn, OfflineReason.LEFT)
    # An epoch from the future is unknown.
    with pytest.raises(FailedPrecondition, match="unknown"):
        await live.leave("room", "builder", new.epoch + 5, second_conn, OfflineReason.LEFT)


async def test_a_client_cannot_claim_a_server_reason(live: Liveness) -> None:
    c = conn_id()
    p = await live.join("room", "builder", AgentKind.CUSTOM, c)
    with pytest.raises(InvalidArgument, match="leave reason"):
        await live.leave("room", "builder", p.epoch, c, OfflineReason.TTL_EXPIRED)


async def test_resume_in_time_keeps_the_epoch(live: Liveness, clock: FakeClock) -> None:
    c = conn_id()
    p = await live.join("room", "builder", AgentKind.CUSTOM, c)
    clock.advance(T.heartbeat_ttl - 0.5)
    status, resumed = await live.resume("room", "builder", p.epoch, c)
    assert status == HeartbeatStatus.OK and resumed is not None and resumed.epoch == p.epoch


async def test_resume_past_the_deadline_must_rejoin(live: Liveness, clock: FakeClock) -> None:
    c = conn_id()
    p = await live.join("room", "builder", AgentKind.CUSTOM, c)
    clock.advance(T.heartbeat_ttl + 0.1)
    status, resumed = await live.resume("room", "builder", p.epoch, c)
    assert (status, resumed) == (HeartbeatStatus.REJOIN_REQUIRED, None)


async def test_resume_after_a_newer_join_is_superseded(live: Liveness) -> None:
    c = conn_id()
    p = await live.join("room", "builder", AgentKind.CUSTOM, c)
    await live.join("room", "builder", AgentKind.CUSTOM, conn_id())
    status, _ = await live.resume("room", "builder", p.epoch, c)
    assert status == HeartbeatStatus.SUPERSEDED


# -- heartbeat batching --------------------------------------------------------------


def _batcher(store: FakeLivenessStore, seen: list[tuple[str, HeartbeatStatus]]) -> HeartbeatBatcher:
    return HeartbeatBatcher(
        cast(LivenessStore, store),
        1.0,
        LivenessMetrics(CollectorRegistry()),
        lambda key, epoch, ready_until, status: seen.append((key[1], status)),
    )


async def test_many_beats_are_one_statement(store: FakeLivenessStore, clock: FakeClock) -> None:
    live = [
        (await store.join("room", f"r{i}", AgentKind.CUSTOM, conn_id(), clock.now(), clock.now()))[
            0
        ]
        for i in range(50)
    ]
    seen: list[tuple[str, HeartbeatStatus]] = []
    batcher = _batcher(store, seen)
    for _ in range(3):  # the latest beat of a participant replaces an unflushed older one
        for p in live:
            batcher.submit(p.key, p.epoch, clock.now() + timedelta(seconds=5), clock.now())
    before = store.statements
    await batcher.flush()
    assert store.statements - before == 1
    assert len(seen) == 50 and all(status == HeartbeatStatus.OK for _, status in seen)


async def test_a_beat_of_a_superseded_epoch_is_told_so(
    store: FakeLivenessStore, clock: FakeClock
) -> None:
    old, _ = await store.join("room", "b", AgentKind.CUSTOM, conn_id(), clock.now(), clock.now())
    await store.join("room", "b", AgentKind.CUSTOM, conn_id(), clock.now(), clock.now())
    seen: list[tuple[str, HeartbeatStatus]] = []
    batcher = _batcher(store, seen)
    batcher.submit(old.key, old.epoch, clock.now(), clock.now())
    await batcher.flush()
    assert seen == [("b", HeartbeatStatus.SUPERSEDED)]


async def test_a_failed_flush_keeps_its_beats_for_the_next(
    store: FakeLivenessStore, clock: FakeClock
) -> None:
    p, _ = await store.join("room", "b", AgentKind.CUSTOM, conn_id(), clock.now(), clock.now())
    seen: list[tuple[str, HeartbeatStatus]] = []
    batcher = _batcher(store, seen)
    later = clock.now() + timedelta(seconds=5)
    batcher.submit(p.key, p.epoch, later, clock.now())
    store.down = True
    with pytest.raises(StorageError):
        await batcher.flush()
    assert seen == []
    store.down = False
    await batcher.flush()
    assert seen == [("b", HeartbeatStatus.OK)]
    assert store.rows[p.key].ready_until == later


# -- the TTL sweeper -------------------------------------------------------------------


async def test_the_sweeper_expires_at_the_deadline_not_before(
    store: FakeLivenessStore, clock: FakeClock
) -> None:
    expired: list[Participant] = []
    sweeper = TtlSweeper(cast(LivenessStore, store), clock, 1.0, expired.extend)
    deadline = clock.now() + timedelta(seconds=5)
    await store.join("room", "b", AgentKind.CUSTOM, conn_id(), clock.now(), deadline)
    clock.advance(4.999)
    assert await sweeper.sweep_once() == []
    clock.advance(0.002)
    (gone,) = await sweeper.sweep_once()
    assert gone.status == ParticipantStatus.OFFLINE
    assert gone.offline_reason == OfflineReason.TTL_EXPIRED
    assert expired == [gone]


async def test_a_beat_before_the_sweep_keeps_the_participant(
    store: FakeLivenessStore, clock: FakeClock
) -> None:
    sweeper = TtlSweeper(cast(LivenessStore, store), clock, 1.0, lambda _: None)
    p, _ = await store.join(
        "room", "b", AgentKind.CUSTOM, conn_id(), clock.now(), clock.now() + timedelta(seconds=5)
    )
    clock.advance(4.9)
    await store.flush_heartbeats(
        [(*p.key, p.epoch, clock.now() + timedelta(seconds=5), clock.now())]
    )
    clock.advance(0.2)
    assert await sweeper.sweep_once() == []
    assert store.rows[p.key].live


def test_role_series_touch_only_what_changed() -> None:
    registry = CollectorRegistry()
    metrics = LivenessMetrics(registry)

    def value(chatroom: str, role: str) -> float | None:
        return registry.get_sample_value("vigil_role_live", {"chatroom": chatroom, "role": role})

    series = metrics.role_series
    assert series.show({("c", "a"): True, ("c", "b"): False}) == 2
    assert (value("c", "a"), value("c", "b")) == (1.0, 0.0)
    # The same roles again: nothing to do.
    assert series.show({("c", "a"): True, ("c", "b"): False}) == 0
    # a goes offline, b drops out of the series, d appears.
    assert series.show({("c", "a"): False, ("c", "d"): True}) == 3
    assert (value("c", "a"), value("c", "b"), value("c", "d")) == (0.0, None, 1.0)
    assert series.show({}) == 2
    assert (value("c", "a"), value("c", "d")) == (None, None)


async def test_a_replica_holding_no_beats_waits_after_an_outage_before_it_sweeps(
    live: Liveness, store: FakeLivenessStore, clock: FakeClock
) -> None:
    """The store goes away; this replica holds no beats (its flush writes nothing), while
    the participant's beats are held by another replica. When the store is back, this
    replica's first sweep must not expire the participant: it waits a whole TTL first."""
    c = conn_id()
    p = await live.join("room", "builder", AgentKind.CUSTOM, c)
    store.down = True
    with pytest.raises(StorageError):
        await live.sweeper.sweep_once()  # finds the store away: flush fails
    live._store_answered(False)  # as the sweeper's loop reports it
    clock.advance(T.heartbeat_ttl + 1)  # the stored deadline passes during the outage
    store.down = False
    assert await live.sweeper.sweep_once() == []  # back: nobody expired yet
    assert live.sweeper.holding and live.store_ok
    clock.advance(T.heartbeat_ttl - 0.5)
    assert await live.sweeper.sweep_once() == []  # still within the wait
    clock.advance(1.0)  # nobody beat during a whole TTL after the store came back
    (gone,) = await live.sweeper.sweep_once()
    assert (gone.role, gone.offline_reason) == ("builder", OfflineReason.TTL_EXPIRED)
    assert p.epoch == gone.epoch
