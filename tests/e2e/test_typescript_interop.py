"""The TypeScript client (clients/typescript, Connect for Node over gRPC/HTTP2) against
the Python server: a unary call, rich error details, and the WatchStockChanges
server stream (replay from a cursor, then a live event).

Needs node and `make ts-deps` (npm ci from package-lock.json); `make test` runs it.
A missing node or missing deps fails this test: it is never skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot
from tests.conftest import unique

ROOT = Path(__file__).resolve().parents[2]
TS = ROOT / "clients" / "typescript"


async def run(*cmd: str, cwd: Path = ROOT) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out.decode()[-3000:]}"


@pytest.fixture(scope="module")
async def node_client() -> Path:
    """Compiles the TypeScript client and its examples; fails (never skips) without node or deps."""
    node = shutil.which("node")
    assert node, "node is not installed: the TypeScript interop test needs Node.js 20+"
    tsc = TS / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), "clients/typescript/node_modules is missing: run `make ts-deps` (npm ci)"
    # A clean build: tsc never deletes outputs whose sources are gone (e.g. a service's module).
    shutil.rmtree(TS / "dist", ignore_errors=True)
    await run(str(tsc), "-p", str(TS))
    script = TS / "dist" / "examples" / "interop.js"
    assert script.exists()
    return script


async def read_json_line(stream: asyncio.StreamReader, timeout: float = 20.0) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the node client closed its output early"
    result: dict[str, Any] = json.loads(line)
    return result


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
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(node_client),
        sku,
        str(cursor),
        "3",
        env={**os.environ, "ENTREPOT_TARGET": target, "ENTREPOT_TOKEN": token},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
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


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def test_bff_example_serves_stock_and_cart_endpoints(
    node_client: Path, target: str, admin: Entrepot, make_token: Callable[..., str], test_channel: str
) -> None:
    wh, sku = unique("WH"), unique("BFF")
    await admin.inventory.create_warehouse(
        pb.CreateWarehouseRequest(warehouse=pb.Warehouse(code=wh, name="BFF"), request_id=uuid.uuid4().hex)
    )
    await admin.inventory.upsert_inventory_item(pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=sku)))
    await admin.inventory.set_stock(pb.SetStockRequest(sku=sku, warehouse_code=wh, quantity=7, reason="seed"))

    token = make_token(
        permissions=["inventory.read", "cart.read", "cart.write", "cart.checkout"],
        channels=[test_channel],
        sub="bff",
    )
    bff = await asyncio.create_subprocess_exec(
        "node",
        str(TS / "dist" / "bff" / "server.js"),
        env={
            **os.environ,
            "ENTREPOT_TARGET": target,
            "ENTREPOT_TOKEN": token,
            "ENTREPOT_CHANNEL": test_channel,
            "BFF_PORT": "0",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert bff.stdout is not None and bff.stderr is not None
    try:
        base = (await read_json_line(bff.stdout))["listening"]

        status, stock = await asyncio.to_thread(http, "GET", f"{base}/stock/{sku}")
        assert status == 200, stock
        assert stock == {
            "sku": sku,
            "available": 7,
            "onHand": 7,
            "reserved": 0,
            "inStock": True,
            "warehouses": [{"code": wh, "available": 7}],
        }
        status, missing = await asyncio.to_thread(http, "GET", f"{base}/stock/{sku}-nope")
        assert status == 404 and missing["error"]["code"] == "not_found" and missing["error"]["reason"]

        status, cart = await asyncio.to_thread(http, "POST", f"{base}/carts", {"customerRef": "c-1"})
        assert status == 201, cart
        assert cart["customerRef"] == "c-1" and cart["channel"] == test_channel
        price = {"currencyCode": "EUR", "amountMinor": "1250"}
        status, cart = await asyncio.to_thread(
            http,
            "POST",
            f"{base}/carts/{cart['id']}/lines",
            {"version": cart["version"], "line": {"sku": sku, "quantity": "2", "unitPrice": price}},
        )
        assert status == 200, cart
        assert [(line["sku"], line["quantity"]) for line in cart["lines"]] == [(sku, "2")]
        payment = {
            "tenderId": "t1",
            "method": "card",
            "captured": {"currencyCode": "EUR", "amountMinor": "2500"},
        }
        status, done = await asyncio.to_thread(
            http,
            "POST",
            f"{base}/carts/{cart['id']}/checkout",
            {"version": cart["version"], "payments": [payment]},
        )
        assert status == 200, done
        assert done["orderId"] and done["cart"]["state"] == "STATE_CONVERTED"
        # A malformed body is the caller's mistake: 400 with the parser's message.
        status, bad = await asyncio.to_thread(
            http, "POST", f"{base}/carts/{cart['id']}/lines", {"version": "x", "line": {}}
        )
        assert status == 400 and bad["error"]["message"]
        # The converted cart refuses more lines: FAILED_PRECONDITION/ABORTED map to 409 with the reason.
        status, late = await asyncio.to_thread(
            http,
            "POST",
            f"{base}/carts/{cart['id']}/lines",
            {"version": done["cart"]["version"], "line": {"sku": sku, "quantity": "1", "unitPrice": price}},
        )
        assert status == 409 and late["error"]["reason"], late
        status, stock = await asyncio.to_thread(http, "GET", f"{base}/stock/{sku}")
        assert (stock["available"], stock["reserved"]) == (5, 2)
    finally:
        if bff.returncode is None:
            bff.terminate()
            await asyncio.wait_for(bff.wait(), 10)
