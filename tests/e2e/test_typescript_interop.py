"""The TypeScript client (clients/typescript, Connect for Node over gRPC/HTTP2) against
the Python server: a unary call, rich error details, and the WatchStockChanges
server stream (replay from a cursor, then a live event).

Needs node and `make ts-deps` (npm ci from package-lock.json); `make test` runs it.
A missing node or missing deps fails this test: it is never skipped.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot
from tests.conftest import unique
from tests.e2e.bff_support import BFF_PERMISSIONS, Reply, bff_process, read_json_line, request, start_node


async def outbox_head(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as s:
        return int((await s.execute(text("SELECT coalesce(max(id), 0) FROM platform.outbox"))).scalar_one())


async def test_node_client_unary_errors_and_server_stream(
    node_client: Path,
    target: str,
    admin: Entrepot,
    make_token: Callable[..., str],
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    wh = unique("WH")
    sku = unique("TS")
    await admin.inventory.create_warehouse(
        pb.CreateWarehouseRequest(warehouse=pb.Warehouse(code=wh, name="Node"), request_id=uuid.uuid4().hex)
    )
    await admin.inventory.upsert_inventory_item(
        pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku, low_stock_threshold=3))
    )
    await admin.inventory.set_stock(
        pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=10, reason="seed")
    )
    cursor = await outbox_head(sessions)
    assert cursor > 0
    # Two changes before the watcher connects: it must replay them from the cursor.
    await admin.inventory.adjust_stock(
        pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=5, reason="found")
    )
    await admin.inventory.adjust_stock(
        pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=-2, reason="broken")
    )

    token = make_token(permissions=["inventory.read", "inventory.watch"], sub="bff")
    proc = await start_node(
        "examples/interop.js", {"ENTREPOT_TARGET": target, "ENTREPOT_TOKEN": token}, sku, str(cursor), "3"
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        stock = await read_json_line(proc.stdout)
        assert stock["step"] == "stock" and stock["sku"] == sku
        # proto3 JSON: int64 as strings; available = on_hand - reserved.
        assert (stock["onHand"], stock["available"]) == ("13", "13")
        assert [w["warehouseCode"] for w in stock["warehouses"]] == [wh]

        missing = await read_json_line(proc.stdout)
        assert missing["step"] == "not_found"
        assert missing["code"] == "not_found" and missing["domain"] == "entrepot" and missing["reason"]

        replayed = [await read_json_line(proc.stdout) for _ in range(2)]
        assert [(e["step"], e["onHandDelta"], e["onHand"], e["reason"]) for e in replayed] == [
            ("event", "5", "15", "found"),
            ("event", "-2", "13", "broken"),
        ]
        assert int(replayed[0]["eventId"]) > cursor
        assert int(replayed[1]["eventId"]) > int(replayed[0]["eventId"])

        # The watcher has caught up; a change made now arrives live on the same stream.
        await admin.inventory.adjust_stock(
            pb.AdjustStockRequest(sku=sku, warehouse_code=wh, delta=-11, reason="sold")
        )
        live = await read_json_line(proc.stdout)
        assert (live["onHandDelta"], live["onHand"], live["available"]) == ("-11", "2", "2")
        assert live["belowThreshold"] is True and live["warehouseCode"] == wh
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        err = (await proc.stderr.read()).decode()
        assert proc.returncode == 0, err[-2000:]


ERROR_KEYS = {
    "status",
    "code",
    "message",
    "reason",
    "domain",
    "metadata",
    "fieldViolations",
    "preconditionViolations",
}


def error_of(r: Reply, status: int, reason: str) -> dict[str, Any]:
    """The one error shape: {"error": ApiError} with the HTTP status from the gRPC code."""
    assert r.status == status, (r.status, r.body)
    err: dict[str, Any] = r.body["error"]
    assert set(err) == ERROR_KEYS and err["status"] == status and err["reason"] == reason, err
    return err


async def test_bff_routes_share_one_json_style_cors_and_idempotency_keys(
    node_client: Path, target: str, admin: Entrepot, make_token: Callable[..., str], test_channel: str
) -> None:
    wh, sku = unique("WH"), unique("BFF")
    await admin.inventory.create_warehouse(
        pb.CreateWarehouseRequest(warehouse=pb.Warehouse(code=wh, name="BFF"), request_id=uuid.uuid4().hex)
    )
    await admin.inventory.upsert_inventory_item(pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku)))
    await admin.inventory.set_stock(pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=7, reason="seed"))
    token = make_token(permissions=BFF_PERMISSIONS, channels=[test_channel], sub="bff")
    shop = "https://shop.example"
    async with bff_process(
        target, token, test_channel, BFF_ALLOWED_ORIGINS=f"{shop}, http://other.example"
    ) as base:

        def call(
            method: str, path: str, body: dict[str, Any] | None = None, key: str | None = None, **h: str
        ) -> Reply:
            headers = {k.replace("_", "-"): v for k, v in h.items()}
            if key:
                headers["idempotency-key"] = key
            return request(method, f"{base}{path}", body, headers)

        async def acall(*args: Any, **kw: Any) -> Reply:
            return await asyncio.to_thread(call, *args, **kw)

        # One JSON style: proto3 JSON, int64 as strings, zero values emitted, enums by name.
        r = await acall("GET", f"/stock/{sku}")
        assert r.status == 200, r.body
        level = r.body["warehouses"][0]
        assert {k: v for k, v in r.body.items() if k != "warehouses"} == {
            "sku": sku,
            "onHand": "7",
            "reserved": "0",
            "available": "7",
            "backordered": "0",
            "belowThreshold": False,
            "components": [],  # a simple item: not a kit
        }
        assert (level["warehouseCode"], level["onHand"], level["reserved"], level["backordered"]) == (
            wh,
            "7",
            "0",
            "0",
        )
        missing = error_of(await acall("GET", f"/stock/{sku}-nope"), 404, "ITEM_NOT_FOUND")
        assert (missing["code"], missing["domain"], missing["metadata"]) == (
            "not_found",
            "entrepot",
            {"sku": f"{sku}-nope"},
        )
        error_of(await acall("GET", "/nowhere"), 404, "NO_ROUTE")

        # Idempotency-Key -> request_id on every mutating route: a repeat returns the first answer.
        r = await acall("POST", "/carts", {"customerRef": "c-1"}, key="k-create")
        assert r.status == 201 and r.headers["idempotency-key"] == "k-create", r.body
        cart = r.body
        assert (cart["customerRef"], cart["channel"], cart["version"], cart["state"]) == (
            "c-1",
            test_channel,
            "1",
            "STATE_ACTIVE",
        )
        assert (cart["lines"], cart["itemCount"], cart["approvalRequired"], cart["orderId"]) == (
            [],
            "0",
            False,
            "",
        )
        assert (await acall("POST", "/carts", {"customerRef": "c-1"}, key="k-create")).body["id"] == cart[
            "id"
        ]
        error_of(
            await acall("POST", "/carts", {"customerRef": "c-2"}, key="k-create"), 409, "REQUEST_ID_REUSED"
        )
        fresh = await acall("POST", "/carts", {"customerRef": "c-3"})
        assert fresh.status == 201 and len(fresh.headers["idempotency-key"]) == 36  # made up, returned

        cid, price = cart["id"], {"currencyCode": "EUR", "amountMinor": "1250"}
        steps: list[tuple[str, str, dict[str, Any]]] = [
            (
                "POST",
                f"/carts/{cid}/lines",
                {"version": "1", "line": {"sku": sku, "quantity": "2", "unitPrice": price}},
            ),
            (
                "PATCH",
                f"/carts/{cid}/lines/ln-1",
                {"version": "2", "line": {"quantity": "3"}, "updateMask": "quantity"},
            ),
            ("POST", f"/carts/{cid}/hold", {"version": "3", "ttl": "600s"}),
            ("DELETE", f"/carts/{cid}/hold", {"version": "4"}),
            ("DELETE", f"/carts/{cid}/lines/ln-1", {"version": "5"}),
            (
                "POST",
                f"/carts/{cid}/lines",
                {"version": "6", "line": {"sku": sku, "quantity": "2", "unitPrice": price}},
            ),
        ]
        for i, (method, path, body) in enumerate(steps):
            first = await acall(method, path, body, key=f"k-{i}")
            assert first.status == 200, (method, path, first.body)
            again = await acall(method, path, body, key=f"k-{i}")
            assert again.status == 200 and again.body == first.body, (method, path, again.body)
        cart = first.body
        assert cart["version"] == "7" and [(ln["lineId"], ln["quantity"]) for ln in cart["lines"]] == [
            ("ln-2", "2")
        ]
        assert cart["subtotal"] == {"currencyCode": "EUR", "amountMinor": "2500"}

        # A stale version: 409 with the reason and the current version in the metadata.
        stale = error_of(
            await acall("POST", f"/carts/{cid}/hold", {"version": "3"}, key="k-stale"),
            409,
            "CART_VERSION_MISMATCH",
        )
        assert stale["code"] == "aborted" and stale["metadata"]["current_version"] == "7"
        # A malformed body is the caller's mistake: the BFF's own 400, same shape.
        bad = error_of(await acall("POST", f"/carts/{cid}/lines", {"version": "x"}), 400, "INVALID_BODY")
        assert bad["domain"] == "bff" and bad["message"]

        payment = {
            "tenderId": "t1",
            "method": "card",
            "captured": {"currencyCode": "EUR", "amountMinor": "2500"},
        }
        done = await acall(
            "POST", f"/carts/{cid}/checkout", {"version": "7", "payments": [payment]}, key="k-pay"
        )
        assert (
            done.status == 200 and done.body["orderId"] and done.body["cart"]["state"] == "STATE_CONVERTED"
        ), done.body
        again = await acall(
            "POST", f"/carts/{cid}/checkout", {"version": "7", "payments": [payment]}, key="k-pay"
        )
        assert again.body["orderId"] == done.body["orderId"]
        error_of(
            await acall("POST", f"/carts/{cid}/hold", {"version": "8"}, key="k-late"), 409, "CART_CONVERTED"
        )
        r = await acall("GET", f"/stock/{sku}")
        assert (r.body["available"], r.body["reserved"]) == ("5", "2")

        # CORS: an allowed origin gets its preflight answered; credentials are never allowed.
        pre = await acall(
            "OPTIONS",
            "/carts",
            origin=shop,
            access_control_request_method="POST",
            access_control_request_headers="content-type,idempotency-key",
        )
        assert pre.status == 204 and pre.headers["access-control-allow-origin"] == shop
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "Idempotency-Key" in pre.headers["access-control-allow-headers"]
        assert "access-control-allow-credentials" not in pre.headers
        r = await acall("GET", f"/carts/{cid}", origin=shop)
        assert (
            r.status == 200
            and r.headers["access-control-allow-origin"] == shop
            and r.headers["vary"] == "Origin"
        )
        # Any other origin is refused before Entrepot is called: no cart is created.
        evil = "https://evil.example"
        refused = error_of(
            await acall("OPTIONS", "/carts", origin=evil, access_control_request_method="POST"),
            403,
            "ORIGIN_NOT_ALLOWED",
        )
        assert refused["domain"] == "bff"
        r = await acall("POST", "/carts", {"customerRef": "evil"}, key="k-evil", origin=evil)
        error_of(r, 403, "ORIGIN_NOT_ALLOWED")
        assert "access-control-allow-origin" not in r.headers
        r = await acall("POST", "/carts", {"customerRef": "evil"}, key="k-evil")
        assert r.status == 201 and r.body["customerRef"] == "evil"  # the key was never used by the refusal


async def test_bff_without_watch_permission_exits_with_one_line(
    node_client: Path, target: str, make_token: Callable[..., str], test_channel: str
) -> None:
    token = make_token(permissions=["inventory.read", "cart.read"], channels=[test_channel], sub="bff")
    proc = await start_node(
        "bff/server.js", {"ENTREPOT_TARGET": target, "ENTREPOT_TOKEN": token, "BFF_PORT": "0"}
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err.decode()
    assert "permission_denied" in lines[0] and "inventory.watch" in lines[0]
