"""`entrepot demo`: a guided tour against a running instance, printed as a timeline.

Seeds a channel, warehouses and SKUs; streams a WMS CSV in (and replays it, to show
exactly-once ingestion) while a watcher tails stock changes; checks out a cart; ships
part of the order; refunds a line through the approval inbox; walks a registration
through review. Every step is a real gRPC call through the typed client. A service
this server does not serve is reported as skipped and the tour goes on.

Two identities are used, because a refund requester may never approve their own
request: the operator (`--token`) and an approver (`--approver-token`). Missing tokens
are minted with the dev instance's HS256 secret (ENTREPOT_JWT_HS256_SECRET or
`$ENTREPOT_DATA_DIR/dev/jwt-secret`, which `entrepot dev` writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib
import io
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from entrepot.inventory.v1 import inventory_pb2 as inv
from entrepot.platform.v1 import channel_pb2, types_pb2
from entrepot_client import Entrepot, EntrepotError
from server.cli import CommandError
from server.dev import dev_token, read_dev_secret

# The default WMS feed: event_id, sku, warehouse, kind, quantity, reason. `{run}` is the run id.
DEFAULT_CSV = """event_id,sku,warehouse,kind,quantity,reason
wms-1,MUG-{run},PAR-{run},SET,40,cycle count
wms-2,TEE-{run},PAR-{run},SET,12,cycle count
wms-3,CAP-{run},PAR-{run},SET,3,cycle count
wms-4,MUG-{run},LYS-{run},SET,25,cycle count
wms-5,TEE-{run},LYS-{run},RECEIVE,30,inbound PO-1138
wms-6,MUG-{run},PAR-{run},ADJUST,-2,breakage
"""


class Skipped(Exception):
    """A step that cannot run here (service not served, missing prerequisite)."""


@dataclass
class Tour:
    target: str
    token: str
    approver_token: str | None
    ep: Entrepot
    approver: Entrepot | None
    run: str
    out: TextIO
    channel: str = ""
    warehouses: list[str] = field(default_factory=list)
    skus: list[str] = field(default_factory=list)
    order_id: str = ""
    order_lines: list[Any] = field(default_factory=list)
    currency: str = "EUR"
    results: dict[str, str] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        print(f"  [{time.monotonic() - self.t0:6.2f}s] {text}", file=self.out, flush=True)


def _pb(module: str) -> Any:
    """The generated module of a service, or Skipped when this build does not have it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Skipped(f"{module} is not in this build") from None


def _client(ep: Entrepot | None, name: str) -> Any:
    if ep is None:
        raise Skipped(
            "needs a second identity for approvals: pass --approver-token (or ENTREPOT_APPROVER_TOKEN)"
        )
    client = getattr(ep, name, None)
    if client is None:
        raise Skipped(f"no `{name}` client in this build")
    return client


def _rid() -> str:
    return uuid.uuid4().hex


def money(amount_minor: int, currency: str) -> types_pb2.Money:
    return types_pb2.Money(currency_code=currency, amount_minor=amount_minor)


def fmt_money(m: types_pb2.Money) -> str:
    return f"{m.amount_minor / 100:.2f} {m.currency_code}"  # display only; amounts stay integers


async def step_channel(t: Tour) -> None:
    t.channel = f"demo-{t.run}"
    ch = await t.ep.channel.create_channel(
        channel_pb2.CreateChannelRequest(
            channel=channel_pb2.Channel(
                slug=t.channel, name=f"Demo {t.run}", currency=t.currency, timezone="Europe/Paris"
            ),
            request_id=_rid(),
        )
    )
    t.say(f"channel {ch.slug!r} created ({ch.currency}, {ch.timezone})")
    # From here on every call carries x-channel-slug.
    t.ep = Entrepot(t.target, t.token, t.channel)
    if t.approver_token:
        t.approver = Entrepot(t.target, t.approver_token, t.channel)


