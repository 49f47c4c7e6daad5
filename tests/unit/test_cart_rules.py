"""Pure cart rules: limits, the rolling window in the channel's time zone, states."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

import pytest

from domain.cart.rules import (
    CartState,
    Limit,
    check_can_checkout,
    check_decider,
    check_editable,
    check_limits,
    limit_violations,
    subtotal,
    window_start,
)
from domain.shared.errors import FailedPrecondition, PermissionDenied


def types(limit: Limit, q: int, bought: int = 0) -> list[str]:
    return [v.type for v in limit_violations(limit, q, bought)]


def test_no_limits_means_anything_goes() -> None:
    assert types(Limit("S"), 10**6, 10**9) == []


def test_each_rule_reports_itself() -> None:
    lim = Limit("S", min_quantity=4, order_multiple=4, max_per_order=12, max_per_customer=20)
    assert types(lim, 4) == []
    assert types(lim, 2) == ["MIN_QUANTITY", "ORDER_MULTIPLE"]
    assert types(lim, 16) == ["MAX_PER_ORDER"]
    assert types(lim, 8, bought=12) == []
    assert types(lim, 12, bought=12) == ["MAX_PER_CUSTOMER"]
    # Refunds credited back can make `bought` negative net; never a bonus allowance.
    assert types(Limit("S", max_per_customer=5), 6, bought=-3) == ["MAX_PER_CUSTOMER"]


def test_check_limits_only_for_limited_skus() -> None:
    out = check_limits({"A": Limit("A", max_per_order=1)}, {"A": 2, "B": 99}, {})
    assert [(v.subject, v.type) for v in out] == [("A", "MAX_PER_ORDER")]


@pytest.mark.parametrize("tz", ["Europe/Paris", "Pacific/Kiritimati", "America/Los_Angeles", "UTC"])
def test_window_starts_at_local_midnight_29_days_before_today(tz: str) -> None:
    now = datetime(2026, 11, 21, 23, 30, tzinfo=UTC)
    start = window_start(now, tz)
    local = start.astimezone(zoneinfo.ZoneInfo(tz))
    assert (local.hour, local.minute) == (0, 0)
    today = now.astimezone(zoneinfo.ZoneInfo(tz)).date()
    assert (today - local.date()).days == 29


def test_window_depends_on_the_channel_time_zone() -> None:
    # 23:30 UTC on 21 Nov is already 22 Nov in Kiritimati (UTC+14): its window
    # starts a local day later than a UTC channel's.
    now = datetime(2026, 11, 21, 23, 30, tzinfo=UTC)
    utc_start = window_start(now, "UTC")
    kiri_start = window_start(now, "Pacific/Kiritimati")
    assert utc_start == datetime(2026, 10, 23, tzinfo=UTC)
    assert kiri_start == datetime(2026, 10, 23, 10, tzinfo=UTC)
    assert kiri_start - utc_start == timedelta(hours=10)


def test_window_across_dst_is_calendar_days() -> None:
    # Paris leaves summer time on 25 Oct 2026: the window still starts at local midnight.
    now = datetime(2026, 11, 10, 12, tzinfo=UTC)
    start = window_start(now, "Europe/Paris")
    assert start.astimezone(zoneinfo.ZoneInfo("Europe/Paris")).isoformat() == "2026-10-12T00:00:00+02:00"


def test_subtotal_is_integer_minor_units() -> None:
    assert subtotal([(3, 333), (1, 1)]) == 1000


def test_states() -> None:
    check_editable("c", CartState.ACTIVE)
    check_editable("c", CartState.REJECTED)
    for state, reason in [
        (CartState.PENDING_APPROVAL, "CART_LOCKED"),
        (CartState.CONVERTED, "CART_CONVERTED"),
    ]:
        with pytest.raises(FailedPrecondition) as exc:
            check_editable("c", state)
        assert exc.value.reason == reason
    check_can_checkout("c", CartState.ACTIVE, False)
    check_can_checkout("c", CartState.APPROVED, True)
    check_can_checkout("c", CartState.APPROVED_BLOCKED_INVENTORY, True)
    with pytest.raises(FailedPrecondition) as exc:
        check_can_checkout("c", CartState.ACTIVE, True)
    assert exc.value.reason == "APPROVAL_REQUIRED"


def test_four_eyes() -> None:
    check_decider("c", "manager", "buyer", "buyer")
    for who in ("buyer", "creator"):
        with pytest.raises(PermissionDenied) as exc:
            check_decider("c", who, "buyer", "creator")
        assert exc.value.reason == "SELF_APPROVAL_FORBIDDEN"


def test_an_approval_covers_only_what_it_approved() -> None:
    from domain.cart.rules import ApprovedLine, approval_stale, check_approval_current

    approved = (ApprovedLine("ln-1", "A", 2, 500),)
    changed = (ApprovedLine("ln-1", "A", 2, 400),)
    check_approval_current("c", CartState.APPROVED, True, approved, 1000, approved)
    check_approval_current("c", CartState.ACTIVE, True, None, None, changed)  # never approved
    check_approval_current("c", CartState.ACTIVE, False, approved, 1000, changed)  # approval not needed
    for state, lines, total in [
        (CartState.APPROVED, changed, 1000),  # lines differ from the approval
        (CartState.APPROVED, approved, 999),  # total differs from the approval
        (CartState.ACTIVE, approved, 1000),  # edited after approval (back to active)
    ]:
        with pytest.raises(FailedPrecondition) as exc:
            check_approval_current("c", state, True, approved, total, lines)
        assert exc.value.reason == "APPROVAL_STALE"
    assert not approval_stale(CartState.APPROVED, approved, approved)
    assert approval_stale(CartState.APPROVED, approved, changed)
    assert approval_stale(CartState.ACTIVE, approved, approved)
    assert not approval_stale(CartState.ACTIVE, None, changed)
    # Only a pending approval locks the cart now; an approved one is edited back to active.
    check_editable("c", CartState.APPROVED)
