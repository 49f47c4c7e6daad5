"""`entrepot keys create` end to end, as a compose user does it: make a key pair and JWKS, start
`entrepot serve` in RS256-only mode on that JWKS, mint a token with `entrepot token
--private-key`, call. A second key added to the same JWKS works at once (rotation); a key
the JWKS does not hold is refused."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from entrepot.inventory.v1 import inventory_pb2 as pb
from entrepot_client import Entrepot, UnauthenticatedError
from tests.conftest import unique
from tests.procs import ROOT, ServerProcess


def entrepot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def create_key(directory: Path, kid: str) -> Path:
    made = entrepot("keys", "create", "--dir", str(directory), "--kid", kid)
    assert made.returncode == 0, made.stderr
    pem = directory / f"{kid}.pem"
    assert f"--private-key {pem} --kid {kid}" in made.stdout
    return pem


def token(pem: Path, kid: str) -> str:
    minted = entrepot("token", "--private-key", str(pem), "--kid", kid, "--sub", unique("keys"))
    assert minted.returncode == 0, minted.stderr
    return minted.stdout.strip()


async def test_keys_create_then_mint_and_call_an_rs256_only_server(database_url: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = create_key(keys, "e2e-1")
    jwks = keys / "jwks.json"
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert [k["kid"] for k in json.loads(jwks.read_text())["keys"]] == ["e2e-1"]
    assert "PRIVATE" not in jwks.read_text() and '"d"' not in jwks.read_text()

    again = entrepot("keys", "create", "--dir", str(keys), "--kid", "e2e-1")
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "exists" in again.stderr

    stranger = create_key(tmp_path / "elsewhere", "e2e-1")  # same kid, a key this server never saw

    env = {"ENTREPOT_JWT_ALGORITHMS": "RS256", "ENTREPOT_JWT_JWKS_FILE": str(jwks)}
    with ServerProcess(database_url, **env) as server:
        async with Entrepot(server.target, token(first, "e2e-1")) as ep:
            code = unique("KEYS")
            created = await ep.inventory.create_warehouse(
                pb.CreateWarehouseRequest(warehouse=pb.Warehouse(code=code, name="Keys"))
            )
            assert created.code == code

        # Rotation: a second key joins the JWKS; the server picks it up without a restart.
        second = create_key(keys, "e2e-2")
        await asyncio.sleep(1.1)  # the JWKS file is re-checked at most once a second
        assert [k["kid"] for k in json.loads(jwks.read_text())["keys"]] == ["e2e-1", "e2e-2"]
        async with Entrepot(server.target, token(second, "e2e-2")) as ep:
            got = await ep.inventory.get_warehouse(pb.GetWarehouseRequest(code=code), timeout=10)
            assert got.code == code

        async with Entrepot(server.target, token(stranger, "e2e-1")) as ep:
            with pytest.raises(UnauthenticatedError):
                await ep.inventory.get_warehouse(pb.GetWarehouseRequest(code=code))