async def step_warehouses(t: Tour) -> None:
    for code, name, city, priority in (
        (f"PAR-{t.run}", "Paris hub", "Paris", 1),
        (f"LYS-{t.run}", "Lyon overflow", "Lyon", 2),
    ):
        wh = await t.ep.inventory.create_warehouse(
            inv.CreateWarehouseRequest(
                warehouse=inv.Warehouse(
                    code=code,
                    name=name,
                    priority=priority,
                    address=types_pb2.PostalAddress(line1="1 quai de Seine", city=city, country_code="FR"),
                ),
                request_id=_rid(),
            )
        )
        t.warehouses.append(wh.code)
        t.say(f"warehouse {wh.code} ({wh.name}, priority {wh.priority})")


async def step_items(t: Tour) -> None:
    for base, threshold in (("MUG", 5), ("TEE", 4), ("CAP", 2)):
        item = await t.ep.inventory.upsert_inventory_item(
            inv.UpsertInventoryItemRequest(
                item=inv.InventoryItem(
                    sku=f"{base}-{t.run}", track_inventory=True, low_stock_threshold=threshold
                )
            )
        )
        t.skus.append(item.sku)
        t.say(f"SKU {item.sku} (low-stock threshold {item.low_stock_threshold})")


def parse_csv(text: str, run: str) -> list[inv.SyncEvent]:
    kinds = {
        "SET": inv.SYNC_EVENT_KIND_SET,
        "ADJUST": inv.SYNC_EVENT_KIND_ADJUST,
        "RECEIVE": inv.SYNC_EVENT_KIND_RECEIVE,
    }
    events = []
    for row in csv.DictReader(io.StringIO(text.replace("{run}", run))):
        ev = inv.SyncEvent(
            event_id=row["event_id"],
            sku=row["sku"],
            warehouse_code=row["warehouse"],
            kind=kinds[row["kind"].strip().upper()],
            quantity=int(row["quantity"]),
            reason=row.get("reason", ""),
        )
        ev.occurred_at.GetCurrentTime()
        events.append(ev)
    return events


async def step_sync(t: Tour, csv_text: str) -> None:
    _need_skus(t)
    events = parse_csv(csv_text, t.run)
    source = f"wms-demo-{t.run}"
    half = (len(events) + 1) // 2
    # Batch 3 replays batch 1: the same (source, event id) is applied once only.
    batches = [events[:half], events[half:], events[:half]]

    async def requests() -> AsyncIterator[inv.SyncStockRequest]:
        yield inv.SyncStockRequest(start=inv.SyncStart(source=source))
        for seq, batch in enumerate(batches, 1):
            yield inv.SyncStockRequest(batch=inv.SyncBatch(batch_seq=seq, events=batch))

    t.say(f"streaming {len(events)} WMS events from source {source!r} in 2 batches, then replaying batch 1")
    acks = 0
    async for resp in t.ep.inventory.sync_stock(requests(), timeout=60):
        if resp.WhichOneof("message") == "ack":
            a = resp.ack
            acks += 1
            t.say(
                f"ack batch {a.batch_seq}: applied {a.applied}, duplicate {a.duplicate}, "
                f"stale {a.stale}, rejected {a.rejected}"
            )
            for err in a.errors:
                t.say(f"  event {err.event_id} rejected: {err.reason} {err.message}")
            if acks == len(batches):
                break
    cursor = await t.ep.inventory.get_sync_cursor(inv.GetSyncCursorRequest(source=source))
    t.say(
        f"sync cursor for {source!r}: last event {cursor.last_event_id!r}, "
        f"{cursor.events_seen} seen, {cursor.events_applied} applied"
    )
    await show_levels(t)


async def show_levels(t: Tour) -> None:
    levels = await t.ep.inventory.batch_get_stock_levels(inv.BatchGetStockLevelsRequest(skus=t.skus))
    for s in levels.stocks:
        per = ", ".join(f"{w.warehouse_code} {w.available}" for w in s.warehouses)
        flag = "  LOW" if s.below_threshold else ""
        t.say(f"{s.sku}: on hand {s.on_hand}, reserved {s.reserved}, available {s.available} ({per}){flag}")


def _need_skus(t: Tour) -> None:
    if len(t.skus) < 2:
        raise Skipped("no SKUs (the items step did not run)")


