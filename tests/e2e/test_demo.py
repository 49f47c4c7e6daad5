"""`entrepot demo` as a user runs it, against a real server: every step served here
succeeds, every step whose service is not served is reported as skipped (never silently),
and the WMS feed is applied exactly once even when replayed. The target comes from
ENTREPOT_TARGET. Without a server, a token or its CSV file it says so in one line."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from server.devservices import free_port
from server.services import SERVICES

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "server.cli", "demo"]
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


def _env(**extra: str) -> dict[str, str]:
    drop = ("ENTREPOT_TARGET", "ENTREPOT_TOKEN", "ENTREPOT_APPROVER_TOKEN", "ENTREPOT_JWT_HS256_SECRET")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # A data directory without a dev secret: tokens come from the test, or there are none.
    return {**env, "ENTREPOT_DATA_DIR": str(ROOT / ".entrepot" / f"e2e-demo-{uuid.uuid4().hex[:8]}"), **extra}


def _summary(text: str) -> dict[str, str]:
    results = {}
    for line in text.split("== summary\n", 1)[1].splitlines():
        if line.startswith("  "):
            results[line[2:24].strip()] = line[24:].strip()
    return results


async def test_demo_tour_prints_a_timeline_and_skips_only_what_is_not_served(
    target: str, make_token: Callable[..., str]
) -> None:
    env = _env(
        ENTREPOT_TARGET=target,
        ENTREPOT_TOKEN=make_token(sub="demo-operator", status_namespaces=["*"]),
        ENTREPOT_APPROVER_TOKEN=make_token(sub="demo-approver"),
    )
    # The server runs in this test's event loop: wait for the subprocess without blocking it.
    proc = await asyncio.create_subprocess_exec(
        *DEMO, "--run-id", "t1", cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = stdout.decode()
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    assert text.startswith(f"Entrepot demo against {target} "), text
    results = _summary(text)
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


def _one_line_failure(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert "Traceback" not in said, said
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, said
    return done.stderr.strip()


def test_demo_without_a_server_says_so_once() -> None:
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    line = _one_line_failure(DEMO, _env(ENTREPOT_TARGET=target, ENTREPOT_TOKEN="any"))
    assert time.monotonic() - started < 20, line
    assert f"no Entrepot server at {target}" in line, line


def test_demo_without_a_token_or_its_csv_says_so() -> None:
    line = _one_line_failure(DEMO, _env(ENTREPOT_TARGET=f"127.0.0.1:{free_port()}"))
    assert "no token" in line, line
    line = _one_line_failure([*DEMO, "--csv", "/nonexistent/feed.csv"], _env(ENTREPOT_TOKEN="any"))
    assert "cannot read --csv /nonexistent/feed.csv" in line, line
