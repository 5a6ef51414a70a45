"""gRPC adapter of the Tokens service: admins create and revoke tokens; operators list
them. A secret exists outside the caller only in the one CreateToken answer."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TypeAlias

import grpc

from vigil.core import paging, validation
from vigil.core.auth import Authenticator
from vigil.core.auth.principal import TokenRecord
from vigil.core.auth.store import AuthStore
from vigil.core.clock import Clock
from vigil.core.errors import InvalidArgument, NotFound
from vigil.core.rpc import caller, rpc
from vigil.core.timefmt import to_proto
from vigil.core.vocab import TokenKind
from vigil.task_service import codec
from vigil.v1 import tokens_pb2 as pb
from vigil.v1 import tokens_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tokens"].full_name
Ctx: TypeAlias = grpc.aio.ServicerContext
CREATABLE = frozenset({TokenKind.ADMIN, TokenKind.READONLY, TokenKind.CHATROOM})
MAX_TTL_S = 10 * 365 * 24 * 3600


def token(t: TokenRecord) -> pb.Token:
    msg = pb.Token(
        id=t.id,
        kind=t.kind.to_pb(),
        name=t.name,
        chatroom=t.chatroom or "",
        role=t.role or "",
        machine=t.machine or "",
        created_by=t.created_by,
        created_at=to_proto(t.created_at),
        revoked_reason=t.revoked_reason or "",
    )
    for name in ("expires_at", "revoked_at"):
        value = getattr(t, name)
        if value is not None:
            getattr(msg, name).CopyFrom(to_proto(value))
    return msg


class TokensServicer(pb_grpc.TokensServicer):
    service_name = SERVICE_NAME

    def __init__(self, store: AuthStore, auth: Authenticator, clock: Clock) -> None:
        self.store = store
        self.auth = auth
        self.clock = clock

    @rpc
    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: Ctx
    ) -> pb.CreateTokenResponse:
        kind = codec.enum(TokenKind, request.kind, "kind")
        if kind not in CREATABLE:
            raise InvalidArgument(
                f"{kind} credentials are minted by Vigil itself (machine: `vigil machine "
                "register`; agent: for each process a daemon starts)"
            )
        validation.text(request.name, "name", 128, one_line=True)
        chatroom = role = None
        if kind == TokenKind.CHATROOM:
            chatroom = validation.name(request.chatroom, "chatroom")
            role = validation.name(request.role, "role") if request.role else None
        elif request.chatroom or request.role:
            raise InvalidArgument(f"an {kind} token has no chatroom or role")
        if not 0 <= request.ttl_seconds <= MAX_TTL_S:
            raise InvalidArgument(f"ttl_seconds must be between 0 (none) and {MAX_TTL_S}")
        expires = (
            self.clock.now() + timedelta(seconds=request.ttl_seconds)
            if request.ttl_seconds
            else None
        )
        record, secret = await self.store.create(
            kind,
            request.name,
            caller().display,
            chatroom=chatroom,
            role=role,
            expires_at=expires,
        )
        return pb.CreateTokenResponse(token=token(record), secret=secret)

    @rpc
    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Ctx
    ) -> pb.ListTokensResponse:
        page = paging.page("tokens", request.page_size, request.page_token)
        found = await self.store.list_tokens(request.include_inactive, self.clock.now(), page)
        shown, next_token = paging.split(found, page, lambda t: (t.created_at, t.id))
        return pb.ListTokensResponse(tokens=[token(t) for t in shown], next_page_token=next_token)

    @rpc
    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: Ctx) -> pb.Token:
        if not re.fullmatch(r"[0-9a-f]{16}", request.id):
            raise InvalidArgument("id must be a token id (16 hex digits, see `vigil token list`)")
        validation.text(request.reason, "reason", validation.MAX_REASON, required=False)
        reason = f"revoked by {caller().display}" + (
            f": {request.reason}" if request.reason else ""
        )
        revoked = await self.store.revoke(request.id, self.clock.now(), reason)
        if revoked is None:
            existing = await self.store.get(request.id)
            if existing is None:
                raise NotFound(f"no token {request.id!r}")
            return token(existing)  # revoking twice is harmless
        self.auth.forget([revoked.id])
        return token(revoked)
