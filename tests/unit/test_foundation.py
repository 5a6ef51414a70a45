"""Small foundation pieces: named SQL, migrations discovery, validation, durations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from vigil.cli.durations import parse_duration
from vigil.cli.rpc import CliError
from vigil.core import timefmt, validation
from vigil.core.errors import InvalidArgument
from vigil.core.migrations import discover
from vigil.core.sql import load_queries
from vigil.liveness_service.store import MIGRATIONS, Q


def test_load_queries_strips_comments_and_names_each(tmp_path: Path) -> None:
    f = tmp_path / "q.sql"
    f.write_text("-- name: one\n-- $1 id\nSELECT $1;\n\n-- name: two\nSELECT 2\n")
    assert load_queries(f) == {"one": "SELECT $1", "two": "SELECT 2"}
    f.write_text("-- name: one\nSELECT 1;\n-- name: one\nSELECT 2;\n")
    with pytest.raises(ValueError, match="defined twice"):
        load_queries(f)


def test_liveness_queries_and_migrations_load() -> None:
    assert {"upsert_joined", "flush_heartbeats", "expire_due", "events_since"} <= set(Q)
    migs = discover("liveness", MIGRATIONS)
    assert [m.version for m in migs] == list(range(1, len(migs) + 1))


def test_migrations_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="without gaps"):
        discover("x", tmp_path)
    (tmp_path / "2_bad.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match=r"NNNN_name\.sql"):
        discover("x", tmp_path)


@pytest.mark.parametrize(
    ("value", "message"),
    [("", "is required"), ("x" * 65, "limit is 64"), ("-x", "must start"), ("a b", "only")],
)
def test_names_are_validated_with_actionable_messages(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validation.name(value, "role")


def test_uuid_validation() -> None:
    assert validation.uuid_str("8C2B7B8E-1F6B-4C44-9A3B-3F4B7E1D2C3A", "id").islower()
    with pytest.raises(InvalidArgument, match="not a UUID"):
        validation.uuid_str("123", "id")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("500ms", 0.5), ("2m", 120), ("1h", 3600), ("1.5s", 1.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "--timeout") == seconds


@pytest.mark.parametrize("text", ["soon", "0s", "-1s", "5 minutes"])
def test_bad_durations_are_usage_errors(text: str) -> None:
    with pytest.raises(CliError) as err:
        parse_duration(text, "--timeout")
    assert err.value.exit_code == 2


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), None]),
    )
)
def test_a_timestamp_is_the_instant_protobuf_makes_of_it(dt: datetime) -> None:
    # timefmt.to_proto does its own integer arithmetic; protobuf's is the reference.
    expected = Timestamp()
    expected.FromDatetime(dt.astimezone(UTC))
    assert timefmt.to_proto(dt) == expected
    assert timefmt.from_proto(timefmt.to_proto(dt)) == dt.astimezone(UTC)
