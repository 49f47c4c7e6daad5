"""The one settings class (server/settings.py): every setting, the stream ones included,
comes from the environment; the client's message limit is the server's; a bad value
stops a command with one line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import entrepot_client
from server import cli
from server.settings import Settings


def test_the_client_and_the_server_agree_on_the_message_size() -> None:
    assert (
        Settings.model_fields["max_message_bytes"].default
        == entrepot_client.MAX_MESSAGE_BYTES
        == 4 * 1024 * 1024
    )


def test_stream_settings_are_read_with_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ENTREPOT_SYNC_UNKNOWN_SKU": "reject",
        "ENTREPOT_SYNC_MAX_IN_FLIGHT": "7",
        "ENTREPOT_WATCH_BUFFER_EVENTS": "123",
        "ENTREPOT_WATCH_HEARTBEAT_SECONDS": "0.5",
        "ENTREPOT_RESERVE_BATCHING": "false",
    }.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.sync_unknown_sku, s.sync_max_in_flight, s.watch_buffer_events, s.watch_heartbeat_seconds) == (
        "reject",
        7,
        123,
        0.5,
    )
    assert s.reserve_batching is False


def test_an_unknown_sku_policy_other_than_create_or_reject_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENTREPOT_SYNC_UNKNOWN_SKU", "maybe")
    with pytest.raises(ValidationError):
        Settings()


def test_a_bad_setting_stops_a_command_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ENTREPOT_SYNC_UNKNOWN_SKU", "maybe")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("ENTREPOT_JWT_HS256_SECRET", "s3cret-never-echoed")
    monkeypatch.setenv("ENTREPOT_JWT_LEEWAY_SECONDS", "s3cret-never-echoed")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["migrate"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("entrepot: invalid configuration: ")
    assert "ENTREPOT_SYNC_UNKNOWN_SKU: Input should be 'create' or 'reject'" in err
    assert "ENTREPOT_JWT_LEEWAY_SECONDS" in err and "s3cret" not in err
