"""Who may call what: the one declared table of every RPC, the identities that may call
it, and the scope each needs. A call with no identity is UNAUTHENTICATED; an identity
whose kind or scope does not fit is PERMISSION_DENIED. An RPC missing from the table
cannot be served (`rule_for` refuses it, and a test derives the RPCs from the service
descriptors so a new one without a rule fails the build).

Scopes:
- `chatroom`: the request's chatroom must be the caller's (operators: any);
- `role`: the request's chatroom and role must be the caller's (a chatroom token with
  no role: any role of its chatroom; an agent: its own role);
- `participant`: as `role`, except that the reserved machines chatroom is for machines
  only, each as its own role — nobody else can make a machine look online;
- `machine`: the request's machine must be the caller's (admins: any);
- `listed`: a listing, narrowed to what the caller may see;
- `owner`: the target belongs to the caller — the participant it joined, the task its
  participant claimed, its own machine — checked by the service against what is stored.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vigil.core.auth.principal import Principal
from vigil.core.errors import PermissionDenied
from vigil.core.vocab import MACHINES_CHATROOM, TokenKind


class Scope(enum.StrEnum):
    NONE = "none"
    CHATROOM = "chatroom"
    ROLE = "role"
    PARTICIPANT = "participant"
    MACHINE = "machine"
    LISTED = "listed"
    OWNER = "owner"


ADMIN = TokenKind.ADMIN
READONLY = TokenKind.READONLY
CHATROOM = TokenKind.CHATROOM
MACHINE = TokenKind.MACHINE
AGENT = TokenKind.AGENT
OPERATORS = frozenset({ADMIN, READONLY})
READERS = frozenset({ADMIN, READONLY, CHATROOM, AGENT})
WORKERS = frozenset({ADMIN, CHATROOM, AGENT})


@dataclass(frozen=True)
class Rule:
    kinds: frozenset[TokenKind]
    scope: Scope = Scope.NONE
    # What the scope is checked against, read from the request; None: the handler checks
    # it (the first message of a stream, or something stored).
    target: Callable[[Any], tuple[str, ...]] | None = None


def _room(r: Any) -> tuple[str, ...]:
    return (r.chatroom,)


def _role(r: Any) -> tuple[str, ...]:
    return (r.chatroom, r.role)


RULES: dict[str, Rule] = {
    # -- liveness --------------------------------------------------------------------
    "vigil.v1.Liveness/Session": Rule(WORKERS | {MACHINE}, Scope.PARTICIPANT),
    "vigil.v1.Liveness/Join": Rule(WORKERS | {MACHINE}, Scope.PARTICIPANT, _role),
    "vigil.v1.Liveness/Heartbeat": Rule(WORKERS | {MACHINE}, Scope.OWNER, _role),
    "vigil.v1.Liveness/Leave": Rule(WORKERS | {MACHINE}, Scope.OWNER, _role),
    "vigil.v1.Liveness/ListParticipants": Rule(READERS, Scope.LISTED),
    "vigil.v1.Liveness/WatchParticipants": Rule(READERS, Scope.LISTED),
    # -- tasks -----------------------------------------------------------------------
    "vigil.v1.Tasks/CreateChatroom": Rule(frozenset({ADMIN})),
    "vigil.v1.Tasks/UpdateChatroom": Rule(frozenset({ADMIN})),
    "vigil.v1.Tasks/DeleteChatroom": Rule(frozenset({ADMIN})),
    "vigil.v1.Tasks/GetChatroom": Rule(READERS, Scope.CHATROOM, lambda r: (r.name,)),
    "vigil.v1.Tasks/ListChatrooms": Rule(READERS, Scope.LISTED),
    "vigil.v1.Tasks/SendMessage": Rule(WORKERS, Scope.CHATROOM, _room),
    # Every message is checked by the handler against the SendMessage rule.
    "vigil.v1.Tasks/SendMessages": Rule(WORKERS, Scope.CHATROOM),
    "vigil.v1.Tasks/AwaitTask": Rule(WORKERS, Scope.ROLE, _role),
    "vigil.v1.Tasks/StartTask": Rule(WORKERS, Scope.OWNER),
    "vigil.v1.Tasks/CompleteTask": Rule(WORKERS, Scope.OWNER),
    # The participant's role, from the request; the task's claimer, by the service.
    "vigil.v1.Tasks/CompleteAndClaimNext": Rule(WORKERS, Scope.OWNER, _role),
    # Every message is checked by the handler against the CompleteAndClaimNext rule.
    "vigil.v1.Tasks/CompleteAndClaimNextStream": Rule(WORKERS, Scope.OWNER),
    "vigil.v1.Tasks/ReleaseTask": Rule(WORKERS, Scope.OWNER),
    "vigil.v1.Tasks/CancelTask": Rule(frozenset({ADMIN})),
    "vigil.v1.Tasks/GetTask": Rule(READERS, Scope.OWNER),
    "vigil.v1.Tasks/TaskHistory": Rule(READERS, Scope.OWNER),
    "vigil.v1.Tasks/ListTasks": Rule(READERS, Scope.LISTED),
    "vigil.v1.Tasks/CountTasks": Rule(READERS, Scope.LISTED),
    "vigil.v1.Tasks/ListNotifications": Rule(READERS, Scope.LISTED),
    "vigil.v1.Tasks/WatchNotifications": Rule(READERS, Scope.LISTED),
    "vigil.v1.Tasks/VerifyAudit": Rule(OPERATORS),
    # -- machines ----------------------------------------------------------------------
    "vigil.v1.Machines/RegisterMachine": Rule(
        frozenset({ADMIN, MACHINE}), Scope.MACHINE, lambda r: (r.machine_id,)
    ),
    "vigil.v1.Machines/UnregisterMachine": Rule(frozenset({ADMIN})),
    "vigil.v1.Machines/DaemonSession": Rule(frozenset({MACHINE}), Scope.OWNER),
    "vigil.v1.Machines/ReportExit": Rule(frozenset({MACHINE}), Scope.OWNER),
    "vigil.v1.Machines/ListMachines": Rule(OPERATORS),
    "vigil.v1.Machines/ListAgents": Rule(OPERATORS),
    "vigil.v1.Machines/ListCommands": Rule(OPERATORS),
    "vigil.v1.Machines/ListExits": Rule(OPERATORS),
    "vigil.v1.Machines/StartAgent": Rule(frozenset({ADMIN})),
    "vigil.v1.Machines/StopAgent": Rule(frozenset({ADMIN})),
    # -- tokens ------------------------------------------------------------------------
    "vigil.v1.Tokens/CreateToken": Rule(frozenset({ADMIN})),
    "vigil.v1.Tokens/ListTokens": Rule(OPERATORS),
    "vigil.v1.Tokens/RevokeToken": Rule(frozenset({ADMIN})),
}


def rule_for(method: str) -> Rule:
    rule = RULES.get(method)
    if rule is None:
        raise PermissionDenied(f"{method} has no authorization rule; nobody may call it")
    return rule


def permit(principal: Principal, method: str, request: Any) -> None:
    """PERMISSION_DENIED unless the rule of `method` lets `principal` make `request`."""
    rule = rule_for(method)
    if principal.kind not in rule.kinds:
        allowed = ", ".join(sorted(k.value for k in rule.kinds))
        raise PermissionDenied(
            f"{principal.display} may not call {method.rsplit('/', 1)[-1]} "
            f"(allowed: {allowed} credentials)"
        )
    if rule.target is None:
        return
    target = rule.target(request)
    if rule.scope == Scope.CHATROOM:
        chatroom_scope(principal, target[0])
    elif rule.scope in (Scope.ROLE, Scope.OWNER):
        role_scope(principal, target[0], target[1])
    elif rule.scope == Scope.PARTICIPANT:
        participant_scope(principal, target[0], target[1])
    elif rule.scope == Scope.MACHINE:
        machine_scope(principal, target[0])


def chatroom_scope(principal: Principal, chatroom: str) -> None:
    if not principal.covers_chatroom(chatroom):
        raise PermissionDenied(f"{principal.display} may not act in chatroom {chatroom!r}")


def role_scope(principal: Principal, chatroom: str, role: str) -> None:
    if principal.kind == MACHINE:
        participant_scope(principal, chatroom, role)
    elif not principal.covers_role(chatroom, role):
        raise PermissionDenied(f"{principal.display} may not act as {chatroom}/{role}")


def participant_scope(principal: Principal, chatroom: str, role: str) -> None:
    """Who may be the participant (chatroom, role)."""
    if chatroom == MACHINES_CHATROOM:
        if principal.kind != MACHINE or principal.machine != role:
            raise PermissionDenied(
                f"only machine {role!r} itself may hold its presence in {MACHINES_CHATROOM}"
            )
        return
    if principal.kind == MACHINE or not principal.covers_role(chatroom, role):
        raise PermissionDenied(f"{principal.display} may not join as {chatroom}/{role}")


def machine_scope(principal: Principal, machine: str) -> None:
    if principal.kind == ADMIN:
        return
    if principal.kind != MACHINE or principal.machine != machine:
        raise PermissionDenied(f"{principal.display} may not act for machine {machine!r}")


def visible_chatroom(principal: Principal, requested: str) -> str | None:
    """For a listing: the chatroom to narrow it to (None: every chatroom). A scoped
    caller sees only its own chatroom, whatever it asked."""
    if principal.kind in (ADMIN, READONLY):
        return requested or None
    if requested and requested != principal.chatroom:
        raise PermissionDenied(f"{principal.display} may not see chatroom {requested!r}")
    return principal.chatroom