async def step_checkout(t: Tour) -> None:
    _need_skus(t)
    cart_pb = _pb("entrepot.cart.v1.cart_pb2")
    carts = _client(t.ep, "cart")
    cart = await carts.create_cart(
        cart_pb.CreateCartRequest(cart=cart_pb.Cart(customer_ref="acme-buyer"), request_id=_rid())
    )
    t.say(f"cart {cart.id} created for acme-buyer (version {cart.version})")
    for sku, qty, price in ((t.skus[0], 3, 1200), (t.skus[1], 2, 2500)):
        cart = await carts.add_cart_line(
            cart_pb.AddCartLineRequest(
                cart_id=cart.id,
                version=cart.version,
                line=cart_pb.CartLine(sku=sku, quantity=qty, unit_price=money(price, t.currency)),
                request_id=_rid(),
            )
        )
        t.say(f"added {qty} x {sku} at {fmt_money(money(price, t.currency))} (version {cart.version})")
    t.say(f"subtotal {fmt_money(cart.subtotal)}, {cart.item_count} items")
    done = await carts.checkout_cart(
        cart_pb.CheckoutCartRequest(
            cart_id=cart.id,
            version=cart.version,
            payments=[
                cart_pb.CheckoutPayment(
                    tender_id="card-1",
                    method="card",
                    captured=cart.subtotal,
                    gateway_reference=f"psp-{t.run}",
                )
            ],
            external_order_id=f"WEB-{t.run}",
            request_id=_rid(),
        )
    )
    t.order_id = done.order_id
    t.say(f"checked out: order {done.order_id}, reservation {done.reservation_id}")
    await show_levels(t)


async def step_order_intent(t: Tour) -> None:
    """Without CartService, an order arrives the way a checkout backend would send it."""
    if t.order_id:
        raise Skipped("the cart checkout already created the order")
    _need_skus(t)
    order_pb = _pb("entrepot.order.v1.order_pb2")
    orders = _client(t.ep, "order")
    lines = [(t.skus[0], 3, 1200), (t.skus[1], 2, 2500)]
    subtotal = sum(q * p for _, q, p in lines)
    intent = order_pb.OrderIntent(
        intent_id=f"intent-{t.run}",
        source_system="demo-checkout",
        external_order_id=f"WEB-{t.run}",
        customer_ref="acme-buyer",
        lines=[
            order_pb.OrderLine(
                line_id=f"l{i}",
                sku=sku,
                quantity=q,
                unit_price=money(p, t.currency),
                line_total=money(q * p, t.currency),
            )
            for i, (sku, q, p) in enumerate(lines, 1)
        ],
        totals=order_pb.OrderTotals(
            subtotal=money(subtotal, t.currency),
            tax=money(0, t.currency),
            shipping=money(0, t.currency),
            discount=money(0, t.currency),
            grand_total=money(subtotal, t.currency),
        ),
        payments=[
            order_pb.Payment(
                tender_id="card-1",
                method="card",
                captured=money(subtotal, t.currency),
                gateway_reference=f"psp-{t.run}",
            )
        ],
    )
    intent.submit_time.GetCurrentTime()
    res = await orders.submit_order_intent(
        order_pb.SubmitOrderIntentRequest(intent=intent, reserve_inventory=True, request_id=_rid())
    )
    t.order_id = res.order.id
    t.say(
        f"order intent {intent.intent_id} from {intent.source_system!r}: order {res.order.id} "
        f"({order_pb.Order.State.Name(res.order.state)}, {fmt_money(res.order.totals.grand_total)})"
    )
    await show_levels(t)


async def step_ship(t: Tour) -> None:
    if not t.order_id:
        raise Skipped("no order (checkout did not run)")
    order_pb = _pb("entrepot.order.v1.order_pb2")
    orders = _client(t.ep, "order")
    order = await orders.get_order(order_pb.GetOrderRequest(id=t.order_id))
    t.order_lines = list(order.lines)
    t.say(f"order {order.id} is {order_pb.Order.State.Name(order.state)}")
    if order.state == order_pb.Order.STATE_PENDING:
        order = await orders.transition_order(
            order_pb.TransitionOrderRequest(
                order_id=order.id, target_state=order_pb.Order.STATE_PROCESSING, request_id=_rid()
            )
        )
        t.say(f"order moved to {order_pb.Order.State.Name(order.state)}")
    first = t.order_lines[0]
    shipped = await orders.ship_order_items(
        order_pb.ShipOrderItemsRequest(
            order_id=order.id,
            lines=[order_pb.LineQuantity(line_id=first.line_id, quantity=first.quantity - 1)],
            tracking_number=f"TRK-{t.run}",
            carrier="colissimo",
            request_id=_rid(),
        )
    )
    t.say(
        f"shipped {first.quantity - 1} of {first.quantity} x {first.sku} (tracking TRK-{t.run}); "
        f"order is {order_pb.Order.State.Name(shipped.order.state)}"
    )
    await show_levels(t)


