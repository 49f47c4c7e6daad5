"""The records of the registration module: what its reads return and its
store maps rows to. Callers reach them as `catalog.<Record>` and
`submissions.<Record>`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from domain.registration.forms import Answer, FormDefinition, parse_definition
from domain.registration.rules import Requirement, Rule
from domain.shared import ids

# ------------------------------------------------------------------ catalog


@dataclass(frozen=True)
class Form:
    id: str
    slug: str
    channel: str
    version: int
    name: str
    description: str
    customer_group: str
    invitation_required: bool
    steps: list[dict[str, Any]]
    expire_after_seconds: int
    active: bool
    created_at: datetime
    updated_at: datetime
    commerce_mode: str = "both"

    def definition(self) -> FormDefinition:
        return parse_definition(self.steps)[0]


@dataclass(frozen=True)
class RuleRecord:
    rule: Rule
    channel: str
    geo: dict[str, Any]
    requirements: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class DocumentType:
    code: str
    name: str
    description: str
    allowed_content_types: tuple[str, ...]
    max_size_bytes: int
    requires_expiration_date: bool
    requires_number: bool
    requires_issuing_authority: bool
    active: bool
    created_at: datetime
    updated_at: datetime


DOCUMENT_TYPE_FIELDS = (
    "name",
    "description",
    "allowed_content_types",
    "max_size_bytes",
    "requires_expiration_date",
    "requires_number",
    "requires_issuing_authority",
    "active",
)


@dataclass(frozen=True)
class AgreementTemplate:
    code: str
    version: int
    title: str
    body: str
    body_sha256: str
    signature_required: bool
    created_at: datetime


@dataclass(frozen=True)
class InvitationCode:
    code: str
    channel: str
    form_id: str
    customer_group: str
    max_uses: int
    uses: int
    expires_at: datetime | None
    active: bool
    created_at: datetime


# ------------------------------------------------------------------ registrations

STATES = ("submitted", "documents_pending", "in_review", "approved", "denied", "expired")
OPEN = ("submitted", "documents_pending", "in_review")
TERMINAL = ("approved", "denied", "expired")


@dataclass(frozen=True)
class Account:
    id: str
    status: str
    company_name: str
    email: str
    customer_group: str
    address: dict[str, str]
    attributes: dict[str, str]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Verification:
    status: str
    ocr_strategy: str
    verification_strategy: str
    confidence_bps: int
    extracted: dict[str, str]
    note: str
    updated_at: datetime


@dataclass(frozen=True)
class Document:
    id: str
    registration_id: str
    document_type_code: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    storage_key: str
    number: str
    issuing_authority: str
    expiration_date: str
    created_at: datetime
    verification: Verification | None


@dataclass(frozen=True)
class Signature:
    id: str
    registration_id: str
    agreement_code: str
    agreement_version: int
    method: str
    signer_name: str
    signer_email: str
    ip_address: str
    user_agent: str
    content_sha256: str
    external_reference: str
    provider: str
    signed_at: datetime


@dataclass(frozen=True)
class HistoryEntry:
    from_state: str
    to_state: str
    actor: str
    note: str
    at: datetime


@dataclass(frozen=True)
class Registration:
    id: str
    channel: str
    form_id: str
    form_version: int
    state: str
    answers: dict[str, Answer]
    address: dict[str, str]
    invitation_code: str
    customer_group: str
    requirements: dict[str, Any]
    decision: str
    decision_note: str
    reviewer: str
    expires_at: datetime
    created_at: datetime
    updated_at: datetime
    satisfied: bool = False
    missing: tuple[Requirement, ...] = ()
    account: Account | None = None
    documents: tuple[Document, ...] = ()
    signatures: tuple[Signature, ...] = ()
    history: tuple[HistoryEntry, ...] = field(default_factory=tuple)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def new_id(prefix: str) -> str:
    """The id of a new record: `<prefix>_<32 hex digits>`."""
    return f"{prefix}_{ids.new_id().hex}"
