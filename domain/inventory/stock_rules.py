"""The stock rules, once in SQL and once in Python (a table-driven test proves the two agree).

- available = on_hand - reserved (negative while backordered);
- the backorder allowance: reserved may exceed on_hand only for an item that
  allows backorders, and by at most max_backorder (0 = unlimited);
- the guard of a reservation: the level stays within the allowance after it;
- the guard of an on_hand change: on_hand stays >= 0, and a decrease must keep
  the level within the allowance (an increase, or an untracked item, always may).

The SQL forms are fragments over a level row and an item row (their aliases
are parameters, and so are the expressions for the new counters), to be
placed in the guarded UPDATE of every writer: stock changes, reservations,
sync and the reserve batch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """An item's stock policy."""

    track_inventory: bool = True
    allow_backorder: bool = False
    max_backorder: int = 0  # 0 = unlimited
    low_stock_threshold: int = 0


@dataclass
class Level:
    """A stock level's counters."""

    on_hand: int = 0
    reserved: int = 0

    @property
    def available(self) -> int:
        return available(self.on_hand, self.reserved)


def available(on_hand: int, reserved: int) -> int:
    return on_hand - reserved


def within_allowance(on_hand: int, reserved: int, policy: Policy) -> bool:
    """May a level hold these counters (reserved beyond on_hand only as a backorder)?"""
    over = reserved - on_hand
    return over <= 0 or (
        policy.allow_backorder and (policy.max_backorder == 0 or over <= policy.max_backorder)
    )


def may_reserve(on_hand: int, reserved: int, quantity: int, policy: Policy) -> bool:
    """The guard of a reservation of `quantity` more units."""
    return within_allowance(on_hand, reserved + quantity, policy)


def may_set_on_hand(new: int, old: int, reserved: int, policy: Policy) -> bool:
    """The guard of an on_hand change from `old` to `new`."""
    return new >= 0 and (new >= old or not policy.track_inventory or within_allowance(new, reserved, policy))


def available_sql(level: str = "s") -> str:
    return f"({level}.on_hand - {level}.reserved)"


def within_allowance_sql(on_hand: str, reserved: str, item: str = "i") -> str:
    """within_allowance over SQL expressions for the counters and the item row's alias."""
    over = f"(({reserved}) - ({on_hand}))"
    return f"({over} <= 0 OR ({item}.allow_backorder AND ({item}.max_backorder = 0 OR {over} <= {item}.max_backorder)))"


def may_reserve_sql(quantity: str, level: str = "s", item: str = "i") -> str:
    return within_allowance_sql(f"{level}.on_hand", f"{level}.reserved + ({quantity})", item)


def may_set_on_hand_sql(new: str, level: str = "s", item: str = "i") -> str:
    return (
        f"(({new}) >= 0 AND (({new}) >= {level}.on_hand OR NOT {item}.track_inventory"
        f" OR {within_allowance_sql(new, f'{level}.reserved', item)}))"
    )
