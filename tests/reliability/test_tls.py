"""TLS and mutual TLS with certificates made here (cryptography): a good certificate works; a
foreign CA, an expired certificate or no certificate is refused at the handshake; with mTLS the
token's subject must be named by the client certificate."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from entrepot.platform.v1 import channel_pb2
from entrepot.registration.v1 import registration_pb2
from entrepot_client import (
    DeadlineExceededError,
    Entrepot,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from server.app import App
from tests.conftest import make_settings
from tests.procs import server_token

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Pair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return Pair(cert, key)


def issue(
    ca: Pair, cn: str, *, server: bool, expired: bool = False, sans: list[x509.GeneralName] | None = None
) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = (
        (NOW - dt.timedelta(days=10), NOW - dt.timedelta(days=1))
        if expired
        else (
            NOW - dt.timedelta(days=1),
            NOW + dt.timedelta(days=30),
        )
    )
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    names = sans or (
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if server else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Pair(builder.sign(ca.key, hashes.SHA256()), key)


@dataclass
class Pki:
    ca: Pair
    foreign_ca: Pair
    server: Pair
    expired_server: Pair
    client: Pair  # CN=svc-orders
    client_san: Pair  # CN=whatever, SAN URI spiffe://entrepot/svc-refunds
    foreign_client: Pair
    expired_client: Pair
    dir: Path

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, foreign = make_ca("Entrepot Test CA"), make_ca("Someone Else CA")
    return Pki(
        ca=ca,
        foreign_ca=foreign,
        server=issue(ca, "localhost", server=True),
        expired_server=issue(ca, "localhost", server=True, expired=True),
        client=issue(ca, "svc-orders", server=False),
        client_san=issue(
            ca,
            "whatever",
            server=False,
            sans=[x509.UniformResourceIdentifier("spiffe://entrepot/svc-refunds")],
        ),
        foreign_client=issue(foreign, "svc-orders", server=False),
        expired_client=issue(ca, "svc-orders", server=False, expired=True),
        dir=tmp_path_factory.mktemp("pki"),
    )


@contextlib.asynccontextmanager
async def tls_app(database_url: str, pki: Pki, server: Pair, mtls: bool, **more: Any) -> AsyncIterator[App]:
    overrides: dict[str, Any] = {
        "tls_cert_file": pki.write("server.pem", server.cert_pem),
        "tls_key_file": pki.write("server.key", server.key_pem),
        **more,
    }
    if mtls:
        overrides["tls_client_ca_file"] = pki.write("clients-ca.pem", pki.ca.cert_pem)
    app = App(make_settings(database_url, None, **overrides))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


@contextlib.asynccontextmanager
async def tls_server(database_url: str, pki: Pki, server: Pair, mtls: bool) -> AsyncIterator[str]:
    async with tls_app(database_url, pki, server, mtls) as app:
        yield f"localhost:{app.port}"


def creds(root: Pair, client: Pair | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=root.cert_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=root.cert_pem, private_key=client.key_pem, certificate_chain=client.cert_pem
    )


async def list_channels(
    target: str, credentials: grpc.ChannelCredentials | None, sub: str = "svc-orders"
) -> Any:
    async with Entrepot(target, server_token(sub), credentials=credentials, timeout=3) as ep:
        return await ep.channel.list_channels(channel_pb2.ListChannelsRequest())


async def refused(target: str, credentials: grpc.ChannelCredentials | None) -> bool:
    """True when no call can get through (the handshake fails: UNAVAILABLE on the client)."""
    try:
        await list_channels(target, credentials)
    except (UnavailableError, DeadlineExceededError):
        return True
    return False


async def test_server_tls(database_url: str, pki: Pki) -> None:
    async with tls_server(database_url, pki, pki.server, mtls=False) as target:
        await list_channels(target, creds(pki.ca))
        assert await refused(target, creds(pki.foreign_ca)), "a client trusting another CA must not connect"
        assert await refused(target, None), "plaintext must not reach a TLS server"


async def test_expired_server_certificate_is_refused_by_clients(database_url: str, pki: Pki) -> None:
    async with tls_server(database_url, pki, pki.expired_server, mtls=False) as target:
        assert await refused(target, creds(pki.ca))


async def test_mtls_requires_a_valid_client_certificate(database_url: str, pki: Pki) -> None:
    async with tls_server(database_url, pki, pki.server, mtls=True) as target:
        await list_channels(target, creds(pki.ca, pki.client))
        assert await refused(target, creds(pki.ca)), "no client certificate"
        assert await refused(target, creds(pki.ca, pki.foreign_client)), (
            "client certificate from a foreign CA"
        )
        assert await refused(target, creds(pki.ca, pki.expired_client)), "expired client certificate"


async def test_mtls_binds_the_token_subject_to_the_certificate(database_url: str, pki: Pki) -> None:
    async with tls_server(database_url, pki, pki.server, mtls=True) as target:
        # CN names the subject...
        await list_channels(target, creds(pki.ca, pki.client), sub="svc-orders")
        # ...or a SAN does.
        await list_channels(target, creds(pki.ca, pki.client_san), sub="spiffe://entrepot/svc-refunds")
        # A token for someone else is refused even with a valid certificate.
        with pytest.raises(UnauthenticatedError) as err:
            await list_channels(target, creds(pki.ca, pki.client), sub="svc-refunds")
        assert err.value.reason == "CLIENT_CERT_MISMATCH"


async def test_mtls_and_rate_limits_are_stages_of_the_one_pipeline(database_url: str, pki: Pki) -> None:
    """A hardened deployment runs the same pipeline as every other, with two more stages
    between auth and channel: everything else answers exactly as without them."""
    limit = "registration.v1.RegistrationService/GetDocumentType=3/s:3"
    async with tls_app(database_url, pki, pki.server, mtls=True, rate_limits=limit) as app:
        assert app.pipeline is not None
        assert app.pipeline.stages == [
            "metrics",
            "errors",
            "auth",
            "tls-identity",
            "rate-limit",
            "channel",
            "text",
        ]
        target = f"localhost:{app.port}"
        async with Entrepot(
            target, server_token("svc-orders"), credentials=creds(pki.ca, pki.client), timeout=3
        ) as ep:
            # text stage
            with pytest.raises(InvalidArgumentError) as bad:
                await ep.registration.create_document_type(
                    registration_pb2.CreateDocumentTypeRequest(
                        document_type=registration_pb2.DocumentType(code="nul", name="N\x00"), request_id="r1"
                    )
                )
            assert (bad.value.reason, bad.value.message) == (
                "INVALID_TEXT",
                "document_type.name contains a NUL character",
            )
            # errors stage (a domain error from the handler), then the rate limit
            missing = registration_pb2.GetDocumentTypeRequest(code="no-such-type")
            for _ in range(3):
                with pytest.raises(NotFoundError):
                    await ep.registration.get_document_type(missing)
            with pytest.raises(ResourceExhaustedError) as limited:
                await ep.registration.get_document_type(missing)
            assert limited.value.reason == "RATE_LIMITED"
        # channel stage, after the guards
        async with Entrepot(
            target,
            server_token("svc-orders"),
            "no-such-channel",
            credentials=creds(pki.ca, pki.client),
            timeout=3,
        ) as ep:
            with pytest.raises(NotFoundError):
                await ep.channel.list_channels(channel_pb2.ListChannelsRequest())


@pytest.mark.parametrize(
    "files",
    [("tls_cert_file",), ("tls_key_file",), ("tls_client_ca_file",)],
    ids=["cert-without-key", "key-without-cert", "client-ca-without-server-cert"],
)
async def test_incomplete_tls_settings_refuse_startup(
    database_url: str, pki: Pki, files: tuple[str, ...]
) -> None:
    """Half a TLS configuration must not silently fall back to plaintext."""
    overrides = {f: pki.write(f, pki.server.cert_pem) for f in files}
    app = App(make_settings(database_url, None, **overrides))
    try:
        with pytest.raises(ValueError, match="ENTREPOT_TLS"):
            await app.start()
    finally:
        await app.rt.close()
