"""One vocabulary per concept: every SQL CHECK list in the migrated schema equals its
Python vocabulary (vigil.core.vocab), and every Python vocabulary equals its proto enum."""

from __future__ import annotations

import re

import asyncpg
import pytest

from vigil.core import vocab
from vigil.core.vocab import WireEnum

# (schema.table, column) -> the vocabulary its CHECK list must equal.
COLUMNS: dict[tuple[str, str], type[WireEnum]] = {
    ("liveness.participants", "kind"): vocab.AgentKind,
    ("liveness.participants", "status"): vocab.ParticipantStatus,
    ("liveness.participants", "offline_reason"): vocab.OfflineReason,
    ("liveness.events", "type"): vocab.PresenceEventType,
    ("liveness.events", "kind"): vocab.AgentKind,
    ("liveness.events", "status"): vocab.ParticipantStatus,
    ("liveness.events", "offline_reason"): vocab.OfflineReason,
    ("tasks.roles", "kind"): vocab.AgentKind,
    ("tasks.tasks", "status"): vocab.TaskStatus,
    ("tasks.notifications", "kind"): vocab.NotificationKind,
    ("tasks.agents", "desired_state"): vocab.DesiredState,
    ("tasks.agents", "status"): vocab.AgentStatus,
    ("tasks.agents", "last_exit_classification"): vocab.ExitClassification,
    ("tasks.agent_exits", "classification"): vocab.ExitClassification,
    ("tasks.commands", "type"): vocab.CommandType,
    ("tasks.commands", "status"): vocab.CommandStatus,
    ("auth.tokens", "kind"): vocab.TokenKind,
}
_LIST = re.compile(r"\(?(\w+)\)?(?:::text)? = ANY \(\(?ARRAY\[(.*?)\]")
_WORD = re.compile(r"'([^']*)'::text")


async def _check_lists(url: str) -> dict[tuple[str, str], set[str]]:
    """(table, column) -> the words its CHECK constraints allow, from the catalog."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT c.conrelid::regclass::text AS tbl, pg_get_constraintdef(c.oid) AS def
               FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
               WHERE c.contype = 'c' AND n.nspname IN ('liveness', 'tasks', 'auth')"""
        )
    finally:
        await conn.close()
    found: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        for column, words in _LIST.findall(r["def"]):
            found.setdefault((r["tbl"], column), set()).update(_WORD.findall(words))
    return found


async def test_every_check_list_equals_its_vocabulary(db_url: str) -> None:
    found = await _check_lists(db_url)
    for key, vocabulary in COLUMNS.items():
        assert key in found, f"{key[0]}.{key[1]} has no CHECK list"
        assert found[key] == set(vocabulary.values()), f"{key[0]}.{key[1]}"
    # And no vocabulary column is left out of this table.
    assert set(found) <= set(COLUMNS), set(found) - set(COLUMNS)


@pytest.mark.parametrize("vocabulary", list(vocab._WIRE), ids=lambda v: v.__name__)
def test_every_vocabulary_equals_its_proto_enum(vocabulary: type[WireEnum]) -> None:
    wrapper, prefix = vocab._WIRE[vocabulary]
    names = {n.removeprefix(prefix) for n in wrapper.keys() if n != prefix + "UNSPECIFIED"}
    assert names == set(vocabulary.__members__)
    for member in vocabulary:
        assert vocabulary.from_pb(member.to_pb()) is member
    with pytest.raises(ValueError):
        vocabulary.from_pb(0)
    with pytest.raises(ValueError):
        vocabulary.from_pb(999)
