"""Authentication on every replica: the caller's bearer token (or, under mutual TLS, a
machine's client certificate) becomes a Principal, or the call is UNAUTHENTICATED.

Tokens are cached for at most `CACHE_S`; a revocation anywhere reaches every replica
through NOTIFY (and, failing that, the cache's expiry), and ends the open streams that
were authenticated by the revoked token, within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from vigil.core.aio import cancel_and_wait
from vigil.core.auth.principal import Principal, TokenRecord, matches, parse
from vigil.core.auth.store import NOTIFY_CHANNEL, AuthStore
from vigil.core.auth.tls import machine_from_peer
from vigil.core.clock import Clock
from vigil.core.errors import ResourceExhausted, StorageError, Unauthenticated
from vigil.core.pg_listen import Listener
from vigil.core.vocab import TokenKind

log = logging.getLogger(__name__)

CACHE_S = 1.0  # longest a token's state is trusted without reading it again
# How often open streams' tokens are read again besides NOTIFY (a lost notification or
# an expiry still ends them within a second); at once after the LISTEN connection is
# back. One statement for every open stream's token; only the tokens that lost their
# rights come back (usually none), so the check holds the event loop for little even
# with 10,000 streams (reading every record back held it ~0.1 s a second there).
STREAM_CHECK_S = 1.0


@dataclass
class _Cached:
    record: TokenRecord | None
    read_at: float


class Authenticator:
    def __init__(self, store: AuthStore, url: str, clock: Clock, max_streams: int = 1000) -> None:
        self.store = store
        self.clock = clock
        self.max_streams = max_streams
        self._revoked_hooks: list[Callable[[str], None]] = []
        self._cache: dict[str, _Cached] = {}
        # token id -> the events of the streams it opened (set when it loses its rights)
        self._streams: dict[str, set[asyncio.Event]] = {}
        self._listener = Listener(url, {NOTIFY_CHANNEL: self._notified})
        self._task: asyncio.Task[None] | None = None
        self._recheck = asyncio.Event()  # check every stream's token now

    async def start(self) -> None:
        self._listener.start()
        self._task = asyncio.create_task(self._check_streams(), name="auth-streams")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._listener.stop()

    # -- who is calling --------------------------------------------------------------

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        token = _bearer(context.invocation_metadata() or ())
        if token is not None:
            return await self.principal_of(token)
        machine = machine_from_peer(context.auth_context())
        if machine is not None:
            return Principal(TokenKind.MACHINE, machine, machine=machine)
        raise Unauthenticated(
            "no credentials: send a bearer token (VIGIL_TOKEN, VIGIL_TOKEN_FILE or the "
            "bootstrap token file) or, for a daemon, its client certificate"
        )

    async def principal_of(self, token: str) -> Principal:
        parsed = parse(token)
        if parsed is None:
            raise Unauthenticated("the bearer token is malformed (expected vigil_<id>_<secret>)")
        token_id, secret = parsed
        record = await self._record(token_id)
        if record is None or not matches(secret, record.secret_sha256):
            raise Unauthenticated("unknown token")
        if record.revoked_at is not None:
            raise Unauthenticated(f"token {token_id} was revoked ({record.revoked_reason})")
        if not record.active(self.clock.now()):
            raise Unauthenticated(f"token {token_id} expired")
        return Principal.of(record)

    async def _record(self, token_id: str) -> TokenRecord | None:
        cached = self._cache.get(token_id)
        now = time.monotonic()
        if cached is not None and now - cached.read_at < CACHE_S:
            return cached.record
        try:
            record = await self.store.get(token_id)
        except StorageError:
            if cached is not None and cached.record is not None:
                # The store is away: a token we knew moments ago is still who it was.
                return cached.record
            raise
        self._cache[token_id] = _Cached(record, now)
        return record

    # -- streams end when their credential does ---------------------------------------

    def on_revoked(self, hook: Callable[[str], None]) -> None:
        """Call `hook(token_id)` when a token loses its rights (revoked, expired)."""
        self._revoked_hooks.append(hook)

    def watch(self, principal: Principal) -> asyncio.Event:
        """An event set when `principal`'s token is revoked or expires; one more open
        stream of that token (RESOURCE_EXHAUSTED past `max_streams` on this replica)."""
        ev = asyncio.Event()
        if principal.token_id is not None:
            streams = self._streams.setdefault(principal.token_id, set())
            if len(streams) >= self.max_streams:
                raise ResourceExhausted(
                    f"{principal.display} already holds {len(streams)} open streams on this "
                    f"server (the limit is {self.max_streams}); close some first"
                )
            streams.add(ev)
        return ev

    def unwatch(self, principal: Principal, ev: asyncio.Event) -> None:
        if principal.token_id is None:
            return
        events = self._streams.get(principal.token_id)
        if events is not None:
            events.discard(ev)
            if not events:
                del self._streams[principal.token_id]

    def _notified(self, payload: str) -> None:
        if not payload:  # (re)connected: anything may have changed meanwhile
            self._cache.clear()
            self._recheck.set()
            return
        self._cache.pop(payload, None)
        self._end(payload)

    def _end(self, token_id: str) -> None:
        for ev in self._streams.get(token_id, ()):
            ev.set()
        for hook in self._revoked_hooks:
            try:
                hook(token_id)
            except Exception:
                log.exception("a revocation hook failed")

    async def _check_streams(self) -> None:
        """Besides NOTIFY: every watched token is read again every STREAM_CHECK_S (and
        at once after the LISTEN connection is back), so a lost notification or an
        expiry ends its streams anyway."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recheck.wait(), STREAM_CHECK_S)
            self._recheck.clear()
            ids = list(self._streams)
            if not ids:
                continue
            try:
                ended = await self.store.inactive(ids, self.clock.now())
            except StorageError:
                continue  # the store is away: nobody loses their stream for that
            for token_id in ended:
                self._cache.pop(token_id, None)
                self._end(token_id)

    def forget(self, token_ids: Iterable[str]) -> None:
        """This replica revoked these itself: act at once, not at the NOTIFY."""
        for token_id in token_ids:
            self._cache.pop(token_id, None)
            self._end(token_id)


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization header must be 'Bearer <token>'")
            return token.strip()
    return None
