"""`entrepot keys create`: an RS256 key pair for minting tokens and the JWKS the servers verify
them with (ENTREPOT_JWT_JWKS_FILE).

    entrepot keys create --dir deploy/keys            # deploy/keys/<kid>.pem + deploy/keys/jwks.json
    entrepot token --private-key deploy/keys/<kid>.pem --kid <kid> --sub alice ...

Each run adds a key: the JWKS keeps the keys already in it, so tokens signed with the previous
key stay valid while clients move to the new one (the servers re-read the file when it
changes); remove a key from jwks.json to retire it. The private key file is readable by its
owner only and never leaves the machine that mints tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

JWKS_NAME = "jwks.json"


def new_kid() -> str:
    return "entrepot-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def public_jwk(private_pem: bytes, kid: str) -> dict[str, Any]:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return jwk


def create(directory: Path, kid: str) -> tuple[Path, Path]:
    """Writes <kid>.pem (0600) and adds its public key to jwks.json; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    pem_path = directory / f"{kid}.pem"
    jwks_path = directory / JWKS_NAME
    if pem_path.exists():
        raise FileExistsError(f"{pem_path} exists: choose another --kid")
    keys: list[dict[str, Any]] = []
    if jwks_path.exists():
        keys = list(json.loads(jwks_path.read_text()).get("keys", []))
    if any(k.get("kid") == kid for k in keys):
        raise FileExistsError(f"{jwks_path} already has a key {kid!r}: choose another --kid")
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(pem_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    keys.append(public_jwk(pem, kid))
    tmp = jwks_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": keys}, indent=2) + "\n")
    tmp.replace(jwks_path)  # the servers never read a half-written file
    return pem_path, jwks_path


def cmd_keys_create(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    kid = args.kid or new_kid()
    try:
        pem_path, jwks_path = create(directory, kid)
    except (FileExistsError, OSError, ValueError) as exc:
        print(f"entrepot keys create: {exc}", file=sys.stderr)
        return 1
    print(f"private key: {pem_path} (keep it secret; it signs tokens)")
    print(f"public keys: {jwks_path} (ENTREPOT_JWT_JWKS_FILE for the servers)")
    print("mint a token:")
    print(
        f"  entrepot token --private-key {pem_path} --kid {kid} --sub alice --permissions '*' --channels '*'"
    )
    return 0


def add_parser(sub: Any) -> None:
    k = sub.add_parser("keys", help="RS256 signing keys and their JWKS").add_subparsers(
        dest="keys_command", required=True
    )
    c = k.add_parser("create", help="a new RS256 key pair, added to the directory's jwks.json")
    c.add_argument(
        "--dir", default="deploy/keys", help="where <kid>.pem and jwks.json go (default deploy/keys)"
    )
    c.add_argument("--kid", help="key id (default entrepot-<UTC timestamp>)")
    c.set_defaults(fn=cmd_keys_create)
