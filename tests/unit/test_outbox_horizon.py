"""The outbox's final id (domain/shared/outbox.py `Horizon`): an observation (the highest
id drawn, then the observer's own transaction id) becomes final once every transaction
below the observer's has ended, never before."""

from __future__ import annotations

from domain.shared.outbox import Final, Horizon


def test_an_observation_is_final_once_every_transaction_below_the_observers_ended() -> None:
    h = Horizon()
    # Ids up to 10 drawn; the observer is transaction 100 (a transaction below it may
    # hold id 9 and not have committed yet, even one above the snapshot's xmax).
    assert h.observe(10, 100, "95:96:95", 95) is None
    assert h.pending
    # Transactions below 97 ended, 97 still runs: not final yet.
    assert h.observe(10, None, "97:101:97", 97) is None
    # Everything up to the observer's transaction ended.
    assert h.observe(10, None, "101:101:", 101) == Final(10, "101:101:")
    assert not h.pending


def test_an_observation_with_no_new_id_adds_nothing_to_wait_for() -> None:
    h = Horizon()
    h.observe(20, 50, "50:50:", 50)
    assert h.observe(20, None, "51:51:", 51) == Final(20, "51:51:")
    assert h.known() == 20
    # Nothing new: the final id stays, nothing is pending.
    assert h.observe(20, None, "60:60:", 60) == Final(20, "51:51:")
    assert not h.pending


def test_later_observations_become_final_in_turn() -> None:
    h = Horizon()
    assert h.observe(10, 100, "90:90:", 90) is None
    assert h.observe(15, 105, "99:99:", 99) is None
    assert h.observe(15, None, "101:106:101", 101) == Final(10, "101:106:101")
    assert h.pending
    assert h.observe(18, 110, "106:106:", 106) == Final(15, "106:106:")
    assert h.observe(18, None, "111:111:", 111) == Final(18, "111:111:")
    assert not h.pending


def test_waiting_observations_are_bounded_and_merge_late_never_early() -> None:
    h = Horizon()
    # A transaction (xid 1) runs through 200 observations (observers 10, 11, ...).
    for i in range(200):
        assert h.observe(i + 1, i + 10, "1:5:1", 1) is None
    assert h.pending
    # Transaction 1 ends; observers from 50 on still run: only observations made by a
    # transaction below 50 (ids up to 40) may be final; merged ones wait longer, never less.
    final = h.observe(200, None, "50:300:50", 50)
    assert final is not None and final.last_id <= 40
    assert h.observe(200, None, "300:300:", 300) == Final(200, "300:300:")
