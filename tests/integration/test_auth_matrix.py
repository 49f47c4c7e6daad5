"""R7, default-deny auth, for EVERY method found in the served descriptors:
a new RPC cannot escape this matrix."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from server.auth import Policy, policies_for
from server.services import SERVICES
from server.settings import Settings
from tests.conftest import TEST_CHANNEL, TEST_SECRET

METHODS: list[tuple[str, MethodDescriptor]] = [
    (f"/{spec.descriptor.full_name}/{m.name}", m) for spec in SERVICES for m in spec.descriptor.methods
]
POLICIES: dict[str, Policy] = policies_for([spec.descriptor for spec in SERVICES])
IDS = [name.rsplit(".", 1)[-1] for name, _ in METHODS]


async def call(
    target: str, name: str, method: MethodDescriptor, metadata: list[tuple[str, str]]
) -> grpc.StatusCode:
    """Call with an empty request; returns the status code (OK if it got through)."""
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    kw: dict[str, Any] = {
        "request_serializer": req_cls.SerializeToString,
        "response_deserializer": resp_cls.FromString,
    }
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            if method.client_streaming and method.server_streaming:
                stream = ch.stream_stream(name, **kw)(iter([]), metadata=metadata, timeout=5)
                async for _ in stream:
                    pass
            elif method.client_streaming:
                await ch.stream_unary(name, **kw)(iter([]), metadata=metadata, timeout=5)
            elif method.server_streaming:
                stream = ch.unary_stream(name, **kw)(req_cls(), metadata=metadata, timeout=1)
                async for _ in stream:
                    break
            else:
                await ch.unary_unary(name, **kw)(req_cls(), metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    out = {
        "iss": "entrepot",
        "aud": "entrepot",
        "sub": "attacker",
        "iat": now,
        "exp": now + 600,
        "permissions": ["*"],
        "channels": ["*"],
    }
    out.update(over)
    return out


def test_every_served_method_declares_a_permission() -> None:
    assert len(POLICIES) == len(METHODS) > 0
    assert all(p.permission for p in POLICIES.values())


@pytest.mark.parametrize(("name", "method"), METHODS, ids=IDS)
async def test_no_token_is_unauthenticated(target: str, name: str, method: MethodDescriptor) -> None:
    assert await call(target, name, method, []) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("name", "method"), METHODS, ids=IDS)
async def test_missing_permission_is_denied(
    target: str, make_token: Callable[..., str], name: str, method: MethodDescriptor
) -> None:
    others = sorted({p.permission for p in POLICIES.values()} - {POLICIES[name].permission})
    md = [*bearer(make_token(permissions=others)), ("x-channel-slug", TEST_CHANNEL)]
    assert await call(target, name, method, md) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("name", "method"), METHODS, ids=IDS)
async def test_channel_not_in_token_is_denied(
    target: str, make_token: Callable[..., str], test_channel: str, name: str, method: MethodDescriptor
) -> None:
    md = [*bearer(make_token(channels=["some-other-channel"])), ("x-channel-slug", test_channel)]
    assert await call(target, name, method, md) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("name", "method"), METHODS, ids=IDS)
async def test_channel_required_methods_refuse_a_call_without_channel(
    target: str, make_token: Callable[..., str], name: str, method: MethodDescriptor
) -> None:
    code = await call(target, name, method, bearer(make_token()))
    if POLICIES[name].channel_required:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    else:
        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _rsa_pem() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def _unsigned(payload: dict[str, Any]) -> str:
    def seg(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{seg({'alg': 'none', 'typ': 'JWT'})}.{seg(payload)}."


def bad_tokens() -> dict[str, str]:
    private, public = _rsa_pem()
    now = int(time.time())
    return {
        "alg_none": _unsigned(claims()),
        "expired": jwt.encode(claims(exp=now - 3600, iat=now - 7200), TEST_SECRET, algorithm="HS256"),
        "not_yet_valid": jwt.encode(claims(nbf=now + 3600), TEST_SECRET, algorithm="HS256"),
        "wrong_audience": jwt.encode(claims(aud="someone-else"), TEST_SECRET, algorithm="HS256"),
        "wrong_issuer": jwt.encode(claims(iss="evil"), TEST_SECRET, algorithm="HS256"),
        "wrong_secret": jwt.encode(claims(), "not-the-secret-0123456789abcdefghij", algorithm="HS256"),
        # HS/RS confusion: an HS256 token "signed" with an RSA public key as the secret.
        "hs_rs_confusion": _hmac_with_public_key(public),
        "rs256_unknown_key": jwt.encode(claims(), private, algorithm="RS256"),
        "garbage": "not.a.jwt",
        "missing_sub": jwt.encode(
            {k: v for k, v in claims().items() if k != "sub"}, TEST_SECRET, algorithm="HS256"
        ),
    }


def _hmac_with_public_key(public_pem: bytes) -> str:
    import hashlib
    import hmac

    def seg(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = seg(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = seg(json.dumps(claims()).encode())
    sig = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{seg(sig)}"


BAD = bad_tokens()


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize(("name", "method"), METHODS, ids=IDS)
async def test_bad_tokens_are_unauthenticated(
    target: str, kind: str, name: str, method: MethodDescriptor
) -> None:
    md = [*bearer(BAD[kind]), ("x-channel-slug", TEST_CHANNEL)]
    assert await call(target, name, method, md) == grpc.StatusCode.UNAUTHENTICATED


def test_settings_default_secretless_server_refuses_to_start() -> None:
    from server.auth import TokenVerifier

    with pytest.raises(ValueError, match="no usable JWT algorithm"):
        TokenVerifier(Settings(jwt_hs256_secret=None, jwt_jwks_file=None))
