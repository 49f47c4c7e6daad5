"""Inventory: the public interface of the module.

Other modules (orders, carts, refunds, the sync engineer's ingestion) call only
what is exported here, inside THEIR transaction: every function takes the
caller's AsyncSession and never commits, so a cross-module call (checkout:
reserve + create order) is one transaction, whole or nothing. Raise-on-refusal:
functions raise domain.shared.errors.DomainError subclasses; when one is raised,
the caller must roll back (UnitOfWork / rt.mutate do).

One formula everywhere: available = on_hand - reserved.

Reservations (OrderService, CartService):
  reserve(session, lines: [LineRequest(sku, quantity, warehouse_code="")], *,
          reference="", ttl: timedelta | None = None, actor="", warehouse_code="",
          channel="", destination: GeoPoint | None = None)
      -> Reservation
      All or nothing. Lines of the same SKU are summed; a line without a
      warehouse is allocated over active warehouses by (priority, code), split
      when one is short; with `channel`, over that channel's warehouses by its
      strategy (set_channel_allocation; docs/allocation.md), and a line naming a
      warehouse outside them is WAREHOUSE_NOT_IN_CHANNEL; backorders per item policy (up to max_backorder);
      untracked items always succeed. Short stock: FailedPrecondition
      INSUFFICIENT_STOCK with one PreconditionViolation per SKU (subject = SKU,
      description "requested N, available M"). Nothing is written on refusal.
  prepare_reserve(session, reserve_request(...), claim: Claim | None) -> Prepared
      `reserve` in two steps, for a caller writing its own rows while the levels
      stay locked: the plan now (results[0]: the Reservation or its refusal, not
      raised; with `claim`, the RPC's idempotency claim made first, KeyTaken
      when its key was used before), the writing on `await prepared.write(Answers())`.
  release(session, reservation_id, lines: [LineQuantity] | None = None, *, reason="", actor="")
      -> Reservation   (None = everything still held; releasing a closed
      reservation with None is a no-op, so cancelling after expiry is safe)
  fulfil(session, reservation_id, lines: [LineQuantity] | None = None, *, reference="", actor="")
      -> Fulfilment(reservation, movements)   on_hand and reserved both drop;
      lots consumed FIFO, cost on each movement.
  extend(session, reservation_id, ttl, *, actor="") -> Reservation
  retarget(session, reservation_id, *, reference, ttl=None, actor="") -> Reservation
      Checkout: the cart's hold becomes the order's reservation (new reference,
      new TTL or none); nothing is released and re-reserved, so nothing can be lost.
  get_reservation(session, reservation_id) -> Reservation
  observe_reservations(reference_prefix, observer): `await observer(session,
      [ReservationChange])` runs in the transaction of every release, fulfilment
      and expiry of the reservations whose reference starts with the prefix
      (orders keep their inventory_risk flag true with it).
  list_reservations(session, *, reference="", state="", size=0, token="") -> (list, next_token)

Kits (docs/kits.md): set_kit_components(session, sku=, components=[KitComponent(sku, quantity)])
  -> Item makes an item a kit of other items (empty: a simple item again). reserve,
  release and fulfil take a kit's SKU like any other: its lines become its
  components' lines (Reservation.kits, ReservationLine.kit_sku), kept as reserved;
  Fulfilment.kit_costs sums the components' FIFO costs per kit. A kit has no stock
  of its own; the stock reads derive it (KitStock). kit_components_of(session, skus).

Stock reads: get_stock_level(session, sku, warehouse_code="", *, channel="") -> SkuStock,
  batch_get_stock_levels(session, skus, *, channel="") -> (stocks, missing), list_stock_levels(...);
  with a channel: over the warehouses it sells from (sellable_warehouses).

Stock changes (each: one conditional UPDATE, one ledger row, one outbox event
`inventory.stock_changed` with aggregate_id = sku; a SyncStock batch writes one
event per level, covering its ledger rows, domain/inventory/ledger.py): adjust_stock, set_stock,
receive_stock, return_stock, bulk_adjust_stock, and the primitive they share,
apply_stock_change(session, sku=, warehouse_code=, kind="set"|"adjust"|"receive"|"return",
  quantity=, expected_on_hand=None, reason=, source=, actor=, reference=, unit_cost=None,
  lot_code="").
SyncStock does not go through apply_stock_change: sync.apply_batch (sync.py, its
statements in sync_store.py; the servicer calls it directly) applies a source's batch
set-based under the same stock rules (stock_rules.py): one ledger row of type `sync` per
applied event (source = the sync source, reference = the event id) and one outbox event per
level the batch moved, covering that level's rows.

Expiry: sweep_expired(session, limit) releases expired holds in the caller's
transaction; run_sweeper(sessions, stop) is the server's background loop
(advisory lock: one sweeper at a time across replicas).

Audit and repair (audit.py): audit_stock(session, size=, token=, skus=, warehouse_codes=,
  kinds=, whole_ledger=, advance_checkpoints=) -> AuditPage(drifts, next_token, levels_checked), the
  ledger's sums from per-level checkpoints plus their tail (whole_ledger: the whole ledger;
  advance_checkpoints: the audit job moves them); audit_all(rt.read, ...) pages through
  everything; checkpointing_audit(sessions, full_after=) is the audit job's (each page committed); repair_stock(session, sku=, warehouse_code=, kind=, expected_counter=,
  expected_derived=, reason=, actor=) -> Repair: one `audit` ledger movement, or nothing
  when the drift is gone; STOCK_CHANGED when the figures are not the audited ones.

Group commit: ReserveBatcher (batcher.py) for the ReserveStock RPC hot path.
"""

