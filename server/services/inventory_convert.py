"""InventoryService: proto <-> domain conversions (one place)."""

from __future__ import annotations

from google.protobuf.message import Message

from domain import inventory as inv
from domain.shared.errors import FieldViolation, InvalidArgument
from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.platform.v1 import types_pb2
from server.convert import ts

MOVEMENT_TO_PROTO = {
    "receive": pb.MOVEMENT_TYPE_RECEIVE,
    "adjust": pb.MOVEMENT_TYPE_ADJUST,
    "set": pb.MOVEMENT_TYPE_SET,
    "reserve": pb.MOVEMENT_TYPE_RESERVE,
    "release": pb.MOVEMENT_TYPE_RELEASE,
    "fulfil": pb.MOVEMENT_TYPE_FULFIL,
    "return": pb.MOVEMENT_TYPE_RETURN,
    "import": pb.MOVEMENT_TYPE_IMPORT,
    "sync": pb.MOVEMENT_TYPE_SYNC,
    "audit": pb.MOVEMENT_TYPE_AUDIT,
}
MOVEMENT_FROM_PROTO: dict[int, str] = {int(v): k for k, v in MOVEMENT_TO_PROTO.items()}
STATE_TO_PROTO = {
    "active": pb.Reservation.STATE_ACTIVE,
    "fulfilled": pb.Reservation.STATE_FULFILLED,
    "released": pb.Reservation.STATE_RELEASED,
    "expired": pb.Reservation.STATE_EXPIRED,
}
STATE_FROM_PROTO: dict[int, str] = {int(v): k for k, v in STATE_TO_PROTO.items()}
STRATEGY_TO_PROTO = {
    "priority": pb.ALLOCATION_STRATEGY_PRIORITY,
    "high_stock": pb.ALLOCATION_STRATEGY_HIGH_STOCK,
    "fewest_splits": pb.ALLOCATION_STRATEGY_FEWEST_SPLITS,
    "nearest": pb.ALLOCATION_STRATEGY_NEAREST,
}
STRATEGY_FROM_PROTO: dict[int, str] = {
    int(pb.ALLOCATION_STRATEGY_UNSPECIFIED): "priority",
    **{int(v): k for k, v in STRATEGY_TO_PROTO.items()},
}


def address_to_dict(a: types_pb2.PostalAddress) -> dict[str, str]:
    return {f: getattr(a, f) for f in inv.ADDRESS_FIELDS if getattr(a, f)}


def contact_to_dict(c: types_pb2.Contact) -> dict[str, str]:
    return {f: getattr(c, f) for f in inv.CONTACT_FIELDS if getattr(c, f)}


def warehouse_to_proto(w: inv.Warehouse) -> pb.Warehouse:
    return pb.Warehouse(
        code=w.code,
        name=w.name,
        address=types_pb2.PostalAddress(**{k: v for k, v in w.address.items() if k in inv.ADDRESS_FIELDS}),
        contact=types_pb2.Contact(**{k: v for k, v in w.contact.items() if k in inv.CONTACT_FIELDS}),
        priority=w.priority,
        active=w.active,
        create_time=ts(w.created_at),
        update_time=ts(w.updated_at),
        location=None
        if w.location is None
        else pb.GeoPoint(latitude=w.location.latitude, longitude=w.location.longitude),
    )


def item_to_proto(i: inv.Item) -> pb.InventoryItem:
    return pb.InventoryItem(
        sku=i.sku,
        track_inventory=i.track_inventory,
        allow_backorder=i.allow_backorder,
        max_backorder_quantity=i.max_backorder,
        low_stock_threshold=i.low_stock_threshold,
        create_time=ts(i.created_at),
        update_time=ts(i.updated_at),
        components=[pb.KitComponent(sku=c.sku, quantity=c.quantity) for c in i.components],
    )


def kit_components(values: list[pb.KitComponent]) -> list[inv.KitComponent]:
    return [inv.KitComponent(c.sku, c.quantity) for c in values]


def money(cost: inv.Cost | None) -> types_pb2.Money | None:
    return (
        None if cost is None else types_pb2.Money(currency_code=cost.currency, amount_minor=cost.amount_minor)
    )


def level_to_proto(lv: inv.StockLevel) -> pb.StockLevel:
    return pb.StockLevel(
        sku=lv.sku,
        warehouse_code=lv.warehouse_code,
        on_hand=lv.on_hand,
        reserved=lv.reserved,
        available=lv.available,
        backordered=lv.backordered,
        update_time=ts(lv.updated_at),
    )


def sku_stock_to_proto(st: inv.SkuStock) -> pb.SkuStock:
    return pb.SkuStock(
        sku=st.sku,
        warehouses=[level_to_proto(lv) for lv in st.levels],
        on_hand=st.on_hand,
        reserved=st.reserved,
        available=st.available,
        backordered=st.backordered,
        below_threshold=st.below_threshold,
        components=[pb.KitComponent(sku=c.sku, quantity=c.quantity) for c in st.components],
    )