async def step_refund(t: Tour) -> None:
    if not t.order_id or len(t.order_lines) < 2 or not t.warehouses:
        raise Skipped("no order lines or warehouse (checkout or warehouses did not run)")
    refund_pb = _pb("entrepot.refund.v1.refund_pb2")
    refunds = _client(t.ep, "refund")
    approver = _client(t.approver, "refund")
    line = t.order_lines[1]
    req = await refunds.submit_refund_for_approval(
        refund_pb.SubmitRefundForApprovalRequest(
            order_id=t.order_id,
            lines=[refund_pb.RefundLineInput(line_id=line.line_id, quantity=1)],
            reason="damaged in transit",
            restock=True,
            restock_warehouse_code=t.warehouses[0],
            request_id=_rid(),
        )
    )
    t.say(f"refund {req.refund_id} requested: 1 x {line.sku}, {fmt_money(req.amount)}, awaiting approval")
    approve = refund_pb.DecideRefundApprovalRequest.DECISION_APPROVE
    try:
        await refunds.decide_refund_approval(
            refund_pb.DecideRefundApprovalRequest(
                refund_id=req.refund_id, decision=approve, request_id=_rid()
            )
        )
        t.say("UNEXPECTED: the requester approved their own refund")
    except EntrepotError as err:
        t.say(f"requester tries to approve it: refused, {err.code.name} {err.reason}")
    decided = await approver.decide_refund_approval(
        refund_pb.DecideRefundApprovalRequest(
            refund_id=req.refund_id, decision=approve, note="photos checked", request_id=_rid()
        )
    )
    t.say(f"approver approves: {refund_pb.Refund.State.Name(decided.state)} (workflow {decided.workflow_id})")
    terminal = {
        refund_pb.Refund.STATE_COMPLETED,
        refund_pb.Refund.STATE_FAULTED,
        refund_pb.Refund.STATE_DENIED,
    }
    refund = decided
    deadline = time.monotonic() + 30
    while refund.state not in terminal and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        refund = await refunds.get_refund(refund_pb.GetRefundRequest(refund_id=req.refund_id))
    tenders = ", ".join(f"{x.tender_id} {fmt_money(x.amount)}" for x in refund.tenders)
    t.say(f"refund is {refund_pb.Refund.State.Name(refund.state)} ({tenders or 'no tender yet'})")
    if refund.state not in terminal:
        t.say("(still executing after 30 s: is a worker running? `entrepot dev` starts one)")
    await show_levels(t)  # the refunded unit was restocked