from domain.inventory.audit import (
    DRIFT_KINDS,
    AuditPage,
    Drift,
    Repair,
    audit_all,
    audit_stock,
    checkpointing_audit,
    repair_stock,
)
from domain.inventory.batcher import Executed, ReserveBatcher
from domain.inventory.catalog import (
    WAREHOUSE_UPDATABLE,
    create_warehouse,
    deactivate_warehouse,
    get_item,
    get_warehouse,
    kit_components_of,
    list_warehouses,
    set_kit_components,
    update_warehouse,
    upsert_item,
)
from domain.inventory.channel_allocation import (
    get_channel_allocation,
    sellable_warehouses,
    set_channel_allocation,
)
from domain.inventory.reservation_closing import (
    fulfil,
    observe_reservations,
    release,
    run_sweeper,
    sweep_expired,
)
from domain.inventory.reservations import (
    Prepared,
    ReserveRequest,
    extend,
    get_reservation,
    list_reservations,
    prepare_reserve,
    reserve,
    reserve_many,
    reserve_request,
    retarget,
)
from domain.inventory.stock import (
    MAX_BATCH_GET,
    adjust_stock,
    apply_stock_change,
    batch_get_stock_levels,
    bulk_adjust_stock,
    get_stock_level,
    list_movements,
    list_stock_levels,
    load_sku_stocks,
    receive_stock,
    return_stock,
    set_stock,
    stock_of,
)
from domain.inventory.stock_store import fetch_sku_stocks
from domain.inventory.types import (
    ADDRESS_FIELDS,
    CONTACT_FIELDS,
    MOVEMENT_TYPES,
    RESERVATION_STATES,
    STRATEGIES,
    Adjustment,
    ChannelAllocation,
    Cost,
    Fulfilment,
    GeoPoint,
    Item,
    KitComponent,
    KitCost,
    KitStock,
    LineQuantity,
    LineRequest,
    Movement,
    Reservation,
    ReservationChange,
    ReservationKit,
    ReservationLine,
    SkuStock,
    StockChange,
    StockLevel,
    Warehouse,
)
from domain.inventory.validation import normalize_sku

__all__ = [
    "ADDRESS_FIELDS",
    "CONTACT_FIELDS",
    "MAX_BATCH_GET",
    "MOVEMENT_TYPES",
    "RESERVATION_STATES",
    "STRATEGIES",
    "WAREHOUSE_UPDATABLE",
    "Adjustment",
    "ChannelAllocation",
    "Cost",
    "Executed",
    "Fulfilment",
    "GeoPoint",
    "Item",
    "LineQuantity",
    "LineRequest",
    "Movement",
    "Prepared",
    "Reservation",
    "ReservationChange",
    "ReservationLine",
    "ReserveBatcher",
    "ReserveRequest",
    "SkuStock",
    "StockChange",
    "StockLevel",
    "Warehouse",
    "adjust_stock",
    "apply_stock_change",
    "batch_get_stock_levels",
    "bulk_adjust_stock",
    "create_warehouse",
    "deactivate_warehouse",
    "extend",
    "fetch_sku_stocks",
    "fulfil",
    "get_channel_allocation",
    "get_item",
    "get_reservation",
    "get_stock_level",
    "get_warehouse",
    "list_movements",
    "list_reservations",
    "list_stock_levels",
    "list_warehouses",
    "load_sku_stocks",
    "normalize_sku",
    "observe_reservations",
    "prepare_reserve",
    "receive_stock",
    "release",
    "reserve",
    "reserve_many",
    "reserve_request",
    "retarget",
    "return_stock",
    "run_sweeper",
    "sellable_warehouses",
    "set_channel_allocation",
    "set_stock",
    "stock_of",
    "sweep_expired",
    "update_warehouse",
    "upsert_item",
]
__all__ += [
    "KitComponent",
    "KitCost",
    "KitStock",
    "ReservationKit",
    "kit_components_of",
    "set_kit_components",
]
__all__ += [
    "DRIFT_KINDS",
    "AuditPage",
    "Drift",
    "Repair",
    "audit_all",
    "audit_stock",
    "checkpointing_audit",
    "repair_stock",
]
