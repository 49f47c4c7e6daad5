"""The outbox's final id (domain/shared/outbox.py `Horizon`): an observation (the highest
id drawn, then a snapshot's bounds) becomes final once every transaction the snapshot
counted as possibly running has ended, never before."""

from __future__ import annotations

from domain.shared.outbox import Final, Horizon


def test_an_observation_with_no_transaction_running_is_final_at_once() -> None:
    h = Horizon()
    assert h.observe(10, "100:100:", 100, 100) == Final(10, "100:100:")
    assert not h.pending


def test_an_observation_waits_for_the_transactions_running_when_it_was_made() -> None:
    h = Horizon()
    # Ids up to 10 drawn; transactions 95..99 may still run (one of them may hold id 9).
    assert h.observe(10, "95:100:95,97", 95, 100) is None
    assert h.pending
    # 95 ended, 97 still runs (xmin 97): ids up to 10 are not final yet.
    assert h.observe(12, "97:103:97", 97, 103) is None
    # Everything below 100 ended: 10 is final, 12 waits for transactions below 103.
    assert h.observe(12, "101:104:101", 101, 104) == Final(10, "101:104:101")
    assert h.pending
    assert h.observe(15, "104:104:", 104, 104) == Final(15, "104:104:")
    assert not h.pending


def test_the_final_id_never_goes_back() -> None:
    h = Horizon()
    h.observe(20, "50:50:", 50, 50)
    # A later observation of the same id adds nothing to wait for.
    assert h.observe(20, "50:52:50", 50, 52) == Final(20, "50:50:")
    assert not h.pending


def test_waiting_observations_are_bounded_and_merge_late_never_early() -> None:
    h = Horizon()
    # A transaction (xid 1) runs through 200 observations.
    for i in range(200):
        assert h.observe(i + 1, f"1:{i + 10}:1", 1, i + 10) is None
    assert h.pending
    # Transaction 1 ends; those that started later still run (xmin 50).
    # Only observations whose snapshot had xmax <= 50 (ids up to 41) may be final; the merged
    # ones wait longer than they had to, never less.
    final = h.observe(201, "50:300:50", 50, 300)
    assert final is not None and final.last_id <= 41
    assert h.observe(201, "300:300:", 300, 300) == Final(201, "300:300:")