async def step_registration(t: Tour) -> None:
    reg_pb = _pb("entrepot.registration.v1.registration_pb2")
    regs = _client(t.ep, "registration")
    reviewer = _client(t.approver, "registration")
    slug = f"wholesale-{t.run}"
    form = await regs.create_registration_form(
        reg_pb.CreateRegistrationFormRequest(
            form=reg_pb.RegistrationForm(
                slug=slug,
                name="Wholesale account",
                active=True,
                steps=[
                    reg_pb.FormStep(
                        key="company",
                        title="Company",
                        sections=[
                            reg_pb.FormSection(
                                key="main",
                                title="About you",
                                fields=[
                                    reg_pb.FormField(
                                        key="company",
                                        label="Company",
                                        type=reg_pb.FIELD_TYPE_TEXT,
                                        required=True,
                                    ),
                                    reg_pb.FormField(
                                        key="email",
                                        label="Email",
                                        type=reg_pb.FIELD_TYPE_EMAIL,
                                        required=True,
                                    ),
                                ],
                            )
                        ],
                    )
                ],
            ),
            request_id=_rid(),
        )
    )
    t.say(f"registration form {form.slug!r} (version {form.version})")
    reg = await regs.submit_registration(
        reg_pb.SubmitRegistrationRequest(
            form=slug,
            answers={
                "company": reg_pb.FieldValue(text="Acme Cafés SARL"),
                "email": reg_pb.FieldValue(text="buyer@acme.example"),
            },
            address=types_pb2.PostalAddress(
                line1="3 rue Neuve", city="Lyon", postal_code="69001", country_code="FR"
            ),
            request_id=_rid(),
        )
    )
    t.say(f"registration {reg.id} submitted: {reg_pb.Registration.State.Name(reg.state)}")
    reg = await _wait_registration(t, regs, reg_pb, reg.id, {reg_pb.Registration.STATE_IN_REVIEW})
    t.say(f"registration is {reg_pb.Registration.State.Name(reg.state)}")
    await reviewer.review_registration(
        reg_pb.ReviewRegistrationRequest(
            registration_id=reg.id,
            decision=reg_pb.Registration.DECISION_APPROVE,
            note="KBIS verified",
            request_id=_rid(),
        )
    )
    t.say("reviewer approves")
    reg = await _wait_registration(
        t,
        regs,
        reg_pb,
        reg.id,
        {
            reg_pb.Registration.STATE_APPROVED,
            reg_pb.Registration.STATE_DENIED,
            reg_pb.Registration.STATE_EXPIRED,
        },
    )
    t.say(f"registration is {reg_pb.Registration.State.Name(reg.state)}")


async def _wait_registration(t: Tour, regs: Any, reg_pb: Any, reg_id: str, states: set[int]) -> Any:
    deadline = time.monotonic() + 30
    while True:
        reg = await regs.get_registration(reg_pb.GetRegistrationRequest(id=reg_id))
        if reg.state in states or time.monotonic() > deadline:
            return reg
        await asyncio.sleep(0.3)


async def step_history(t: Tour) -> None:
    if not t.order_id:
        raise Skipped("no order (checkout did not run)")
    order_pb = _pb("entrepot.order.v1.order_pb2")
    history = await _client(t.ep, "order").list_order_status_history(
        order_pb.ListOrderStatusHistoryRequest(order_id=t.order_id, page_size=100)
    )
    for e in history.entries:
        t.say(
            f"{e.record_time.ToDatetime():%H:%M:%S} {e.code} ({order_pb.Severity.Name(e.severity)}) by {e.written_by}"
        )


async def watch(t: Tour, seen: list[inv.StockChangeEvent], errors: list[str]) -> None:
    """Tails stock changes of the demo SKUs for the whole tour (the stream a BFF would use)."""
    try:
        async for msg in t.ep.inventory.watch_stock_changes(inv.WatchStockChangesRequest(skus=t.skus)):
            seen.extend(msg.events)
    except EntrepotError as err:
        errors.append(str(err))


def mint(sub: str) -> str | None:
    """A dev token with every permission, when the dev instance's secret is at hand."""
    secret = os.environ.get("ENTREPOT_JWT_HS256_SECRET") or read_dev_secret()
    return dev_token(secret, sub=sub, ttl_seconds=3600) if secret else None


async def require_server(ep: Entrepot, target: str, timeout: float = 5.0) -> None:
    """Checked once, before the tour: without a server every step would fail the same way."""
    try:
        await asyncio.wait_for(ep.grpc_channel.channel_ready(), timeout)
    except TimeoutError:
        raise CommandError(
            f"no Entrepot server at {target} (nothing answered within {timeout:.0f}s): start one with "
            "`entrepot dev`, or point --target / ENTREPOT_TARGET at yours"
        ) from None


