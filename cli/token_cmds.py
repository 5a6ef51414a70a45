"""The token commands of `vigil`: create a token (its secret printed this once, alone on
stdout, so it can go straight into a file), list tokens (never their secrets), revoke
one."""

from __future__ import annotations

import argparse
import getpass
import re
from collections.abc import Sequence
from typing import Any

from vigil.cli.durations import parse_duration
from vigil.cli.rpc import CliError, connected
from vigil.cli.task_cmds import _check_name, _emit, _print_json, _ts, _usage, name_of, render_table
from vigil.client import ClientConfig
from vigil.core.vocab import TokenKind
from vigil.v1 import tokens_pb2 as pb

TOKEN_COLUMNS = ["id", "kind", "name", "scope", "created_by", "created_at", "expires_at", "state"]
MAX_NAME = 128


def scope_of(t: pb.Token) -> str:
    if t.machine and t.chatroom:
        return f"{t.chatroom}/{t.role}@{t.machine}"
    if t.machine:
        return t.machine
    if t.chatroom:
        return f"{t.chatroom}/{t.role}" if t.role else t.chatroom
    return "-"


def state_of(t: pb.Token) -> str:
    if t.HasField("revoked_at"):
        return "revoked"
    return "active" if not t.HasField("expires_at") else "expires"


def token_json(t: pb.Token) -> dict[str, Any]:
    return {
        "id": t.id,
        "kind": name_of(TokenKind, t.kind),
        "name": t.name,
        "chatroom": t.chatroom or None,
        "role": t.role or None,
        "machine": t.machine or None,
        "created_by": t.created_by,
        "created_at": _ts(t, "created_at"),
        "expires_at": _ts(t, "expires_at"),
        "revoked_at": _ts(t, "revoked_at"),
        "revoked_reason": t.revoked_reason or None,
    }


def render_tokens(tokens: Sequence[pb.Token]) -> str:
    rows = []
    for t in tokens:
        row = token_json(t)
        row["scope"] = scope_of(t)
        row["state"] = "revoked" if t.HasField("revoked_at") else "active"
        rows.append(row)
    return render_table(rows, TOKEN_COLUMNS, "no tokens")


def kind_of(args: argparse.Namespace) -> TokenKind:
    """Exactly one of --admin, --read-only, --chatroom."""
    chosen = [k for k, on in _kinds(args) if on]
    if len(chosen) != 1:
        raise _usage("say what the token may do: one of --admin, --read-only or --chatroom C")
    kind = chosen[0]
    if args.role and kind != TokenKind.CHATROOM:
        raise _usage("--role narrows a --chatroom token; admin and read-only tokens have none")
    return kind


def _kinds(args: argparse.Namespace) -> list[tuple[TokenKind, bool]]:
    return [
        (TokenKind.ADMIN, bool(args.admin)),
        (TokenKind.READONLY, bool(args.read_only)),
        (TokenKind.CHATROOM, bool(args.chatroom)),
    ]


def _default_name() -> str:
    try:
        return f"{getpass.getuser()} via vigil token create"[:MAX_NAME]
    except (KeyError, OSError):
        return "vigil token create"


async def create_token(config: ClientConfig, args: argparse.Namespace) -> int:
    kind = kind_of(args)
    chatroom = _check_name(args.chatroom, "--chatroom") if args.chatroom else ""
    role = _check_name(args.role, "--role") if args.role else ""
    name = args.name if args.name is not None else _default_name()
    if not name.strip() or len(name) > MAX_NAME or "\n" in name:
        raise _usage(f"--name must be one line of 1 to {MAX_NAME} characters")
    ttl = 0
    if args.ttl is not None:
        ttl = round(parse_duration(args.ttl, "--ttl"))
        if ttl <= 0:
            raise _usage("--ttl must be at least one second")
    async with connected(config) as client:
        reply = await client.create_token(kind, name, chatroom=chatroom, role=role, ttl_s=ttl)
    if args.json:
        _print_json({"token": token_json(reply.token), "secret": reply.secret})
    else:
        # The secret alone on stdout (`vigil token create … > file`); it is shown once.
        print(reply.secret)
    return 0


async def list_tokens(config: ClientConfig, include_inactive: bool, as_json: bool) -> int:
    async with connected(config) as client:
        tokens = await client.list_tokens(include_inactive=include_inactive)
    if as_json:
        _print_json([token_json(t) for t in tokens])
    else:
        print(render_tokens(tokens))
    return 0


def check_token_id(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{16}", value):
        raise _usage(f"{value[:40]!r} is not a token id (16 hex digits; see `vigil token list`)")
    return value


async def revoke_token(config: ClientConfig, token_id: str, reason: str, as_json: bool) -> int:
    check_token_id(token_id)
    async with connected(config) as client:
        t = await client.revoke_token(token_id, reason)
    _emit(
        as_json,
        lambda: token_json(t),
        lambda: f"revoked token {t.id} ({name_of(TokenKind, t.kind)}, {scope_of(t)})",
    )
    return 0


async def run(args: argparse.Namespace, config: ClientConfig) -> int:
    action = args.token_command
    if action == "create":
        return await create_token(config, args)
    if action == "list":
        return await list_tokens(config, args.all, args.json)
    if action == "revoke":
        return await revoke_token(config, args.id, args.reason or "", args.json)
    raise CliError(f"unknown token action {action!r}", 2)
