"""The one settings class (server/settings.py): every setting, the stream ones included,
comes from the environment; the client's message limit is the server's."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import entrepot_client
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
