"""The liveness service's logic, free of gRPC: joins, heartbeats, leaves, resumes,
stream drops, expiry and presence watches. The servicer only translates."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vigil.core import logs, validation
from vigil.core.aio import cancel_and_wait
from vigil.core.auth.principal import SYSTEM, Principal
from vigil.core.auth.rules import participant_scope
from vigil.core.clock import Clock
from vigil.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    StorageError,
    Unavailable,
)
from vigil.core.paging import Page
from vigil.core.timings import Timings
from vigil.core.vocab import (
    LEAVE_REASONS,
    AgentKind,
    HeartbeatStatus,
    OfflineReason,
    ParticipantStatus,
    PresenceEventType,
)
from vigil.liveness_service.batcher import HeartbeatBatcher
from vigil.liveness_service.events import EventHub
from vigil.liveness_service.metrics import LivenessMetrics
from vigil.liveness_service.model import Key, Participant, PresenceEvent
from vigil.liveness_service.store import LivenessStore
from vigil.liveness_service.sweeper import TtlSweeper

log = logging.getLogger(__name__)

# vigil_role_live keeps a series per live role and per role offline for at most
# VIGIL_ROLE_SERIES_KEPT_MS, and never more than MAX_ROLE_SERIES series (live ones
# first): joins of made-up roles cannot grow Prometheus's label sets without bound.
MAX_ROLE_SERIES = 5000
# How often the participant gauges are read again (Prometheus scrapes every 15 s or so;
# the read costs in proportion to the roles, only changed series are touched).
COUNTS_S = 5.0

OK, REJOIN_REQUIRED, SUPERSEDED = (
    HeartbeatStatus.OK,
    HeartbeatStatus.REJOIN_REQUIRED,
    HeartbeatStatus.SUPERSEDED,
)


@dataclass
class Push:
    """A message for a stream: joined | heartbeat | left | reconnect."""

    kind: str
    participant: Participant | None = None
    status: HeartbeatStatus = OK
    ready_until: datetime | None = None
    delay_ms: int = 0


@dataclass(eq=False)
class Session:
    """A participant held by a stream on this replica."""

    participant: Participant
    ready_until: datetime  # newest deadline, in memory
    stored_ready_until: datetime  # newest deadline known to be in the database
    last_beat: float  # monotonic
    outbox: asyncio.Queue[Push | None] = field(default_factory=asyncio.Queue)  # None: stop
    state: str = "live"  # live | lost | ended
    lost_status: HeartbeatStatus = REJOIN_REQUIRED
    detached: bool = False  # handed over (reconnect or drain): its stream's end marks nothing

    @property
    def key(self) -> Key:
        return self.participant.key

    @property
    def epoch(self) -> int:
        return self.participant.epoch

    def lose(self, status: HeartbeatStatus) -> None:
        if self.state == "live":
            self.state = "lost"
            self.lost_status = status
            self.outbox.put_nowait(Push("heartbeat", status=status))


class Liveness:
    def __init__(
        self,
        store: LivenessStore,
        url: str,
        timings: Timings,
        clock: Clock,
        metrics: LivenessMetrics,
        max_participants: int = 1000,
    ) -> None:
        self.store = store
        self.timings = timings
        self.clock = clock
        self.metrics = metrics
        self._ttl = timedelta(milliseconds=timings.heartbeat_ttl_ms)
        # A beat whose stored deadline is nearer than this is written before it is
        # acknowledged, so a beat that arrived in time can never lose to the sweeper.
        self._write_through = timedelta(milliseconds=timings.heartbeat_flush_ms * 2)
        self.sessions: dict[tuple[str, str, int], Session] = {}
        # The store's reachability, as this replica's writes find it (see `_may_sweep`).
        self.store_down_since: float | None = None  # monotonic; None while it answers
        self._store_back_at = float("-inf")
        # After an outage every participant gets a whole TTL again, as after its join:
        # every live client beats again and every replica writes its beats meanwhile,
        # even on a starved machine; one that really stopped is expired a TTL later.
        # (At least one interval and two flushes, should the TTL be set tighter.)
        self._settle_s = (
            max(
                timings.heartbeat_ttl_ms,
                timings.heartbeat_interval_ms + 2 * timings.heartbeat_flush_ms,
            )
            / 1000
        )
        self.batcher = HeartbeatBatcher(
            store,
            timings.heartbeat_flush_ms / 1000,
            metrics,
            self._beat_written,
            self._store_answered,
        )
        self.sweeper = TtlSweeper(
            store,
            clock,
            timings.sweep_max_sleep_ms / 1000,
            self._expired,
            self._may_sweep,
            self._store_answered,
        )
        self.hub = EventHub(store, url, self._presence_event)
        self._background: set[asyncio.Task[None]] = set()
        self._counts_task: asyncio.Task[None] | None = None
        self.draining = False
        self.max_participants = max_participants
        self._revoked: dict[str, float] = {}  # token id -> when (recently revoked)

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        await self.hub.start()
        self.batcher.start()
        self.sweeper.start()
        self._counts_task = asyncio.create_task(self._refresh_counts(), name="participant-counts")

    async def drain(self) -> None:
        """Graceful shutdown: tell every stream to reconnect after a jittered delay and
        mark nobody offline; write the beats held in memory."""
        self.draining = True
        self.hub.wake_all()  # watches end now; their clients resume from their revision
        jitter = self.timings.reconnect_jitter_ms
        for s in list(self.sessions.values()):
            s.detached = True
            s.outbox.put_nowait(Push("reconnect", delay_ms=random.randint(0, jitter)))
        with contextlib.suppress(StorageError):
            await self.batcher.flush()

    async def close(self) -> None:
        await cancel_and_wait(self._counts_task)
        await self.sweeper.stop()
        with contextlib.suppress(StorageError):
            await self.batcher.stop()
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        await self.hub.stop()

    # -- the store's outages -------------------------------------------------

    @property
    def store_ok(self) -> bool:
        """False while the store is unreachable (health says NOT_SERVING meanwhile)."""
        return self.store_down_since is None

    def _store_answered(self, ok: bool) -> None:
        now = self.clock.monotonic()
        if not ok and self.store_down_since is None:
            self.store_down_since = now
            log.warning(
                "the database is unreachable: streams stay open, beats are acknowledged "
                "from memory, nobody is expired until it is back"
            )
        elif ok and self.store_down_since is not None:
            log.warning(
                "the database is back after %.1fs; writing the beats held in memory",
                now - self.store_down_since,
            )
            self.store_down_since = None
            self._store_back_at = now

    async def _may_sweep(self) -> bool:
        """A store outage is not an agent death. Before each sweep this replica writes
        the beats it holds in memory (a failure means the store is still away: no sweep);
        and for a while after an outage it does not sweep at all, so that every live
        client, on any replica, has beaten again and been written. Only a participant
        that really stopped beating is past its deadline after that."""
        await self.batcher.flush()
        if self.store_down_since is not None:
            # A flush with nothing to write does not reach the store: ask it, so that
            # the wait starts now, before the first sweep after the outage (without
            # this, a replica holding no beats expired the clients whose beats another
            # replica still held, the moment the store answered: the chaos soak).
            await self.store.next_deadline()  # raises while the store is still away
            self._store_answered(True)
        return self.clock.monotonic() - self._store_back_at >= self._settle_s

    # -- validation -------------------------------------------------------

    @staticmethod
    def check_identity(chatroom: str, role: str) -> None:
        validation.name(chatroom, "chatroom")
        validation.name(role, "role")

    # -- joins, beats and leaves -----------------------------------------

    async def join(
        self,
        chatroom: str,
        role: str,
        kind: AgentKind,
        connection_id: str,
        by: Principal | None = None,
    ) -> Participant:
        """A new participant for (chatroom, role), held by `by` (None: the server itself)."""
        self.check_identity(chatroom, role)
        if by is not None:
            participant_scope(by, chatroom, role)
        connection_id = validation.uuid_str(connection_id, "connection_id")
        if by is not None:
            await self._check_cap(by, chatroom, role)
        now = self.clock.now()
        participant, _superseded = await self.store.join(
            chatroom,
            role,
            kind,
            connection_id,
            now,
            now + self._ttl,
            by.display if by else SYSTEM,
            by.token_id if by else None,
        )
        self.sweeper.poke()
        logs.event(
            log,
            "participant_joined",
            f"{chatroom}/{role} joined (epoch {participant.epoch})",
            chatroom=chatroom,
            role=role,
            epoch=participant.epoch,
            kind=str(kind),
            principal=participant.principal,
            superseded_epoch=_superseded.epoch if _superseded else None,
        )
        return participant

    def _offline(self, p: Participant, reason: OfflineReason) -> None:
        """A participant this replica took offline: count it and say so."""
        self.metrics.offline.labels(reason).inc()
        logs.event(
            log,
            "participant_offline",
            f"{p.chatroom}/{p.role} offline ({reason})",
            chatroom=p.chatroom,
            role=p.role,
            epoch=p.epoch,
            reason=str(reason),
        )

    async def _check_cap(self, by: Principal, chatroom: str, role: str) -> None:
        """One credential holds at most `max_participants` live participants (rejoining a
        role it already holds does not count twice)."""
        if by.token_id is None or by.is_admin:
            return
        held = await self.store.count_live_of_token(by.token_id)
        if held < self.max_participants:
            return
        current = await self.store.get(chatroom, role)
        if current is not None and current.live and current.token_id == by.token_id:
            return
        raise ResourceExhausted(
            f"{by.display} already holds {held} live participants (the limit is "
            f"{self.max_participants}); leave some first"
        )

    @staticmethod
    def check_owner(p: Participant, by: Principal | None, what: str) -> None:
        """A participant answers only to the credential that joined it (and admins)."""
        if by is None or by.is_admin or (p.token_id is not None and p.token_id == by.token_id):
            return
        if p.token_id is None and p.principal == by.display:
            return  # a machine proven by its certificate, both times
        raise PermissionDenied(
            f"{what} refused: {p.chatroom}/{p.role} is held by {p.principal or 'another caller'}, "
            f"not {by.display}"
        )

    def check_accepting(self) -> None:
        if self.draining:
            raise Unavailable("this server is shutting down; reconnect (resume) elsewhere")

    def open_session(self, participant: Participant) -> Session:
        assert participant.ready_until is not None
        self.check_accepting()
        session = Session(
            participant=participant,
            ready_until=participant.ready_until,
            stored_ready_until=participant.ready_until,
            last_beat=self.clock.monotonic(),
        )
        key = (participant.chatroom, participant.role, participant.epoch)
        previous = self.sessions.get(key)
        if previous is not None:
            previous.detached = True  # the same participant moved to this stream
            previous.state = "ended"
        self.sessions[key] = session
        return session

    def close_session(self, session: Session) -> None:
        key = (session.participant.chatroom, session.participant.role, session.epoch)
        if self.sessions.get(key) is session:
            del self.sessions[key]

    async def resume(
        self,
        chatroom: str,
        role: str,
        epoch: int,
        connection_id: str,
        by: Principal | None = None,
    ) -> tuple[HeartbeatStatus, Participant | None]:
        """The same participant after a reconnect: (ok, participant), or the reason it
        cannot be resumed (rejoin_required / superseded)."""
        self.check_identity(chatroom, role)
        validation.positive(epoch, "epoch")
        connection_id = validation.uuid_str(connection_id, "connection_id")
        if by is not None:
            participant_scope(by, chatroom, role)
            held = await self.store.get(chatroom, role)
            if held is not None and held.epoch == epoch:
                self.check_owner(held, by, "resume")
        now = self.clock.now()
        p = await self.store.resume(chatroom, role, epoch, connection_id, now, now + self._ttl)
        if p is not None:
            return OK, p
        current = await self.store.get(chatroom, role)
        if current is not None and current.epoch > epoch:
            return SUPERSEDED, None
        return REJOIN_REQUIRED, None

    async def beat(self, session: Session) -> Push:
        """A heartbeat on a stream."""
        if session.state != "live":
            return Push("heartbeat", status=session.lost_status)
        self.metrics.heartbeats.inc()
        mono = self.clock.monotonic()
        self.metrics.lateness.observe(mono - session.last_beat - self.timings.heartbeat_interval)
        session.last_beat = mono
        now = self.clock.now()
        ready_until = now + self._ttl
        session.ready_until = ready_until
        p = session.participant
        if session.stored_ready_until - now <= self._write_through and self.store_ok:
            try:
                status = await self.batcher.submit_and_wait(p.key, p.epoch, ready_until, now)
            except StorageError:
                status = OK  # the store is away: acknowledged from memory (see below)
            if status != OK:
                session.lose(status)
                return Push("heartbeat", status=session.lost_status)
        else:
            # Written by the next flush. While the store is away the beat waits in
            # memory (the newest per participant) and is acknowledged anyway: the
            # sweeper expires nobody before this replica's beats are written.
            self.batcher.submit(p.key, p.epoch, ready_until, now)
        return Push("heartbeat", status=OK, ready_until=ready_until)

    async def beat_unary(
        self,
        chatroom: str,
        role: str,
        epoch: int,
        connection_id: str,
        by: Principal | None = None,
    ) -> tuple[HeartbeatStatus, datetime | None]:
        """A heartbeat from a client without a stream; always written before the answer."""
        self.check_identity(chatroom, role)
        validation.positive(epoch, "epoch")
        connection_id = validation.uuid_str(connection_id, "connection_id")
        current = await self._fenced(chatroom, role, epoch, connection_id, "heartbeat", by)
        if not current.live:
            return REJOIN_REQUIRED, None
        self.metrics.heartbeats.inc()
        now = self.clock.now()
        ready_until = now + self._ttl
        status = await self.batcher.submit_and_wait((chatroom, role), epoch, ready_until, now)
        return (status, ready_until) if status == OK else (status, None)

    async def _fenced(
        self,
        chatroom: str,
        role: str,
        epoch: int,
        connection_id: str,
        what: str,
        by: Principal | None,
    ) -> Participant:
        """The participant, if `by` holds it (PERMISSION_DENIED otherwise, before anything
        else is said about it) and (epoch, connection_id) is its current one; otherwise
        FAILED_PRECONDITION: a stale connection can change nothing."""
        current = await self.store.get(chatroom, role)
        if current is None:
            raise FailedPrecondition(
                f"{what} before join: no participant for role {role!r} in chatroom "
                f"{chatroom!r}; join first"
            )
        self.check_owner(current, by, what)
        if epoch < current.epoch:
            raise FailedPrecondition(
                f"{what} rejected: epoch {epoch} was superseded by epoch {current.epoch} "
                "(a newer wait-for-task took this role); this connection must exit"
            )
        if epoch > current.epoch:
            raise FailedPrecondition(
                f"{what} rejected: epoch {epoch} is unknown (current epoch is "
                f"{current.epoch}); join first"
            )
        if connection_id != current.connection_id:
            raise FailedPrecondition(
                f"{what} rejected: connection {connection_id} does not hold epoch {epoch}"
            )
        return current

    async def leave(
        self,
        chatroom: str,
        role: str,
        epoch: int,
        connection_id: str,
        reason: OfflineReason,
        by: Principal | None = None,
    ) -> Participant:
        self.check_identity(chatroom, role)
        validation.positive(epoch, "epoch")
        connection_id = validation.uuid_str(connection_id, "connection_id")
        self._check_leave_reason(reason)
        current = await self._fenced(chatroom, role, epoch, connection_id, "leave", by)
        if not current.live:
            return current  # leaving twice is harmless
        p = await self.store.mark_offline(
            chatroom, role, epoch, connection_id, self.clock.now(), reason
        )
        if p is None:  # went offline between the read and the write
            p = await self._fenced(chatroom, role, epoch, connection_id, "leave", by)
        else:
            self._offline(p, reason)
        return p

    @staticmethod
    def _check_leave_reason(reason: OfflineReason) -> None:
        if reason not in LEAVE_REASONS:
            raise InvalidArgument(
                "leave reason must be one of "
                f"{', '.join(sorted(r.value for r in LEAVE_REASONS))}, got {reason.value!r}"
            )

    async def leave_session(self, session: Session, reason: OfflineReason) -> Participant:
        self._check_leave_reason(reason)
        p = session.participant
        if session.state != "live":
            current = await self.store.get(p.chatroom, p.role)
            return current or p
        session.state = "ended"
        left = await self.store.mark_offline(
            p.chatroom, p.role, p.epoch, p.connection_id, self.clock.now(), reason
        )
        if left is None:
            return await self.store.get(p.chatroom, p.role) or p
        self._offline(left, reason)
        return left

    def token_revoked(self, token_id: str) -> None:
        """A credential lost its rights: the participants it holds go offline (`revoked`),
        and the streams holding them (ended by the authenticator) mark nothing else."""
        self._revoked[token_id] = self.clock.monotonic()
        for stale in [t for t, at in self._revoked.items() if self.clock.monotonic() - at > 60]:
            del self._revoked[stale]
        task = asyncio.create_task(self._mark_revoked(token_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mark_revoked(self, token_id: str) -> None:
        try:
            for p in await self.store.live_of_token(token_id):
                gone = await self.store.mark_offline(
                    p.chatroom,
                    p.role,
                    p.epoch,
                    p.connection_id,
                    self.clock.now(),
                    OfflineReason.REVOKED,
                )
                if gone is not None:
                    self._offline(gone, OfflineReason.REVOKED)
        except StorageError as exc:
            log.warning("could not take the participants of a revoked credential offline: %s", exc)

    def stream_ended(self, session: Session) -> None:
        """The stream ended without a leave: its client died (killed, connection reset),
        or its peer stopped answering HTTP/2 pings and keepalive closed the transport
        (a frozen or vanished peer, a half-open connection: keepalive time + timeout
        after the last sign of life). No beat can reach this participant any more:
        offline now, `stream_dropped`. (A client hung in its own code while its
        connection still answers pings keeps its stream: its TTL decides.)"""
        self.close_session(session)
        if session.detached or session.state != "live" or self.draining:
            return  # a server going away is not an agent dying
        if session.participant.token_id in self._revoked:
            return  # its credential was revoked: `revoked`, not `stream_dropped`
        session.state = "ended"
        task = asyncio.create_task(self._mark_dropped(session, self.clock.monotonic()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mark_dropped(self, session: Session, noticed: float) -> None:
        p = session.participant
        try:
            done = await self.store.mark_offline(
                p.chatroom,
                p.role,
                p.epoch,
                p.connection_id,
                self.clock.now(),
                OfflineReason.STREAM_DROPPED,
            )
        except StorageError as exc:
            log.warning("could not record the dropped stream of %s/%s: %s", *p.key, exc)
            return
        if done is not None:
            self._offline(done, OfflineReason.STREAM_DROPPED)
            self.metrics.detection.labels(OfflineReason.STREAM_DROPPED).observe(
                self.clock.monotonic() - noticed
            )

    # -- what other parts tell us ------------------------------------------

    def _beat_written(
        self, key: Key, epoch: int, ready_until: datetime, status: HeartbeatStatus
    ) -> None:
        session = self.sessions.get((key[0], key[1], epoch))
        if session is None:
            return
        if status == OK:
            session.stored_ready_until = max(session.stored_ready_until, ready_until)
        else:
            session.lose(status)

    def _expired(self, participants: list[Participant]) -> None:
        for p in participants:
            self._offline(p, OfflineReason.TTL_EXPIRED)
            if p.ready_until is not None and p.offline_at is not None:
                lag = (p.offline_at - p.ready_until).total_seconds()
                self.metrics.detection.labels(OfflineReason.TTL_EXPIRED).observe(max(0.0, lag))

    def _presence_event(self, ev: PresenceEvent) -> None:
        """Any replica's change reaches the stream that holds that participant here."""
        if ev.type != PresenceEventType.OFFLINE:
            return
        p = ev.participant
        session = self.sessions.get((p.chatroom, p.role, p.epoch))
        if session is None or session.participant.connection_id != p.connection_id:
            return
        session.lose(
            SUPERSEDED if p.offline_reason == OfflineReason.SUPERSEDED else REJOIN_REQUIRED
        )

    # -- queries ------------------------------------------------------------

    async def list_participants(
        self, chatroom: str, live_only: bool, page: Page
    ) -> tuple[list[Participant], int]:
        """A page of participants, and the revision it is consistent with."""
        if chatroom:
            validation.name(chatroom, "chatroom")
        return await self.store.list_participants(chatroom or None, live_only, page)

    async def watch(self, from_revision: int, chatroom: str) -> AsyncIterator[PresenceEvent]:
        """Every event after `from_revision`, then live ones; nothing missed, nothing twice."""
        if from_revision < 0:
            raise InvalidArgument(f"from_revision must be 0 or more, got {from_revision}")
        if chatroom:
            validation.name(chatroom, "chatroom")
        current = await self.store.current_revision()
        if from_revision > current:
            raise InvalidArgument(
                f"from_revision {from_revision} is ahead of the newest revision {current}"
            )
        last = from_revision
        while True:
            sub = self.hub.subscribe()
            try:
                # Catch up from the table to at least where the subscription begins.
                while True:
                    events = await self.store.events_since(last, chatroom or None)
                    for ev in events:
                        last = ev.revision
                        yield ev
                    if len(events) < 1000 and last >= sub.start_revision:
                        break
                    if not events:
                        break
                while not sub.overflowed and not self.draining:
                    await sub.wake.wait()
                    sub.wake.clear()
                    while not sub.queue.empty():
                        ev = sub.queue.get_nowait()
                        if ev.revision <= last:
                            continue
                        last = ev.revision
                        if not chatroom or ev.participant.chatroom == chatroom:
                            yield ev
            finally:
                self.hub.unsubscribe(sub)
            if self.draining:
                return
            log.info("presence watcher fell behind; re-reading from revision %d", last)

    async def _refresh_counts(self) -> None:
        while True:
            try:
                counts = await self.store.counts()
                self.metrics.participants.clear()
                for kind in AgentKind:
                    for status in ParticipantStatus:
                        self.metrics.participants.labels(kind, status).set(0)
                for kind, status, n in counts:
                    self.metrics.participants.labels(kind, status).set(n)
                roles = await self.store.roles_live(
                    self.clock.now() - timedelta(milliseconds=self.timings.role_series_kept_ms),
                    MAX_ROLE_SERIES,
                )
                self.metrics.role_series.show({(c, r): live for c, r, _kind, live in roles})
            except StorageError as exc:
                log.debug("participant counts: %s", exc)
            await asyncio.sleep(COUNTS_S)
