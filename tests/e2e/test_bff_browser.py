"""The BFF's page in a real browser: Debian's headless Chromium driven by playwright-core
(clients/typescript/tests/browser.ts) against the real BFF and the real server.

The browser opens the page and sees the stock per warehouse, follows a gRPC stock change
within 2 s, resumes after leaving mid-stream (Last-Event-ID kept by the page) with every
missed change once, fills a cart, holds, checks out and shows the order id, shows the words
for a stale cart version and for short stock, and calls the BFF from an allowed origin.
Around it this test checks the server side: one WatchStockChanges for every tab, the order
in Entrepot, and SSE resume by the Last-Event-ID header. Screenshots go to
.entrepot/artifacts/. `make test` installs chromium (scripts/ensure-debian-package.sh); when it
cannot, this test fails with the one line saying what to install.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot.order.v1 import order_pb2
from entrepot_client import Entrepot
from server.app import App
from server.devservices import free_port
from server.watch_hub import hub_for
from tests.conftest import unique
from tests.e2e.bff_support import (
    BFF_PERMISSIONS,
    ROOT,
    TS,
    Sse,
    SseEvent,
    bff_process,
    read_json_line,
    start_node,
)

ARTIFACTS = ROOT / ".entrepot" / "artifacts"


async def chromium_path() -> str:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(ROOT / "scripts" / "ensure-debian-package.sh"),
        "chromium",
        os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode == 0, err.decode().strip()
    return out.decode().strip()


class Collector:
    """A browser stand-in: reads one SSE stream in a thread until closed."""

    def __init__(self, url: str) -> None:
        self.sse = Sse(url)
        self.events: list[SseEvent] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # Heartbeats (every 300 ms here) wake the loop, so it sees `stopping` soon.
        while not self.stopping.is_set():
            self.events.append(self.sse.next())

    def close(self) -> list[SseEvent]:
        self.stopping.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the raw stream stopped delivering heartbeats"
        self.sse.close()
        return list(self.events)


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def change_ids(events: list[SseEvent]) -> list[str]:
    return [e["eventId"] for ev in events if ev.event == "change" for e in ev.data["events"]]


async def test_bff_page_in_headless_chromium(
    node_client: Path,
    app: App,
    target: str,
    admin: Entrepot,
    make_token: Callable[..., str],
    test_channel: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    chromium = await chromium_path()
    assert (TS / "node_modules" / "playwright-core").exists(), (
        "playwright-core is missing: run `make ts-deps`"
    )
    wh_a, wh_b, sku, short = unique("WHA"), unique("WHB"), unique("MUG"), unique("LAST")
    for wh in (wh_a, wh_b):
        await admin.inventory.create_warehouse(
            pb.CreateWarehouseRequest(warehouse=pb.Warehouse(code=wh, name=wh), request_id=uuid.uuid4().hex)
        )
    for item, stock in ((sku, ((wh_a, 7), (wh_b, 3))), (short, ((wh_a, 1),))):
        await admin.inventory.upsert_inventory_item(
            pb.UpsertInventoryItemRequest(item=pb.InventoryItem(sku=item))
        )
        for wh, qty in stock:
            await admin.inventory.set_stock(
                pb.SetStockRequest(sku=item, warehouse_code=wh, quantity=qty, reason="seed")
            )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    hub = hub_for(app.rt)
    others = set(hub.watchers)
    port = free_port()
    cross_origin = f"http://localhost:{port}"
    token = make_token(permissions=BFF_PERMISSIONS, channels=[test_channel], sub="bff")
    async with bff_process(
        target, token, test_channel,
        BFF_PORT=str(port), BFF_ALLOWED_ORIGINS=cross_origin, BFF_SSE_HEARTBEAT_MS="300",
    ) as base:  # fmt: skip
        await wait_for(lambda: len(hub.watchers - others) == 1, "the BFF's WatchStockChanges")
        bff_watch = hub.watchers - others
        # A third browser on the same SKU, connected before any change.
        raw = await asyncio.to_thread(Collector, f"{base}/stock/{sku}/events")
        await wait_for(lambda: bool(raw.events), "the raw stream's snapshot")
        assert raw.events[0].event == "snapshot" and raw.events[0].data["onHand"] == "10"

        admin_token = make_token(sub="browser-test")
        driver = await start_node(
            "tests/browser.js",
            {
                "BFF_URL": base,
                "CROSS_ORIGIN": cross_origin,
                "ENTREPOT_TARGET": target,
                "ENTREPOT_TOKEN": admin_token,
                "ENTREPOT_CHANNEL": test_channel,
                "CHROMIUM_PATH": chromium,
                "SKU": sku,
                "SHORT_SKU": short,
                "WH_A": wh_a,
                "WH_B": wh_b,
                "ARTIFACTS": str(ARTIFACTS),
            },
        )
        assert driver.stdin is not None and driver.stdout is not None and driver.stderr is not None
        steps: dict[str, dict[str, Any]] = {}
        try:
            while "done" not in steps:
                try:
                    line = await read_json_line(driver.stdout, timeout=30)
                except AssertionError as eof:
                    await driver.wait()
                    raise AssertionError(
                        f"the browser test failed: {(await driver.stderr.read()).decode()[-2000:]}"
                    ) from eof
                assert line["step"] != "page_error", line
                steps[line["step"]] = line
                if line["step"] == "tabs":
                    # Two tabs and one raw stream on the SKU: still one gRPC watch for the BFF.
                    assert hub.watchers - others == bff_watch
                    driver.stdin.write(b"go\n")
                    await driver.stdin.drain()
            assert await asyncio.wait_for(driver.wait(), 20) == 0, (await driver.stderr.read()).decode()[
                -2000:
            ]
        finally:
            if driver.returncode is None:
                driver.kill()
                await driver.wait()

        assert steps["stock"]["mode"] == "snapshot"
        assert steps["live"]["ms"] < 2000

        resume = steps["resume"]
        assert resume["resumed"] == {"mode": "resumed", "after": resume["cursor"]}
        before, after = resume["before"], resume["after"]
        # Every change exactly once: the two missed while away, one after the plain reload.
        assert after[: len(before)] == before and len(after) == len(before) + 3, resume
        assert len(set(after)) == len(after) and resume["reloadMode"] == "resumed"

        order_id = steps["order"]["orderId"]
        assert order_id and steps["order"]["reserved"] == "2"
        order = await admin.order.get_order(order_pb2.GetOrderRequest(id=order_id))
        assert [(ln.sku, ln.quantity) for ln in order.lines] == [(sku, 2)]
        assert "changed in another tab" in steps["stale"]["message"]
        assert "not enough stock" in steps["short"]["message"] and steps["short"]["orderShown"] is False
        assert steps["cors"] == {
            "step": "cors",
            "origin": cross_origin,
            "status": 201,
            "key": steps["cors"]["key"],
            "credentialed": "refused",
        }
        assert steps["cors"]["key"]

        # The raw stream saw the same changes as the page, in the same order, plus heartbeats.
        await wait_for(lambda: len(change_ids(raw.events)) >= len(after), "the raw stream's changes")
        seen = raw.close()
        assert change_ids(seen)[: len(after)] == after
        beats = [ev for ev in seen if ev.event == "heartbeat"]
        assert beats and all(ev.id == ev.data["cursor"] and ev.data["events"] == [] for ev in beats)

        # Resume by the Last-Event-ID header: after the first change, exactly the rest.
        changes = [ev for ev in seen if ev.event == "change"]
        resumed = await asyncio.to_thread(
            Sse, f"{base}/stock/{sku}/events", {"Last-Event-ID": changes[0].id or ""}
        )
        try:
            first = await asyncio.to_thread(resumed.next)
            assert (first.event, first.id) == ("resumed", changes[0].id)
            again = [await asyncio.to_thread(resumed.next) for _ in changes[1:]]
            assert [(ev.event, ev.id, ev.data) for ev in again] == [
                (ev.event, ev.id, ev.data) for ev in changes[1:]
            ]
            assert (await asyncio.to_thread(resumed.next)).event == "heartbeat"  # and nothing more
        finally:
            resumed.close()
        # A resume point the BFF never issued: the current levels instead.
        fresh = await asyncio.to_thread(Sse, f"{base}/stock/{sku}/events", {"Last-Event-ID": "1"})
        try:
            snap = await asyncio.to_thread(fresh.next)
            assert (snap.event, snap.data["onHand"], snap.data["reserved"]) == ("snapshot", "20", "3")
        finally:
            fresh.close()
        assert hub.watchers - others == bff_watch

    shots = [Path(steps["short"]["screenshot"]), ARTIFACTS / "bff-page-order.png"]
    assert all(p.stat().st_size > 10_000 for p in shots)
    with capsys.disabled():
        print(
            f"\nBFF page: stock change shown in {steps['live']['ms']} ms; screenshots: {', '.join(map(str, shots))}"
        )
