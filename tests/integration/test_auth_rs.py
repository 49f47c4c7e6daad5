"""R7 in RS256 mode: a server that trusts only the keys of a JWKS file.

Key rotation without restart (the file is re-read when it changes; tokens of a removed key are
refused at once, even if they were verified and cached before), and every forged or stale token
is UNAUTHENTICATED for every served method (HS/RS confusion with the public key as HMAC secret,
alg none, wrong issuer/audience, expired, unknown kid).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.descriptor import MethodDescriptor

from server.app import App
from server.auth import mint_token
from server.settings import Settings
from tests.conftest import TEST_CHANNEL, TEST_SECRET, make_settings
from tests.integration.test_auth_matrix import IDS, METHODS, call


class Key:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        d = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**d, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def sign(self, claims: dict[str, Any], kid: str | None = "") -> str:
        headers = {"kid": self.kid if kid == "" else kid} if kid is not None else None
        return jwt.encode(claims, self.private_pem, algorithm="RS256", headers=headers)


def write_jwks(path: Path, keys: list[Key]) -> None:
    # Atomic replace, as a key-management job would do it.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": [k.jwk() for k in keys]}))
    os.replace(tmp, path)


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {
        "iss": "entrepot",
        "aud": "entrepot",
        "sub": "rs-tester",
        "iat": now,
        "exp": now + 600,
        "permissions": ["*"],
        "channels": ["*"],
    }
    out.update(over)
    return out


def _seg(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs_with_public_key(public_pem: bytes) -> str:
    head = _seg(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _seg(json.dumps(claims()).encode())
    sig = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_seg(sig)}"


def alg_none() -> str:
    return f"{_seg(json.dumps({'alg': 'none'}).encode())}.{_seg(json.dumps(claims()).encode())}."


@contextlib.asynccontextmanager
async def rs_server(database_url: str, jwks: Path) -> AsyncIterator[str]:
    # RS256 only, and no HS secret at all: the production shape.
    app = App(
        make_settings(database_url, None, jwt_hs256_secret=None, jwt_jwks_file=jwks, jwt_algorithms=["RS256"])
    )
    await app.start()
    try:
        yield f"127.0.0.1:{app.port}"
    finally:
        await app.stop(grace=0.5)


LIST = next(m for name, m in METHODS if name.endswith("/ListChannels"))


async def code_for(target: str, tok: str, method: MethodDescriptor = LIST) -> grpc.StatusCode:
    name = f"/{method.containing_service.full_name}/{method.name}"
    return await call(target, name, method, [("authorization", f"Bearer {tok}")])


async def wait_for_code(target: str, tok: str, want: grpc.StatusCode, timeout: float = 5) -> grpc.StatusCode:
    """The file is checked at most once a second: poll until the server noticed the change."""
    deadline = time.monotonic() + timeout
    got = await code_for(target, tok)
    while got != want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        got = await code_for(target, tok)
    return got


async def test_jwks_rotation_without_restart(database_url: str, tmp_path: Path) -> None:
    old, new = Key("k-2026-01"), Key("k-2026-02")
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, [old])
    async with rs_server(database_url, jwks) as target:
        old_token, new_token = old.sign(claims()), new.sign(claims())
        assert await code_for(target, old_token) == grpc.StatusCode.OK
        assert await code_for(target, new_token) == grpc.StatusCode.UNAUTHENTICATED
        # Publish the new key next to the old one: both work, no restart.
        write_jwks(jwks, [old, new])
        assert await wait_for_code(target, new_token, grpc.StatusCode.OK) == grpc.StatusCode.OK
        assert await code_for(target, old_token) == grpc.StatusCode.OK
        # Retire the old key: its tokens (already verified and cached) are refused from now on.
        write_jwks(jwks, [new])
        assert await wait_for_code(target, old_token, grpc.StatusCode.UNAUTHENTICATED) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert await code_for(target, new_token) == grpc.StatusCode.OK
        assert await code_for(target, new.sign(claims(sub="someone-new"))) == grpc.StatusCode.OK
        # A broken file during a rotation keeps the current keys instead of locking everyone out.
        jwks.write_text("{not json")
        await asyncio.sleep(1.3)
        assert await code_for(target, new.sign(claims(sub="during-a-bad-write"))) == grpc.StatusCode.OK


def forged(good: Key) -> dict[str, str]:
    stranger = Key(good.kid)  # same kid, other key
    now = int(time.time())
    return {
        "hs_rs_confusion": hs_with_public_key(good.public_pem),
        "hs256_with_dev_secret": jwt.encode(claims(), TEST_SECRET, algorithm="HS256"),
        "alg_none": alg_none(),
        "wrong_issuer": good.sign(claims(iss="evil")),
        "wrong_audience": good.sign(claims(aud="someone-else")),
        "expired": good.sign(claims(exp=now - 3600, iat=now - 7200)),
        "not_yet_valid": good.sign(claims(nbf=now + 3600)),
        "unknown_kid": good.sign(claims(), kid="k-unknown"),
        "same_kid_other_key": stranger.sign(claims()),
        "rs384": jwt.encode(claims(), good.private_pem, algorithm="RS384", headers={"kid": good.kid}),
        "garbage": "a.b.c",
    }


@pytest.fixture(scope="module")
def rs_key() -> Key:
    return Key("k-matrix")


async def test_rs_mode_refuses_forged_tokens_on_every_method(
    database_url: str, tmp_path: Path, rs_key: Key
) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, [rs_key])
    bad = forged(rs_key)
    async with rs_server(database_url, jwks) as target:
        assert await code_for(target, rs_key.sign(claims())) == grpc.StatusCode.OK
        # The CLI mints RS256 tokens the server accepts.
        minted = mint_token(
            Settings(),
            sub="cli",
            permissions=["*"],
            channels=["*"],
            private_key_pem=rs_key.private_pem,
            kid="k-matrix",
        )
        assert await code_for(target, minted) == grpc.StatusCode.OK
        failures = []
        for (name, method), mid in zip(METHODS, IDS, strict=True):
            for kind, tok in bad.items():
                md = [("authorization", f"Bearer {tok}"), ("x-channel-slug", TEST_CHANNEL)]
                code = await call(target, name, method, md)
                if code != grpc.StatusCode.UNAUTHENTICATED:
                    failures.append((mid, kind, code))
        assert not failures, failures
