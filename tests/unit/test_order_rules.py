"""Pure order rules: intent validation, canonical content, lifecycle, status codes."""

from __future__ import annotations

import dataclasses

import pytest

from domain.order.rules import (
    Intent,
    LineIn,
    PaymentIn,
    Severity,
    State,
    StatusIn,
    TotalsIn,
    canonical_content,
    check_transition,
    content_hash,
    differing_fields,
    parse_payload,
    validate_intent,
    validate_status,
)
from domain.shared.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from domain.shared.money import Money


def eur(n: int) -> Money:
    return Money("EUR", n)


def intent(**kw: object) -> Intent:
    base = Intent(
        intent_id="i-1",
        source_system="web",
        lines=(LineIn("l1", "SKU-A", 2, eur(1000)), LineIn("l2", "SKU-B", 1, eur(550))),
        totals=TotalsIn(eur(2550), eur(510), eur(490), eur(50), eur(3500)),
        payments=(PaymentIn("t1", "card", eur(3000)), PaymentIn("t2", "gift", eur(500))),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def violations(i: Intent, currency: str = "EUR") -> dict[str, str]:
    with pytest.raises(InvalidArgument) as exc:
        validate_intent(i, currency)
    assert exc.value.reason == "INVALID_ORDER_INTENT"
    return {v.field: v.description for v in exc.value.field_violations}


def test_valid_intent_passes() -> None:
    validate_intent(intent(), "EUR")


def test_totals_must_add_up() -> None:
    bad = intent(totals=TotalsIn(eur(2500), eur(510), eur(490), eur(50), eur(3500)))
    v = violations(bad)
    assert "intent.totals.subtotal" in v and "2550" in v["intent.totals.subtotal"]
    assert "intent.totals.grand_total" in v  # 2500 + 510 + 490 - 50 != 3500


def test_captured_may_not_exceed_grand_total() -> None:
    v = violations(intent(payments=(PaymentIn("t1", "card", eur(3501)),)))
    assert list(v) == ["intent.payments"]


def test_one_currency_the_channels() -> None:
    bad = intent(lines=(LineIn("l1", "SKU-A", 2, Money("USD", 1000)), LineIn("l2", "SKU-B", 1, eur(550))))
    v = violations(bad)
    assert "intent.lines[0].unit_price.currency_code" in v
    v = violations(intent(), "USD")
    assert "intent.totals.grand_total.currency_code" in v and "intent.payments[0].captured.currency_code" in v


def test_every_problem_is_reported_at_once() -> None:
    bad = intent(
        intent_id="",
        lines=(LineIn("l1", "", 0, eur(-1)), LineIn("l1", "X", 1, eur(1))),
        payments=(PaymentIn("t1", "", eur(1)), PaymentIn("t1", "card", eur(1))),
    )
    v = violations(bad)
    for f in (
        "intent.intent_id",
        "intent.lines[0].sku",
        "intent.lines[0].quantity",
        "intent.lines[0].unit_price.amount_minor",
        "intent.lines[1].line_id",
        "intent.payments[0].method",
        "intent.payments[1].tender_id",
    ):
        assert f in v, f


def test_no_lines_is_invalid() -> None:
    assert "intent.lines" in violations(
        intent(lines=(), totals=TotalsIn(eur(0), eur(0), eur(0), eur(0), eur(0)), payments=())
    )


def test_canonical_hash_is_stable_and_sensitive() -> None:
    a = canonical_content(intent(), "test")
    assert content_hash(a) == content_hash(canonical_content(intent(), "test"))
    changed = intent(lines=(LineIn("l1", "SKU-A", 3, eur(1000)), LineIn("l2", "SKU-B", 1, eur(550))))
    b = canonical_content(changed, "test")
    assert content_hash(a) != content_hash(b)
    assert differing_fields(a, b) == ["intent.lines[0].quantity"]
    c = canonical_content(intent(customer_ref="c-9", payments=()), "test")
    assert differing_fields(a, c) == ["intent.customer_ref", "intent.payments"]


@pytest.mark.parametrize(
    ("current", "target", "ok"),
    [
        (State.PENDING, State.PROCESSING, True),
        (State.PENDING, State.CANCELLED, True),
        (State.PROCESSING, State.CANCELLED, True),
        (State.PROCESSING, State.SHIPPED, True),
        (State.PARTIALLY_SHIPPED, State.SHIPPED, True),
        (State.SHIPPED, State.DELIVERED, True),
        (State.PENDING, State.SHIPPED, False),
        (State.PENDING, State.DELIVERED, False),
        (State.PARTIALLY_SHIPPED, State.CANCELLED, False),
        (State.SHIPPED, State.CANCELLED, False),
        (State.DELIVERED, State.PROCESSING, False),
        (State.CANCELLED, State.PROCESSING, False),
    ],
)
def test_lifecycle(current: State, target: State, ok: bool) -> None:
    if ok:
        check_transition("o", current, target)
    else:
        with pytest.raises(FailedPrecondition) as exc:
            check_transition("o", current, target)
        assert exc.value.reason == "INVALID_STATE_TRANSITION"


def test_status_namespaces() -> None:
    ns = frozenset({"procurement"})
    assert validate_status(StatusIn("procurement:blocking_exception", Severity.BLOCKING), ns) == (
        "procurement",
        "blocking_exception",
    )
    with pytest.raises(PermissionDenied) as exc:
        validate_status(StatusIn("payment:captured"), ns)
    assert exc.value.reason == "STATUS_NAMESPACE_FORBIDDEN"
    with pytest.raises(PermissionDenied) as exc:
        validate_status(StatusIn("order:shipped"), frozenset({"order"}))
    assert exc.value.reason == "STATUS_CODE_RESERVED"
    validate_status(
        StatusIn("order:manually_adjusted", payload={"note": "fixed address"}), frozenset({"order"})
    )
    with pytest.raises(InvalidArgument):
        validate_status(StatusIn("order:manually_adjusted"), frozenset({"order"}))
    for bad in ("Procurement:x", "procurement", "procurement:", ":x", "a:b:c"):
        with pytest.raises(InvalidArgument):
            validate_status(StatusIn(bad), frozenset({"*"}))


def test_payload_is_a_json_object_without_floats() -> None:
    assert parse_payload('{"amount_minor": 120, "note": "x"}') == {"amount_minor": 120, "note": "x"}
    assert parse_payload("") == {}
    for bad in ("[1]", "{", '{"amount": 1.5}', "x" * 20000):
        with pytest.raises(InvalidArgument):
            parse_payload(bad)


def test_stored_content_reads_back_into_the_same_intent() -> None:
    from datetime import UTC, datetime

    from domain.order.rules import intent_of_content

    for i in (
        intent(submitted_at=datetime(2026, 12, 1, 9, 30, tzinfo=UTC), customer_ref="c-1"),
        intent(reissued_from="0f0c7a4e-0000-4000-8000-000000000001", reissue_reason="lost", payments=()),
    ):
        content = canonical_content(i, "web")
        assert intent_of_content(content) == i
        assert content_hash(canonical_content(intent_of_content(content), "web")) == content_hash(content)
    plain = canonical_content(intent(), "web")
    assert "reissue" not in plain, "the content of intents that are not reissues keeps its shape"
    assert canonical_content(intent(reissued_from="x", reissue_reason="r"), "web")["reissue"] == {
        "of": "x",
        "reason": "r",
    }
