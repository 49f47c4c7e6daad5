"""Throttled: an outage's per-call warning is written once a second per key, with a count."""

from __future__ import annotations

import logging

import pytest

from server.logs import Throttled


def test_repeats_within_the_interval_are_counted_not_written(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttled = Throttled(logging.getLogger("test.throttled"), every=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for _ in range(500):
            throttled.warning("/pkg.Svc/A", "database unavailable", {"method": "/pkg.Svc/A"})
            now[0] += 0.001  # 500 calls in half a second
        throttled.warning("/pkg.Svc/B", "database unavailable", {"method": "/pkg.Svc/B"})
        now[0] = 101.0
        throttled.warning("/pkg.Svc/A", "database unavailable", {"method": "/pkg.Svc/A"})
    written = [(r.method, r.suppressed) for r in caplog.records]  # type: ignore[attr-defined]
    # First of A, first of B (its own key), then A again after a second with the 499 it left out.
    assert written == [("/pkg.Svc/A", 0), ("/pkg.Svc/B", 0), ("/pkg.Svc/A", 499)]
