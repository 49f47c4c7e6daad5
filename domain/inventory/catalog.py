"""Warehouses, inventory items (ordinary CRUD, through the ORM) and kit
definitions (an item made of other items, docs/kits.md; SQL text)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from sqlalchemy import select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.inventory.models import ItemRow, WarehouseRow
from domain.inventory.types import ADDRESS_FIELDS, CONTACT_FIELDS, GeoPoint, Item, KitComponent, Warehouse
from domain.inventory.validation import (
    MAX_QUANTITY,
    check_geo_point,
    check_quantity,
    check_sku,
    check_text,
    check_warehouse_code,
    filters_or_raise,
    sku_or_raise,
)
from domain.shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PreconditionViolation,
    Violations,
)
from domain.shared.outbox import Event, emit
from domain.shared.pagination import decode_token, encode_token, page_size

WAREHOUSE_UPDATABLE = ("name", "address", "contact", "priority", "active", "location")


def _warehouse(row: WarehouseRow) -> Warehouse:
    return Warehouse(
        code=row.code,
        name=row.name,
        address=dict(row.address or {}),
        contact=dict(row.contact or {}),
        priority=row.priority,
        active=row.active,
        created_at=row.created_at,
        updated_at=row.updated_at,
        location=None
        if row.latitude is None or row.longitude is None
        else GeoPoint(row.latitude, row.longitude),
    )


def _item(row: ItemRow, components: tuple[KitComponent, ...] = ()) -> Item:
    return Item(
        sku=row.sku,
        track_inventory=row.track_inventory,
        allow_backorder=row.allow_backorder,
        max_backorder=row.max_backorder,
        low_stock_threshold=row.low_stock_threshold,
        created_at=row.created_at,
        updated_at=row.updated_at,
        components=components,
    )


def _clean(values: Mapping[str, str], allowed: tuple[str, ...]) -> dict[str, str]:
    return {k: str(values[k]).strip() for k in allowed if values.get(k)}


def _check_warehouse_fields(
    v: Violations, name: str, address: Mapping[str, str], contact: Mapping[str, str], priority: int
) -> None:
    if not name.strip() or len(name) > 200:
        v.add("warehouse.name", "must be 1 to 200 characters")
    check_text(v, "warehouse.name", name, 200)
    for k, val in address.items():
        check_text(v, f"warehouse.address.{k}", str(val), 200)
    cc = address.get("country_code", "")
    if cc and (len(cc) != 2 or not cc.isalpha() or not cc.isupper()):
        v.add("warehouse.address.country_code", "must be an ISO-3166-1 alpha-2 code such as 'FR'")
    for k, val in contact.items():
        check_text(v, f"warehouse.contact.{k}", str(val), 200)
    if not -1_000_000 <= priority <= 1_000_000:
        v.add("warehouse.priority", "must be between -1000000 and 1000000")


async def create_warehouse(
    session: AsyncSession,
    *,
    code: str,
    name: str,
    address: Mapping[str, str],
    contact: Mapping[str, str],
    priority: int = 0,
    location: GeoPoint | None = None,
) -> Warehouse:
    v = Violations()
    check_warehouse_code(v, "warehouse.code", code)
    addr, cont = _clean(address, ADDRESS_FIELDS), _clean(contact, CONTACT_FIELDS)
    _check_warehouse_fields(v, name, addr, cont, priority)
    if location is not None:
        check_geo_point(v, "warehouse.location", location)
    v.raise_if_any("the warehouse is invalid")
    row = (
        await session.execute(
            insert(WarehouseRow)
            .values(
                code=code,
                name=name.strip(),
                address=addr,
                contact=cont,
                priority=priority,
                active=True,
                latitude=None if location is None else location.latitude,
                longitude=None if location is None else location.longitude,
            )
            .on_conflict_do_nothing(index_elements=["code"])
            .returning(WarehouseRow)
        )
    ).scalar_one_or_none()
    if row is None:
        raise AlreadyExists("WAREHOUSE_EXISTS", f"warehouse {code!r} already exists", metadata={"code": code})
    await emit(session, Event("inventory.warehouse_created", "warehouse", code, {"code": code}))
    return _warehouse(row)


async def get_warehouse(session: AsyncSession, code: str) -> Warehouse:
    filters_or_raise(code=code)
    row = await session.get(WarehouseRow, code)
    if row is None:
        raise NotFound("WAREHOUSE_NOT_FOUND", f"warehouse {code!r} does not exist", metadata={"code": code})
    return _warehouse(row)


async def update_warehouse(
    session: AsyncSession,
    *,
    code: str,
    fields: Collection[str],
    name: str = "",
    address: Mapping[str, str] | None = None,
    contact: Mapping[str, str] | None = None,
    priority: int = 0,
    active: bool = True,
    location: GeoPoint | None = None,
) -> Warehouse:
    """Field-mask update: only `fields` change (empty = all updatable fields).

    Paths may name sub-fields of address/contact ("address.city"); "location"
    with no location clears it."""
    paths = set(fields) or set(WAREHOUSE_UPDATABLE)
    v = Violations()
    for p in paths:
        top, _, sub = p.partition(".")
        if top not in WAREHOUSE_UPDATABLE or (
            sub
            and not (
                (top == "address" and sub in ADDRESS_FIELDS) or (top == "contact" and sub in CONTACT_FIELDS)
            )
        ):
            v.add("update_mask", f"{p!r} cannot be updated (updatable: {', '.join(WAREHOUSE_UPDATABLE)})")
    v.raise_if_any("the update is invalid")
    row = (
        await session.execute(select(WarehouseRow).where(WarehouseRow.code == code).with_for_update())
    ).scalar_one_or_none()
    if row is None:
        raise NotFound("WAREHOUSE_NOT_FOUND", f"warehouse {code!r} does not exist", metadata={"code": code})
    new_addr = dict(row.address or {})
    new_cont = dict(row.contact or {})
    given_addr = _clean(address or {}, ADDRESS_FIELDS)
    given_cont = _clean(contact or {}, CONTACT_FIELDS)
    if "address" in paths:
        new_addr = given_addr
    if "contact" in paths:
        new_cont = given_cont
    for p in paths:
        top, _, sub = p.partition(".")
        if sub and top == "address":
            new_addr.pop(sub, None)
            if sub in given_addr:
                new_addr[sub] = given_addr[sub]
        if sub and top == "contact":
            new_cont.pop(sub, None)
            if sub in given_cont:
                new_cont[sub] = given_cont[sub]
    new_name = name if "name" in paths else row.name
    new_priority = priority if "priority" in paths else row.priority
    _check_warehouse_fields(v, new_name, new_addr, new_cont, new_priority)
    if "location" in paths and location is not None:
        check_geo_point(v, "warehouse.location", location)
    v.raise_if_any("the warehouse is invalid")
    row.name, row.address, row.contact, row.priority = new_name.strip(), new_addr, new_cont, new_priority
    if "location" in paths:
        row.latitude = None if location is None else location.latitude
        row.longitude = None if location is None else location.longitude
    if "active" in paths:
        row.active = active
    await session.flush()
    await session.refresh(row)
    await emit(
        session,
        Event("inventory.warehouse_updated", "warehouse", code, {"code": code, "fields": sorted(paths)}),
    )
    return _warehouse(row)


async def deactivate_warehouse(session: AsyncSession, code: str) -> Warehouse:
    return await update_warehouse(session, code=code, fields=["active"], active=False)


async def list_warehouses(
    session: AsyncSession, *, size: int, token: str, include_inactive: bool = False
) -> tuple[list[Warehouse], str]:
    """Ordered by allocation order (priority, code)."""
    n = page_size(size)
    filters = {"w": "warehouses", "inactive": include_inactive}
    after = decode_token(token, filters)
    stmt = select(WarehouseRow).order_by(WarehouseRow.priority, WarehouseRow.code).limit(n + 1)
    if not include_inactive:
        stmt = stmt.where(WarehouseRow.active)
    if after is not None:
        # A row comparison in SQL (a Python tuple comparison would compare the priority alone
        # and skip the rest of a page boundary's priority).
        stmt = stmt.where(
            tuple_(WarehouseRow.priority, WarehouseRow.code) > tuple_(int(after[0]), str(after[1]))
        )
    rows = list((await session.execute(stmt)).scalars())
    more = len(rows) > n
    rows = rows[:n]
    nxt = encode_token([rows[-1].priority, rows[-1].code], filters) if more else ""
    return [_warehouse(r) for r in rows], nxt


async def upsert_item(
    session: AsyncSession,
    *,
    sku: str,
    track_inventory: bool = True,
    allow_backorder: bool = False,
    max_backorder: int = 0,
    low_stock_threshold: int = 0,
) -> Item:
    v = Violations()
    sku = check_sku(v, "item.sku", sku)
    if not 0 <= max_backorder <= MAX_QUANTITY:
        v.add("item.max_backorder_quantity", f"must be between 0 and {MAX_QUANTITY}")
    if not 0 <= low_stock_threshold <= MAX_QUANTITY:
        v.add("item.low_stock_threshold", f"must be between 0 and {MAX_QUANTITY}")
    v.raise_if_any("the item is invalid")
    values = {
        "track_inventory": track_inventory,
        "allow_backorder": allow_backorder,
        "max_backorder": max_backorder,
        "low_stock_threshold": low_stock_threshold,
    }
    ins = insert(ItemRow).values(sku=sku, **values)
    stmt = ins.on_conflict_do_update(
        index_elements=["sku"], set_={**values, "updated_at": ins.excluded.updated_at}
    ).returning(ItemRow)
    row = (await session.execute(stmt, execution_options={"populate_existing": True})).scalar_one()
    await emit(session, Event("inventory.item_upserted", "sku", sku, {"sku": sku, **values}))
    return _item(row, await _components(session, sku) if row.is_kit else ())


async def get_item(session: AsyncSession, sku: str) -> Item:
    sku = sku_or_raise(sku)
    row = await session.get(ItemRow, sku)
    if row is None:
        raise NotFound("ITEM_NOT_FOUND", f"inventory item {sku!r} does not exist", metadata={"sku": sku})
    return _item(row, await _components(session, sku) if row.is_kit else ())


# ---------------------------------------------------------------- kits (docs/kits.md)

MAX_KIT_COMPONENTS = 50
MAX_UNITS_PER_KIT = 1_000_000

_COMPONENTS = text(
    "SELECT component_sku, quantity FROM inventory.kit_components WHERE kit_sku = :sku ORDER BY component_sku"
)
# The kit's and the components' item rows, locked in one global order: two
# definitions touching the same items run one after the other, so the nesting
# checks below see each other's result.
_LOCK_ITEMS = text(
    "SELECT sku, is_kit FROM inventory.items WHERE sku = ANY(CAST(:skus AS text[])) ORDER BY sku FOR UPDATE"
)
_KIT_FACTS = text(
    """SELECT EXISTS (SELECT 1 FROM inventory.stock_levels WHERE sku = :sku) AS has_levels,
              ARRAY(SELECT kit_sku FROM inventory.kit_components WHERE component_sku = :sku ORDER BY kit_sku)
                  AS part_of"""
)
_CLEAR_COMPONENTS = text("DELETE FROM inventory.kit_components WHERE kit_sku = :sku")
_ADD_COMPONENTS = text(
    """INSERT INTO inventory.kit_components (kit_sku, component_sku, quantity)
       SELECT :sku, c, q FROM unnest(CAST(:components AS text[]), CAST(:quantities AS bigint[])) AS t(c, q)"""
)
_SET_KIT = text("UPDATE inventory.items SET is_kit = :is_kit, updated_at = now() WHERE sku = :sku")


async def _components(session: AsyncSession, sku: str) -> tuple[KitComponent, ...]:
    rows = (await session.execute(_COMPONENTS, {"sku": sku})).all()
    return tuple(KitComponent(r.component_sku, int(r.quantity)) for r in rows)


async def set_kit_components(session: AsyncSession, *, sku: str, components: Sequence[KitComponent]) -> Item:
    """Make `sku` a kit of `components` (replacing its definition), or, with no
    components, a simple item again. Reservations already made keep the
    expansion they were made with. Components must be existing simple items
    (no kit inside a kit); the kit must not be a component of another kit, and
    an item that has stock levels cannot become a kit (a kit has no stock of its own)."""
    v = Violations()
    sku = check_sku(v, "sku", sku)
    if len(components) > MAX_KIT_COMPONENTS:
        v.add("components", f"at most {MAX_KIT_COMPONENTS} components")
    norm: list[KitComponent] = []
    seen: set[str] = set()
    for i, c in enumerate(components):
        c_sku = check_sku(v, f"components[{i}].sku", c.sku)
        check_quantity(v, f"components[{i}].quantity", c.quantity)
        if c.quantity > MAX_UNITS_PER_KIT:
            v.add(f"components[{i}].quantity", f"must be at most {MAX_UNITS_PER_KIT}")
        if c_sku == sku:
            v.add(f"components[{i}].sku", "a kit cannot contain itself")
        elif c_sku in seen:
            v.add(f"components[{i}].sku", f"{c_sku!r} is listed twice")
        seen.add(c_sku)
        norm.append(KitComponent(c_sku, c.quantity))
    v.raise_if_any("the kit definition is invalid")
    rows = (await session.execute(_LOCK_ITEMS, {"skus": sorted({sku, *seen})})).all()
    is_kit = {r.sku: bool(r.is_kit) for r in rows}
    if sku not in is_kit:
        raise NotFound("ITEM_NOT_FOUND", f"inventory item {sku!r} does not exist", metadata={"sku": sku})
    refused: list[PreconditionViolation] = []
    for i, c in enumerate(norm):
        if c.sku not in is_kit:
            refused.append(
                PreconditionViolation(
                    "COMPONENT_NOT_FOUND", f"components[{i}]", f"no inventory item {c.sku!r}"
                )
            )
        elif is_kit[c.sku]:
            refused.append(
                PreconditionViolation(
                    "KIT_NESTING", f"components[{i}]", f"{c.sku!r} is a kit; a kit cannot contain a kit"
                )
            )
    facts = (await session.execute(_KIT_FACTS, {"sku": sku})).one()
    if norm and facts.part_of:
        refused.append(
            PreconditionViolation(
                "KIT_NESTING",
                sku,
                f"{sku!r} is a component of {', '.join(map(repr, facts.part_of))}; a kit cannot be a component",
            )
        )
    if norm and not is_kit[sku] and facts.has_levels:
        refused.append(
            PreconditionViolation(
                "ITEM_HAS_STOCK", sku, f"{sku!r} has stock levels; a kit has no stock of its own"
            )
        )
    if refused:
        reasons = {p.type for p in refused}
        raise FailedPrecondition(
            reasons.pop() if len(reasons) == 1 else "KIT_DEFINITION_REFUSED",
            f"{sku!r} cannot be a kit of these components",
            metadata={"sku": sku},
            precondition_violations=refused,
        )
    await session.execute(_CLEAR_COMPONENTS, {"sku": sku})
    if norm:
        await session.execute(
            _ADD_COMPONENTS,
            {"sku": sku, "components": [c.sku for c in norm], "quantities": [c.quantity for c in norm]},
        )
    await session.execute(_SET_KIT, {"sku": sku, "is_kit": bool(norm)})
    await emit(
        session,
        Event(
            "inventory.kit_defined",
            "sku",
            sku,
            {"sku": sku, "components": [{"sku": c.sku, "quantity": c.quantity} for c in norm]},
        ),
    )
    return await get_item(session, sku)


async def kit_components_of(
    session: AsyncSession, skus: Collection[str]
) -> dict[str, tuple[KitComponent, ...]]:
    """The definitions of the kits among `skus` (simple items are absent)."""
    rows = (
        await session.execute(
            text(
                """SELECT kit_sku, component_sku, quantity FROM inventory.kit_components
                   WHERE kit_sku = ANY(CAST(:skus AS text[])) ORDER BY kit_sku, component_sku"""
            ),
            {"skus": list(skus)},
        )
    ).all()
    out: dict[str, list[KitComponent]] = {}
    for r in rows:
        out.setdefault(r.kit_sku, []).append(KitComponent(r.component_sku, int(r.quantity)))
    return {k: tuple(v) for k, v in out.items()}
