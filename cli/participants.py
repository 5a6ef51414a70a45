"""`vigil participants`: who is alive, as a table or JSON."""

from __future__ import annotations

import json
from typing import Any

from vigil.cli.rpc import connected
from vigil.cli.task_cmds import name_of, render_table
from vigil.client import ClientConfig
from vigil.core.timefmt import from_proto, rfc3339
from vigil.core.vocab import AgentKind, OfflineReason, ParticipantStatus
from vigil.v1 import liveness_pb2 as pb

COLUMNS = ["chatroom", "role", "kind", "status", "epoch", "ready_until", "offline_reason"]


def participant_json(p: pb.Participant) -> dict[str, Any]:
    return {
        "chatroom": p.chatroom,
        "role": p.role,
        "kind": name_of(AgentKind, p.kind),
        "status": name_of(ParticipantStatus, p.status),
        "epoch": p.epoch,
        "connection_id": p.connection_id,
        "ready_until": rfc3339(from_proto(p.ready_until)) if p.HasField("ready_until") else None,
        "joined_at": rfc3339(from_proto(p.joined_at)) if p.HasField("joined_at") else None,
        "offline_at": rfc3339(from_proto(p.offline_at)) if p.HasField("offline_at") else None,
        "offline_reason": name_of(OfflineReason, p.offline_reason) if p.offline_reason else None,
        "revision": p.revision,
    }


async def participants(
    config: ClientConfig, chatroom: str | None, live_only: bool, as_json: bool
) -> int:
    async with connected(config) as client:
        reply = await client.list_participants(chatroom or "", live_only=live_only)
    rows = [participant_json(p) for p in reply.participants]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows, COLUMNS, "no participants"))
    return 0
