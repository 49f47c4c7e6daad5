"""`entrepot demo` against a real server: every step served here succeeds, every step
whose service is not served is reported as skipped (never silently), and the WMS feed
is applied exactly once even when replayed."""

from __future__ import annotations

import io
import re
from collections.abc import Callable

from server.demo import run_demo
from server.services import SERVICES

CART = "entrepot.cart.v1.CartService"
ORDER = "entrepot.order.v1.OrderService"
# Step -> the services it needs (an order comes from the cart, or from an order intent without it).
STEP_NEEDS = {
    "cart checkout": {CART},
    "order intent": {ORDER},
    "partial shipment": {ORDER},
    "refund with approval": {ORDER, "entrepot.refund.v1.RefundService"},
    "registration review": {"entrepot.registration.v1.RegistrationService"},
    "order timeline": {ORDER},
}


async def test_demo_tour_prints_a_timeline_and_skips_only_what_is_not_served(
    target: str, make_token: Callable[..., str]
) -> None:
    out = io.StringIO()
    results = await run_demo(
        target,
        make_token(sub="demo-operator", status_namespaces=["*"]),
        make_token(sub="demo-approver"),
        run="t1",
        out=out,
    )
    text = out.getvalue()
    served = {spec.descriptor.full_name for spec in SERVICES}
    for step in ("channel", "warehouses", "items", "wms sync"):
        assert results[step] == "ok", text
    for step, needs in STEP_NEEDS.items():
        if step == "order intent" and CART in served:
            assert results[step].startswith("skipped"), text  # the checkout made the order
        elif needs <= served:
            assert results[step] == "ok", text
        else:
            assert results[step].startswith("skipped"), text
            assert re.search(rf"== {step}\n.*skipped: ", text), text
    # Two fresh batches applied, the replayed one recognised as duplicates.
    assert "ack batch 1: applied 3, duplicate 0" in text
    assert "ack batch 2: applied 3, duplicate 0" in text
    assert "ack batch 3: applied 0, duplicate 3" in text
    assert re.search(
        r"MUG-t1: on hand 63, reserved 0, available 63 \((LYS-t1 25, PAR-t1 38|PAR-t1 38, LYS-t1 25)\)", text
    )
    assert "TEE-t1: on hand 42, reserved 0" in text
    # The watcher opened before the feed saw each applied event once.
    assert re.search(r"saw (\d+) stock changes", text)
    seen = int(re.search(r"saw (\d+) stock changes", text).group(1))  # type: ignore[union-attr]
    assert seen >= 6, text