async def run_demo(
    target: str,
    token: str | None,
    approver_token: str | None,
    *,
    csv_text: str = DEFAULT_CSV,
    run: str | None = None,
    out: TextIO | None = None,
) -> dict[str, str]:
    """Runs the tour; returns step name -> "ok" / "skipped: ..." / "failed: ...".

    Raises CommandError when there is no usable operator token or no server at `target`.
    """
    stream = out or sys.stdout
    token = token or mint("demo-operator")
    if not token:
        raise CommandError("no token: pass --token (or ENTREPOT_TOKEN), or run next to `entrepot dev`")
    approver_token = approver_token or mint("demo-approver")
    run = run or uuid.uuid4().hex[:6]
    ep = Entrepot(target, token)
    try:
        await require_server(ep, target)
    except CommandError:
        await ep.close()
        raise
    approver = Entrepot(target, approver_token) if approver_token else None
    t = Tour(target, token, approver_token, ep=ep, approver=approver, run=run, out=stream)
    print(f"Entrepot demo against {target} (run {run})", file=stream)
    seen: list[inv.StockChangeEvent] = []
    watch_errors: list[str] = []
    watcher: asyncio.Task[None] | None = None
    opened = [ep, approver]

    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("channel", lambda: step_channel(t)),
        ("warehouses", lambda: step_warehouses(t)),
        ("items", lambda: step_items(t)),
        ("wms sync", lambda: step_sync(t, csv_text)),
        ("cart checkout", lambda: step_checkout(t)),
        ("order intent", lambda: step_order_intent(t)),
        ("partial shipment", lambda: step_ship(t)),
        ("refund with approval", lambda: step_refund(t)),
        ("registration review", lambda: step_registration(t)),
        ("order timeline", lambda: step_history(t)),
    ]
    try:
        for name, fn in steps:
            print(f"\n== {name}", file=stream, flush=True)
            if name == "wms sync" and t.skus:
                watcher = asyncio.create_task(watch(t, seen, watch_errors))
                await asyncio.sleep(1.0)  # let the watch call reach the server before the feed starts
            try:
                await fn()
                t.results[name] = "ok"
            except Skipped as why:
                t.results[name] = f"skipped: {why}"
                t.say(f"skipped: {why}")
            except EntrepotError as err:
                if err.code == grpc.StatusCode.UNIMPLEMENTED:
                    t.results[name] = "skipped: not served by this server"
                    t.say("skipped: the service is not served by this server (UNIMPLEMENTED)")
                else:
                    t.results[name] = f"failed: {err}"
                    t.say(f"failed: {err}")
                    for fv in err.field_violations:
                        t.say(f"  {fv.field}: {fv.description}")
                    for pv in err.precondition_violations:
                        t.say(f"  {pv.subject}: {pv.description}")
            except Exception as err:  # a demo keeps going; the failure is printed, never hidden
                t.results[name] = f"failed: {type(err).__name__}: {err}"
                t.say(f"failed: {type(err).__name__}: {err}")
            if t.ep not in opened:
                opened.append(t.ep)
            if t.approver not in opened:
                opened.append(t.approver)
        print("\n== watcher", file=stream)
        await asyncio.sleep(0.5)
        t.say(f"a WatchStockChanges stream opened before the WMS feed saw {len(seen)} stock changes")
        for problem in watch_errors:
            t.say(f"the watch stream ended: {problem}")
        for e in seen[:12]:
            t.say(
                f"  #{e.event_id} {e.sku}@{e.warehouse_code} {inv.MovementType.Name(e.type)} "
                f"{e.on_hand_delta:+d} on hand -> {e.on_hand}, available {e.available}"
            )
        if len(seen) > 12:
            t.say(f"  ... and {len(seen) - 12} more")
        print("\n== summary", file=stream)
        for name, result in t.results.items():
            print(f"  {name:<22} {result}", file=stream)
        return t.results
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, EntrepotError):
                await watcher
        for client in opened:
            if client is not None:
                await client.close()


def main(
    target: str, token: str | None, approver_token: str | None, csv_path: str | None, run: str | None
) -> int:
    """`entrepot demo`: exit 0 when no step failed (skipped steps are fine)."""
    try:
        csv_text = Path(csv_path).read_text() if csv_path else DEFAULT_CSV
    except OSError as err:
        raise CommandError(f"cannot read --csv {csv_path}: {err.strerror}") from None
    results = asyncio.run(run_demo(target, token, approver_token, csv_text=csv_text, run=run))
    return 1 if any(r.startswith("failed") for r in results.values()) else 0
