"""JWT verification and minting, and the access policy declared in the protos."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from google.protobuf.descriptor import ServiceDescriptor

from domain.shared.caller import Caller
from entrepot.auth.v1 import auth_pb2
from server.settings import Settings

log = logging.getLogger("entrepot.auth")


class AuthError(Exception):
    """Token missing or invalid: UNAUTHENTICATED. `reason` is safe to return to the caller."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Policy:
    permission: str
    channel_required: bool
    server_streaming: bool
    client_streaming: bool


class UndeclaredPermission(RuntimeError):
    """A served method has no (entrepot.auth.v1.access) option: the server must not start."""


def policies_for(services: list[ServiceDescriptor]) -> dict[str, Policy]:
    """Map '/pkg.Service/Method' to its declared policy; refuse undeclared methods."""
    out: dict[str, Policy] = {}
    missing: list[str] = []
    for service in services:
        for method in service.methods:
            name = f"/{service.full_name}/{method.name}"
            opts = method.GetOptions()
            ext: Any = auth_pb2.access
            if not opts.HasExtension(ext) or not opts.Extensions[ext].permission:
                missing.append(name)
                continue
            access = opts.Extensions[ext]
            out[name] = Policy(
                permission=access.permission,
                channel_required=access.channel_required,
                server_streaming=method.server_streaming,
                client_streaming=method.client_streaming,
            )
    if missing:
        raise UndeclaredPermission(
            "refusing to start: these RPCs declare no (entrepot.auth.v1.access) permission: "
            + ", ".join(missing)
        )
    return out


class JwksKeys:
    """RS256 public keys from a JWKS file, reloaded when the file changes (rotation without restart)."""

    def __init__(self, path: Path, check_every: float = 1.0) -> None:
        self.path = path
        self.check_every = check_every
        self._mtime: tuple[int, int, int] | None = None
        self._checked = time.monotonic()
        self._keys: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._reload()

    def _reload(self) -> bool:
        """True when the key set changed. The signature includes size and inode because a
        rewrite within the mtime granularity (or an atomic rename) must still be noticed."""
        stat = self.path.stat()
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self._mtime:
            return False
        data = json.loads(self.path.read_text())
        keys = {}
        for jwk in jwt.PyJWKSet.from_dict(data).keys:
            keys[jwk.key_id or ""] = jwk.key
        self._keys, self._mtime = keys, signature
        return True

    def refresh(self) -> bool:
        """Re-read the file at most every `check_every` seconds; True when the keys changed.
        A missing or half-written file keeps the previous keys (rotation must not open a gap)."""
        now = time.monotonic()
        if now - self._checked <= self.check_every:
            return False
        with self._lock:
            self._checked = now
            try:
                return self._reload()
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                log.warning(
                    "JWKS reload failed; keeping the previous keys", extra={"error": type(exc).__name__}
                )
                return False

    def get(self, kid: str | None) -> Any:
        self.refresh()
        key = self._keys.get(kid or "")
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        return key


class TokenVerifier:
    """Verifies bearer JWTs; caches verified tokens until they expire."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        allowed = {a.upper() for a in settings.jwt_algorithms}
        self.hs_secret = settings.jwt_hs256_secret.get_secret_value() if settings.jwt_hs256_secret else None
        self.jwks = JwksKeys(settings.jwt_jwks_file) if settings.jwt_jwks_file else None
        # An algorithm is only usable when its key material is configured, so an RS
        # deployment can never be tricked into HS verification with its public key.
        self.algorithms = {
            a
            for a in allowed
            if (a == "HS256" and self.hs_secret) or (a == "RS256" and self.jwks is not None)
        }
        if not self.algorithms:
            raise ValueError(
                "no usable JWT algorithm: set ENTREPOT_JWT_HS256_SECRET and/or ENTREPOT_JWT_JWKS_FILE "
                "and list the algorithm in ENTREPOT_JWT_ALGORITHMS"
            )
        self._cache: OrderedDict[str, tuple[Caller, float]] = OrderedDict()
        self._cache_size = settings.token_cache_size

    def verify(self, token: str) -> Caller:
        if self.jwks is not None and self.jwks.refresh():
            # Keys rotated: tokens verified with a removed key must not live on in the cache.
            self._cache.clear()
        hit = self._cache.get(token)
        now = time.time()
        if hit is not None:
            caller, exp = hit
            if exp > now:
                return caller
            self._cache.pop(token, None)
        caller, exp = self._verify(token)
        self._cache[token] = (caller, exp)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("TOKEN_MALFORMED", "the bearer token is not a JWT") from exc
        alg = str(header.get("alg", "")).upper()
        if alg not in self.algorithms:
            raise AuthError("TOKEN_ALGORITHM_REFUSED", f"JWT algorithm {alg or 'none'!r} is not accepted")
        if alg == "HS256":
            key: Any = self.hs_secret
        else:
            assert self.jwks is not None
            key = self.jwks.get(header.get("kid"))
            if key is None:
                raise AuthError("TOKEN_KEY_UNKNOWN", "the token's signing key is not in the key set")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                leeway=self.settings.jwt_leeway_seconds,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("TOKEN_EXPIRED", "the bearer token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError("TOKEN_NOT_YET_VALID", "the bearer token is not valid yet") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError("TOKEN_AUDIENCE_REFUSED", "the bearer token is for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("TOKEN_ISSUER_REFUSED", "the bearer token has an unknown issuer") from exc
        except jwt.PyJWTError as exc:
            raise AuthError("TOKEN_INVALID", f"the bearer token is invalid: {type(exc).__name__}") from exc
        return caller_from_claims(claims), float(claims["exp"])


def _strings(value: Any, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset([value])
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise AuthError("TOKEN_CLAIMS_INVALID", f"claim {claim!r} must be a list of strings")


def caller_from_claims(claims: dict[str, Any]) -> Caller:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("TOKEN_CLAIMS_INVALID", "claim 'sub' must be a non-empty string")
    return Caller(
        subject=sub,
        permissions=_strings(claims.get("permissions"), "permissions"),
        channels=_strings(claims.get("channels"), "channels"),
        status_namespaces=_strings(claims.get("status_namespaces"), "status_namespaces"),
    )


def mint_token(
    settings: Settings,
    *,
    sub: str,
    permissions: list[str],
    channels: list[str],
    status_namespaces: list[str] | None = None,
    ttl_seconds: int = 3600,
    private_key_pem: str | None = None,
    kid: str | None = None,
) -> str:
    """A token for development and tests: HS256 with the dev secret, or RS256 with a given key."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "permissions": permissions,
        "channels": channels,
    }
    if status_namespaces:
        claims["status_namespaces"] = status_namespaces
    if private_key_pem is not None:
        return jwt.encode(claims, private_key_pem, algorithm="RS256", headers={"kid": kid} if kid else None)
    if settings.jwt_hs256_secret is None:
        raise ValueError("ENTREPOT_JWT_HS256_SECRET is not set")
    return jwt.encode(claims, settings.jwt_hs256_secret.get_secret_value(), algorithm="HS256")
