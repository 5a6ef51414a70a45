"""Configuration and timings: defaults, overrides, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from vigil.client import ClientConfig
from vigil.core.config import Settings, parse_addr
from vigil.core.errors import ConfigError
from vigil.core.timings import Timings


def test_defaults_are_the_original_plan() -> None:
    t = Timings.from_env({})
    assert (t.heartbeat_interval_ms, t.heartbeat_ttl_ms) == (30_000, 60_000)
    assert (t.task_pending_timeout_ms, t.task_ack_timeout_ms) == (300_000, 120_000)
    assert t.command_deadline_ms == 120_000
    assert (t.circuit_exits, t.circuit_window_ms, t.circuit_cooldown_ms) == (3, 300_000, 60_000)
    # Keepalive detects a vanished peer before the TTL would.
    assert t.keepalive_time_ms + t.keepalive_timeout_ms < t.heartbeat_ttl_ms


def test_millisecond_overrides_keep_derived_values_valid() -> None:
    t = Timings.from_env({"VIGIL_HEARTBEAT_INTERVAL_MS": "100", "VIGIL_HEARTBEAT_TTL_MS": "400"})
    assert t.heartbeat_interval == 0.1 and t.heartbeat_ttl == 0.4
    assert t.keepalive_time_ms + t.keepalive_timeout_ms < 400
    assert t.heartbeat_flush_ms * 2 <= 400 - 100


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VIGIL_HEARTBEAT_TTL_MS": "sixty"}, "VIGIL_HEARTBEAT_TTL_MS must be an integer"),
        ({"VIGIL_HEARTBEAT_TTL_MS": "0"}, "VIGIL_HEARTBEAT_TTL_MS must be a positive integer"),
        ({"VIGIL_HEARTBEAT_INTERVAL_MS": "60000"}, "must be below VIGIL_HEARTBEAT_TTL_MS"),
        (
            {"VIGIL_KEEPALIVE_TIME_MS": "50000", "VIGIL_KEEPALIVE_TIMEOUT_MS": "20000"},
            "must stay below VIGIL_HEARTBEAT_TTL_MS",
        ),
        ({"VIGIL_CIRCUIT_EXITS": "-1"}, "VIGIL_CIRCUIT_EXITS must be a positive integer"),
    ],
)
def test_bad_timings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Timings.from_env(env)


def test_settings_from_env() -> None:
    s = Settings.from_env({"VIGIL_ADDR": "[::1]:7000", "VIGIL_DATA_DIR": "/x"})
    assert s.addr == "[::1]:7000" and str(s.data_dir) == "/x" and s.database_url is None
    with pytest.raises(ConfigError, match="VIGIL_ADDR must look like HOST:PORT"):
        Settings.from_env({"VIGIL_ADDR": "7070"})
    with pytest.raises(ConfigError, match="DATABASE_URL must start with postgresql://"):
        Settings.from_env({"DATABASE_URL": "mysql://x"})
    with pytest.raises(ConfigError, match="VIGIL_LOG_LEVEL"):
        Settings.from_env({"VIGIL_LOG_LEVEL": "loud"})


def test_parse_addr() -> None:
    assert parse_addr("127.0.0.1:0", "X") == ("127.0.0.1", 0)
    assert parse_addr("[::1]:7070", "X") == ("[::1]", 7070)
    with pytest.raises(ConfigError, match="X must look like"):
        parse_addr("host:99999", "X")


def test_plaintext_is_for_loopback_unless_insecure() -> None:
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({"VIGIL_ADDR": "0.0.0.0:7070"})
    assert "--insecure" in str(exc.value)
    assert Settings.from_env({"VIGIL_ADDR": "0.0.0.0:7070", "VIGIL_INSECURE": "1"}).insecure
    assert Settings.from_env({"VIGIL_ADDR": "[::1]:7070"}).tls is None


def test_a_client_sends_no_credential_in_plaintext_off_this_host(tmp_path: Path) -> None:
    token = "vigil_0123456789abcdef_" + "a" * 43
    far = {"VIGIL_ADDR": "10.1.2.3:7070", "VIGIL_TOKEN": token}
    with pytest.raises(ConfigError) as exc:
        ClientConfig.from_env(far, data_dir=tmp_path).check_transport()
    assert "VIGIL_TLS_CA" in str(exc.value) and token not in str(exc.value)
    ClientConfig.from_env({**far, "VIGIL_INSECURE": "1"}, data_dir=tmp_path).check_transport()
    ClientConfig.from_env({**far, "VIGIL_TLS_CA": "ca.pem"}, data_dir=tmp_path).check_transport()
    near = {"VIGIL_ADDR": "127.0.0.1:7070,127.0.0.2:7070", "VIGIL_TOKEN": token}
    ClientConfig.from_env(near, data_dir=tmp_path).check_transport()
    # Without a credential there is nothing to leak.
    ClientConfig.from_env({"VIGIL_ADDR": "10.1.2.3:7070"}, data_dir=tmp_path).check_transport()
