"""Pluggable strategies: OCR, document verification, e-signature.

Defaults: no OCR ("none"), verification by a person ("manual_review"), and
the built-in e-signature (evidence recorded by us: method, signer, IP, user
agent, SHA-256). A deployment plugs another implementation in where the
worker / servicer is built; the name of the strategy is stored with each
result so a reviewer knows how it was obtained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from domain.shared.errors import InvalidArgument


@dataclass(frozen=True)
class OcrResult:
    text: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    # 0..10000 basis points; integers keep results comparable and exact.
    confidence_bps: int = 0


@dataclass(frozen=True)
class DocumentFacts:
    document_id: str
    document_type_code: str
    content_type: str
    size_bytes: int
    sha256: str
    number: str
    issuing_authority: str
    expiration_date: str


@dataclass(frozen=True)
class VerificationOutcome:
    status: str  # manual_review | verified | rejected
    confidence_bps: int
    note: str = ""


class OcrStrategy(Protocol):
    name: str

    async def extract(self, content: bytes, facts: DocumentFacts) -> OcrResult: ...


class VerificationStrategy(Protocol):
    name: str

    async def verify(self, facts: DocumentFacts, ocr: OcrResult) -> VerificationOutcome: ...


class NoOcr:
    name = "none"

    async def extract(self, content: bytes, facts: DocumentFacts) -> OcrResult:
        return OcrResult()


class ManualReview:
    """Never decides: the document waits for a person, with confidence 0."""

    name = "manual_review"

    async def verify(self, facts: DocumentFacts, ocr: OcrResult) -> VerificationOutcome:
        return VerificationOutcome("manual_review", 0, "awaiting a reviewer")


@dataclass(frozen=True)
class SignatureRequest:
    registration_id: str
    agreement_code: str
    agreement_version: int
    method: str  # drawn | typed | checkbox | external
    signer_name: str
    signer_email: str
    signature: bytes
    external_reference: str


@dataclass(frozen=True)
class SignatureEvidence:
    provider: str
    external_reference: str = ""


class ESignatureProvider(Protocol):
    name: str

    async def sign(self, request: SignatureRequest) -> SignatureEvidence: ...


class BuiltinESignature:
    """Records our own evidence; `external` signatures keep the provider's reference as given."""

    name = "builtin"

    async def sign(self, request: SignatureRequest) -> SignatureEvidence:
        if request.method == "external" and not request.external_reference:
            raise InvalidArgument(
                "EXTERNAL_REFERENCE_REQUIRED", "an external signature needs the provider's external_reference"
            )
        return SignatureEvidence(self.name, request.external_reference)
