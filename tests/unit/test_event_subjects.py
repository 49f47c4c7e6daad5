"""Subjects of relayed events (server/nats_sink.py): one token per aggregate id, whatever
characters a SKU holds, and the id recoverable from it."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st

from domain.shared.outbox import StoredEvent
from server.nats_sink import subject_for, subject_token


@given(st.text(min_size=1, max_size=40))
def test_any_aggregate_id_is_one_token_that_decodes_back(value: str) -> None:
    token = subject_token(value)
    assert token and not any(c in token for c in ".*> \t\r\n")
    assert unquote(token) == value


def test_plain_ids_stay_readable_and_the_topic_gives_the_levels() -> None:
    assert subject_token("SKU-1_a:b") == "SKU-1_a:b"
    assert subject_token("A.B 1") == "A%2EB%201"
    assert subject_token("") == "%"
    event = StoredEvent(7, 3, "inventory.stock_changed", "sku", "SKU.1", None, {}, datetime.now(UTC))
    assert subject_for("entrepot", event) == "entrepot.inventory.stock_changed.SKU%2E1"
