"""Server TLS and mutual TLS.

Server TLS: ENTREPOT_TLS_CERT_FILE + ENTREPOT_TLS_KEY_FILE (PEM; the cert file may hold the chain).
Mutual TLS: ENTREPOT_TLS_CLIENT_CA_FILE as well. The handshake then refuses any client without a
certificate chaining to that CA (foreign CA, expired, none). The certificate does not replace the
bearer token: permissions and channels stay in the token, and the token's `sub` must be one of the
certificate's names (CN, DNS SAN or URI SAN). So a stolen token is useless without the matching
client key, and a valid certificate alone grants nothing.
"""

from __future__ import annotations

from typing import Any

import grpc

from server import context as ctx
from server.errors import abort, build_status
from server.interceptors import Guard
from server.settings import Settings


def tls_enabled(s: Settings) -> bool:
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        raise ValueError("set both ENTREPOT_TLS_CERT_FILE and ENTREPOT_TLS_KEY_FILE, or neither")
    if s.tls_client_ca_file and not s.tls_cert_file:
        raise ValueError("ENTREPOT_TLS_CLIENT_CA_FILE needs ENTREPOT_TLS_CERT_FILE/KEY_FILE")
    return s.tls_cert_file is not None


def server_credentials(s: Settings) -> grpc.ServerCredentials:
    assert s.tls_cert_file is not None and s.tls_key_file is not None
    cert = s.tls_cert_file.read_bytes()
    key = s.tls_key_file.read_bytes()
    ca = s.tls_client_ca_file.read_bytes() if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _names(auth: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            names.add(value.decode() if isinstance(value, bytes) else str(value))
    return names


async def check_client_cert(context: grpc.aio.ServicerContext, name: str) -> None:
    """The TLS identity stage (with mTLS): the token's subject must be named by the client
    certificate. A pipeline guard (server/interceptors.py): it runs after auth, which binds the caller."""
    if ctx.current_caller().subject not in _names(context.auth_context() or {}):
        await abort(
            context,
            build_status(
                grpc.StatusCode.UNAUTHENTICATED,
                "CLIENT_CERT_MISMATCH",
                "the token's subject is not named by the client certificate",
            ),
        )


CLIENT_CERT = Guard("tls-identity", check_client_cert)
