"""Kits on the reserve path (pure, no I/O): a request's kit lines become demand
for their components, and the allocation of that demand is told back to the
lines it came from (docs/kits.md).

`expand` runs where a request's lines become per-SKU demand (reservations._allocate,
before allocation.allocate sums the lines of one SKU): a kit line of n kits
becomes one line of n * required units per component, in the kit line's
warehouse when it names one, so a kit's demand is added to every other demand
for the same components in the same request and allocated all or nothing with
it. `attribute` splits the allocations (one per SKU and warehouse) back over
the demands, so each reservation line (and its ledger row) says which kit line
it belongs to, with the units per kit it was reserved with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from domain.inventory.allocation import Alloc
from domain.inventory.types import KitComponent, LineRequest
from domain.inventory.validation import MAX_QUANTITY
from domain.shared.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True)
class Demand:
    """Units of one SKU a request asks for: a plain line (kit_sku "") or a kit's component."""

    sku: str
    quantity: int
    warehouse_code: str
    kit_sku: str = ""
    quantity_per_kit: int = 0


def expand(
    lines: Sequence[LineRequest], definitions: Mapping[str, Sequence[KitComponent]]
) -> tuple[list[LineRequest], list[Demand]]:
    """The request's lines with every kit line replaced by its components' lines,
    and the demands they came from (one per plain line, one per kit component).
    Raises InvalidArgument when a kit's units of a component exceed the largest quantity."""
    out: list[LineRequest] = []
    demands: list[Demand] = []
    problems: list[FieldViolation] = []
    for i, line in enumerate(lines):
        components = definitions.get(line.sku)
        if not components:
            out.append(line)
            demands.append(Demand(line.sku, line.quantity, line.warehouse_code))
            continue
        for c in components:
            units = line.quantity * c.quantity
            if units > MAX_QUANTITY:
                problems.append(
                    FieldViolation(
                        f"lines[{i}].quantity",
                        f"{line.quantity} kits {line.sku!r} need {units} units of {c.sku!r}, "
                        f"more than {MAX_QUANTITY}",
                    )
                )
                continue
            out.append(LineRequest(c.sku, units, line.warehouse_code))
            demands.append(Demand(c.sku, units, line.warehouse_code, line.sku, c.quantity))
    if problems:
        raise InvalidArgument(
            "INVALID_ARGUMENT", "the reservation request is invalid", field_violations=problems
        )
    return out, demands


@dataclass
class _Left:
    """What an allocation still has to give: units on hand, then backordered ones."""

    alloc: Alloc
    on_hand: int
    backordered: int


def attribute(demands: Sequence[Demand], allocs: Sequence[Alloc]) -> list[Alloc]:
    """The allocations split over the demands they serve: per SKU, demands naming
    a warehouse take from that warehouse's allocation first, then the others
    take what is left in allocation order; within an allocation, units on hand
    go before backordered ones. Two demands of one kit line and component (the
    kit named twice) share one piece. Every allocated unit is attributed once."""
    left: dict[str, list[_Left]] = {}
    for a in allocs:
        left.setdefault(a.sku, []).append(_Left(a, a.quantity - a.backordered, a.backordered))
    merged: dict[tuple[str, str, str], Demand] = {}
    for d in demands:
        key = (d.sku, d.warehouse_code, d.kit_sku)
        prior = merged.get(key)
        merged[key] = (
            d
            if prior is None
            else Demand(d.sku, prior.quantity + d.quantity, d.warehouse_code, d.kit_sku, d.quantity_per_kit)
        )
    ordered = sorted(merged.values(), key=lambda d: not d.warehouse_code)  # stable: pinned first
    pieces: dict[tuple[str, str, str], Alloc] = {}
    for d in ordered:
        remaining = d.quantity
        for entry in left.get(d.sku, []):
            a = entry.alloc
            if d.warehouse_code and a.warehouse_code != d.warehouse_code:
                continue
            take_on_hand = min(remaining, entry.on_hand)
            take_backordered = min(remaining - take_on_hand, entry.backordered)
            taken = take_on_hand + take_backordered
            if not taken:
                continue
            entry.on_hand -= take_on_hand
            entry.backordered -= take_backordered
            remaining -= taken
            key = (d.sku, a.warehouse_code, d.kit_sku)
            piece = pieces.get(key)
            if piece is None:
                pieces[key] = Alloc(
                    d.sku, a.warehouse_code, taken, take_backordered, a.tracked, d.kit_sku, d.quantity_per_kit
                )
            else:
                piece.quantity += taken
                piece.backordered += take_backordered
            if not remaining:
                break
        if remaining:
            raise RuntimeError(f"allocation does not cover the demand for {d.sku!r}")
    return list(pieces.values())