def movement_to_proto(m: inv.Movement) -> pb.StockMovement:
    return pb.StockMovement(
        id=m.id,
        sku=m.sku,
        warehouse_code=m.warehouse_code,
        type=MOVEMENT_TO_PROTO[m.type],
        on_hand_before=m.on_hand_before,
        on_hand_after=m.on_hand_after,
        reserved_before=m.reserved_before,
        reserved_after=m.reserved_after,
        on_hand_delta=m.on_hand_delta,
        reserved_delta=m.reserved_delta,
        reason=m.reason,
        source=m.source,
        actor=m.actor,
        reference=m.reference,
        cost=money(m.cost),
        create_time=ts(m.created_at),
        kit_sku=m.kit_sku,
    )


def change_to_proto(c: inv.StockChange) -> pb.StockChange:
    return pb.StockChange(level=level_to_proto(c.level), movement=movement_to_proto(c.movement))


def reservation_to_proto(r: inv.Reservation) -> pb.Reservation:
    return pb.Reservation(
        id=str(r.id),
        reference=r.reference,
        state=STATE_TO_PROTO[r.state],
        lines=[
            pb.ReservationLine(
                sku=x.sku,
                warehouse_code=x.warehouse_code,
                quantity=x.quantity,
                backordered_quantity=x.backordered,
                fulfilled_quantity=x.fulfilled,
                released_quantity=x.released,
                open_quantity=x.open_quantity,
                kit_sku=x.kit_sku,
                quantity_per_kit=x.quantity_per_kit,
            )
            for x in r.lines
        ],
        kits=[
            pb.ReservationKit(
                sku=k.sku,
                quantity=k.quantity,
                fulfilled_quantity=k.fulfilled,
                released_quantity=k.released,
                open_quantity=k.open_quantity,
            )
            for k in r.kits
        ],
        expire_time=ts(r.expires_at),
        create_time=ts(r.created_at),
        update_time=ts(r.updated_at),
        backordered_quantity=r.backordered,
    )


def movement_types(values: list[int]) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v not in MOVEMENT_FROM_PROTO:
            raise InvalidArgument("INVALID_ARGUMENT", f"types[{i}] is not a movement type")
        out.append(MOVEMENT_FROM_PROTO[v])
    return out


def quantities(lines: list[pb.ReservationQuantity]) -> list[inv.LineQuantity] | None:
    """Empty means "everything still held"."""
    if not lines:
        return None
    return [inv.LineQuantity(x.sku, x.quantity, x.warehouse_code) for x in lines]


DRIFT_TO_PROTO = {
    "on_hand": pb.STOCK_DRIFT_KIND_ON_HAND,
    "reserved": pb.STOCK_DRIFT_KIND_RESERVED,
    "lots": pb.STOCK_DRIFT_KIND_LOTS,
}
DRIFT_FROM_PROTO: dict[int, str] = {int(v): k for k, v in DRIFT_TO_PROTO.items()}


def drift_kind(value: int) -> str:
    """A StockDriftKind as the domain's name ("" for UNSPECIFIED or unknown: the domain refuses it)."""
    return DRIFT_FROM_PROTO.get(value, "")


def drift_kinds(values: list[int]) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v not in DRIFT_FROM_PROTO:
            raise InvalidArgument("INVALID_ARGUMENT", f"kinds[{i}] is not a drift kind")
        out.append(DRIFT_FROM_PROTO[v])
    return out


def drift_to_proto(d: inv.Drift) -> pb.StockDrift:
    return pb.StockDrift(
        sku=d.sku,
        warehouse_code=d.warehouse_code,
        kind=DRIFT_TO_PROTO[d.kind],
        counter=d.counter,
        derived=d.derived,
        difference=d.difference,
    )


def repair_to_proto(r: inv.Repair) -> pb.RepairStockResponse:
    return pb.RepairStockResponse(
        repaired=r.repaired,
        drift=drift_to_proto(r.drift),
        movement=movement_to_proto(r.movement) if r.movement else None,
        level=level_to_proto(r.level),
    )


def channel_allocation_to_proto(a: inv.ChannelAllocation) -> pb.ChannelAllocation:
    return pb.ChannelAllocation(
        channel=a.channel,
        warehouse_codes=a.warehouse_codes,
        strategy=STRATEGY_TO_PROTO[a.strategy],
        update_time=ts(a.updated_at),
    )


def strategy_from_proto(value: int) -> str:
    """The domain name of a strategy; an unknown number is INVALID_ARGUMENT."""
    name = STRATEGY_FROM_PROTO.get(value)
    if name is None:
        raise InvalidArgument(
            "INVALID_ARGUMENT",
            f"unknown allocation strategy {value}",
            field_violations=[FieldViolation("allocation.strategy", "unknown value")],
        )
    return name


def geo_point_from_proto(owner: Message, field: str) -> inv.GeoPoint | None:
    """The GeoPoint in `owner.field`, None when unset."""
    if not owner.HasField(field):
        return None
    p = getattr(owner, field)
    return inv.GeoPoint(p.latitude, p.longitude)
