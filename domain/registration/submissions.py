"""Registrations: submit, documents, signatures, review, and the lifecycle
steps the RegistrationWorkflow drives.

States: submitted -> documents_pending | in_review -> approved | denied |
expired. Every state change is one conditional UPDATE (on the state it
leaves), a history row and an outbox event in the same transaction, so a
retried workflow activity never applies a step twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.registration.catalog import (
    channel_rules,
    get_agreement,
    get_document_type,
    get_invitation_code,
    js,
    new_id,
    redeem_invitation_code,
    resolve_form,
)
from domain.registration.forms import (
    Answer,
    FieldType,
    mapped_values,
    required_uploads,
    validate_answers,
    visible_fields,
)
from domain.registration.rules import (
    Address,
    Requirement,
    RequirementGroup,
    Satisfied,
    evaluate,
    parse_requirements,
    requirement_status,
)
from domain.registration.storage import DocumentStorage
from domain.registration.strategies import (
    DocumentFacts,
    ESignatureProvider,
    SignatureRequest,
)
from domain.shared.caller import Caller
from domain.shared.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    Violations,
)
from domain.shared.outbox import Event, emit
from domain.shared.pagination import decode_token, encode_token, page_size

STATES = ("submitted", "documents_pending", "in_review", "approved", "denied", "expired")
OPEN = ("submitted", "documents_pending", "in_review")
TERMINAL = ("approved", "denied", "expired")
SIGNATURE_METHODS = ("drawn", "typed", "checkbox", "external")
WORKFLOW_ACTOR = "system:workflow"


def registration_workflow_id(registration_id: str) -> str:
    return f"registration-{registration_id}"


def verification_workflow_id(document_id: str) -> str:
    return f"document-verification-{document_id}"


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


_REG_COLUMNS = (
    "id, channel, form_id, form_version, state, answers, address, invitation_code, customer_group, "
    "requirements, decision, decision_note, reviewer, expires_at, created_at, updated_at"
)


def _registration(row: Any) -> Registration:
    return Registration(
        row.id,
        row.channel,
        row.form_id,
        row.form_version,
        row.state,
        js(row.answers),
        js(row.address),
        row.invitation_code,
        row.customer_group,
        js(row.requirements),
        row.decision,
        row.decision_note,
        row.reviewer,
        row.expires_at,
        row.created_at,
        row.updated_at,
    )


# ------------------------------------------------------------------ submit


def _address_for(
    explicit: Address,
    answers: Mapping[str, Answer],
    address_fields: Sequence[str],
    mapped: Mapping[str, Answer],
) -> Address:
    if not explicit.is_empty():
        return explicit
    for key in address_fields:
        value = answers.get(key)
        if isinstance(value, dict):
            return Address.from_dict(value)
    parts = {k: v for k, v in mapped.items() if isinstance(v, str)}
    return Address.from_dict(parts)


async def submit(
    session: AsyncSession,
    *,
    channel: str,
    caller: Caller,
    form_ref: str,
    answers: Mapping[str, Answer],
    address: Address,
    invitation_code: str,
) -> Registration:
    form = await resolve_form(session, channel=channel, ref=form_ref)
    if not form.active:
        raise FailedPrecondition("FORM_INACTIVE", f"form {form.slug!r} does not accept submissions")
    definition = form.definition()
    kept, v = validate_answers(definition, answers)
    if form.invitation_required and not invitation_code:
        v.add("invitation_code", "this form requires an invitation code")
    address_keys = [f.key for f in visible_fields(definition, kept) if f.type == FieldType.ADDRESS]
    mapped = mapped_values(definition, kept)
    addr = _address_for(address, kept, address_keys, mapped["address"])
    if not addr.country_code:
        v.add(
            "address.country_code", "an address with a country is required (rules are evaluated against it)"
        )
    v.raise_if_any("the registration is invalid")

    evaluation = evaluate(await channel_rules(session, channel), addr, form.id)
    if evaluation.blocked and evaluation.blocking_rule is not None:
        rule = evaluation.blocking_rule
        raise FailedPrecondition(
            "REGISTRATION_BLOCKED",
            f"registrations from this address are not accepted: {rule.reason}",
            metadata={"rule_id": rule.id, "reason": rule.reason},
            precondition_violations=[PreconditionViolation("GEO_RULE", f"rules/{rule.id}", rule.reason)],
        )

    customer_group = form.customer_group
    if invitation_code:
        # Read now for the customer group; the use is taken at the end (below), so
        # the code's row lock is held only for the last statements of the transaction.
        ic = await get_invitation_code(session, channel=channel, code=invitation_code)
        customer_group = ic.customer_group or customer_group

    docs, agreements = required_uploads(definition, kept)
    implicit = RequirementGroup(
        requirements=tuple(Requirement("document", d) for d in docs)
        + tuple(Requirement("agreement", a) for a in agreements)
    )
    groups = tuple(g for g in (*evaluation.requirements.groups, implicit) if not g.is_empty())
    requirements = RequirementGroup(groups=groups)

    reg_id = new_id("reg")
    now = (await session.execute(text("SELECT now()"))).scalar_one()
    expires_at = now + timedelta(seconds=form.expire_after_seconds)
    await session.execute(
        text(
            "INSERT INTO registration.registrations (id, channel, form_id, form_version, state, answers, address, "
            "invitation_code, customer_group, requirements, submitted_by, expires_at) VALUES (:id, :ch, :form, "
            ":ver, 'submitted', CAST(:answers AS jsonb), CAST(:addr AS jsonb), :code, :group, CAST(:req AS jsonb), "
            ":by, :exp)"
        ),
        {
            "id": reg_id,
            "ch": channel,
            "form": form.id,
            "ver": form.version,
            "answers": json.dumps(kept),
            "addr": json.dumps(addr.as_dict()),
            "code": invitation_code,
            "group": customer_group,
            "req": json.dumps(requirements.as_dict()),
            "by": caller.subject,
            "exp": expires_at,
        },
    )
    await _history(session, reg_id, "", "submitted", caller.subject, "")
    await _create_account(session, reg_id, channel, customer_group, addr, mapped)
    await emit(
        session,
        Event(
            "registration.submitted",
            "registration",
            reg_id,
            {"form_id": form.id, "form_version": form.version, "customer_group": customer_group},
            channel,
        ),
    )
    registration = await get_registration(session, channel=channel, registration_id=reg_id)
    if invitation_code:
        # Last: one conditional UPDATE takes the use (see redeem_invitation_code).
        await redeem_invitation_code(session, channel=channel, code=invitation_code, form_id=form.id)
        await session.execute(
            text(
                "INSERT INTO registration.invitation_redemptions (channel, code, registration_id) "
                "VALUES (:ch, :c, :r)"
            ),
            {"ch": channel, "c": invitation_code, "r": reg_id},
        )
    return registration


def _text(value: Answer) -> str:
    return value if isinstance(value, str) else json.dumps(value)


async def _create_account(
    session: AsyncSession,
    reg_id: str,
    channel: str,
    customer_group: str,
    addr: Address,
    mapped: Mapping[str, Mapping[str, Answer]],
) -> None:
    account = dict(mapped["account"])
    company = _text(account.pop("company_name", ""))
    email = _text(account.pop("email", ""))
    attributes = {k: _text(v) for k, v in {**account, **mapped["meta"]}.items()}
    # ON CONFLICT: the account is one per registration, whoever creates it first.
    await session.execute(
        text(
            "INSERT INTO registration.accounts (id, channel, registration_id, status, company_name, email, "
            "customer_group, address, attributes) VALUES (:id, :ch, :reg, 'pending', :company, :email, :group, "
            "CAST(:addr AS jsonb), CAST(:attrs AS jsonb)) ON CONFLICT (registration_id) DO NOTHING"
        ),
        {
            "id": new_id("acc"),
            "ch": channel,
            "reg": reg_id,
            "company": company,
            "email": email,
            "group": customer_group,
            "addr": json.dumps(addr.as_dict()),
            "attrs": json.dumps(attributes),
        },
    )


async def _history(
    session: AsyncSession, reg_id: str, from_state: str, to_state: str, actor: str, note: str
) -> None:
    await session.execute(
        text(
            "INSERT INTO registration.history (registration_id, from_state, to_state, actor, note) "
            "VALUES (:r, :f, :t, :a, :n)"
        ),
        {"r": reg_id, "f": from_state, "t": to_state, "a": actor, "n": note},
    )


async def _transition(
    session: AsyncSession, reg: Registration, to_state: str, actor: str, note: str, from_states: Sequence[str]
) -> bool:
    """Conditional state change + history + outbox. False when the state had already moved on."""
    old = (
        await session.execute(
            text(
                "UPDATE registration.registrations SET state = :to, updated_at = now() "
                "WHERE id = :id AND state = ANY(:from) RETURNING :prev"
            ),
            {"to": to_state, "id": reg.id, "from": list(from_states), "prev": reg.state},
        )
    ).scalar_one_or_none()
    if old is None:
        return False
    await _history(session, reg.id, reg.state, to_state, actor, note)
    await emit(
        session,
        Event(
            "registration.state_changed",
            "registration",
            reg.id,
            {"from": reg.state, "to": to_state, "actor": actor},
            reg.channel,
        ),
    )
    return True


# ------------------------------------------------------------------ reads


async def _lock(session: AsyncSession, registration_id: str, channel: str | None) -> Registration:
    where = "id = :id" + (" AND channel = :ch" if channel is not None else "")
    row = (
        await session.execute(
            text(f"SELECT {_REG_COLUMNS} FROM registration.registrations WHERE {where} FOR UPDATE"),
            {"id": registration_id, "ch": channel},
        )
    ).one_or_none()
    if row is None:
        raise NotFound(
            "REGISTRATION_NOT_FOUND",
            f"registration {registration_id!r} does not exist",
            metadata={"registration_id": registration_id},
        )
    return _registration(row)


async def _satisfied(session: AsyncSession, reg: Registration) -> Satisfied:
    docs = (
        await session.execute(
            text(
                "SELECT DISTINCT d.document_type_code FROM registration.documents d "
                "LEFT JOIN registration.verifications v ON v.document_id = d.id "
                "WHERE d.registration_id = :r AND coalesce(v.status, '') <> 'rejected'"
            ),
            {"r": reg.id},
        )
    ).scalars()
    agreements = (
        await session.execute(
            text("SELECT DISTINCT agreement_code FROM registration.signatures WHERE registration_id = :r"),
            {"r": reg.id},
        )
    ).scalars()
    fields = {k for k, v in reg.answers.items() if v not in ("", [], False, None)}
    return Satisfied(frozenset(docs), frozenset(agreements), frozenset(fields))


async def _status(session: AsyncSession, reg: Registration) -> tuple[bool, list[Requirement]]:
    group = parse_requirements(reg.requirements, "requirements", Violations())
    return requirement_status(group, await _satisfied(session, reg))


async def get_registration(
    session: AsyncSession, *, channel: str | None, registration_id: str, full: bool = True
) -> Registration:
    where = "id = :id" + (" AND channel = :ch" if channel is not None else "")
    row = (
        await session.execute(
            text(f"SELECT {_REG_COLUMNS} FROM registration.registrations WHERE {where}"),
            {"id": registration_id, "ch": channel},
        )
    ).one_or_none()
    if row is None:
        raise NotFound(
            "REGISTRATION_NOT_FOUND",
            f"registration {registration_id!r} does not exist",
            metadata={"registration_id": registration_id},
        )
    reg = _registration(row)
    ok, missing = await _status(session, reg)
    account = await _account(session, reg.id)
    if not full:
        return _with(reg, satisfied=ok, missing=tuple(missing), account=account)
    docs = await _documents(session, reg.id)
    sigs = (
        await session.execute(
            text(
                "SELECT id, registration_id, agreement_code, agreement_version, method, signer_name, signer_email, "
                "ip_address, user_agent, content_sha256, external_reference, provider, signed_at "
                "FROM registration.signatures WHERE registration_id = :r ORDER BY signed_at, id"
            ),
            {"r": reg.id},
        )
    ).all()
    hist = (
        await session.execute(
            text(
                "SELECT from_state, to_state, actor, note, at FROM registration.history "
                "WHERE registration_id = :r ORDER BY id"
            ),
            {"r": reg.id},
        )
    ).all()
    return _with(
        reg,
        satisfied=ok,
        missing=tuple(missing),
        account=account,
        documents=tuple(docs),
        signatures=tuple(Signature(*s) for s in sigs),
        history=tuple(HistoryEntry(*h) for h in hist),
    )


def _with(reg: Registration, **changes: Any) -> Registration:
    return replace(reg, **changes)


async def _account(session: AsyncSession, reg_id: str) -> Account | None:
    row = (
        await session.execute(
            text(
                "SELECT id, status, company_name, email, customer_group, address, attributes, created_at, updated_at "
                "FROM registration.accounts WHERE registration_id = :r"
            ),
            {"r": reg_id},
        )
    ).one_or_none()
    if row is None:
        return None
    return Account(row[0], row[1], row[2], row[3], row[4], js(row[5]), js(row[6]), row[7], row[8])


_DOC_COLUMNS = (
    "d.id, d.registration_id, d.document_type_code, d.filename, d.content_type, d.size_bytes, d.sha256, "
    "d.storage_key, d.number, d.issuing_authority, coalesce(to_char(d.expiration_date, 'YYYY-MM-DD'), ''), "
    "d.created_at, v.status, v.ocr_strategy, v.verification_strategy, v.confidence_bps, v.extracted, v.note, "
    "v.updated_at"
)


def _document(row: Any) -> Document:
    ver = None
    if row[12] is not None:
        ver = Verification(row[12], row[13], row[14], row[15], js(row[16]), row[17], row[18])
    return Document(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        int(row[5]),
        row[6],
        row[7],
        row[8],
        row[9],
        row[10],
        row[11],
        ver,
    )


async def _documents(session: AsyncSession, reg_id: str) -> list[Document]:
    rows = (
        await session.execute(
            text(
                f"SELECT {_DOC_COLUMNS} FROM registration.documents d "
                "LEFT JOIN registration.verifications v ON v.document_id = d.id "
                "WHERE d.registration_id = :r ORDER BY d.created_at, d.id"
            ),
            {"r": reg_id},
        )
    ).all()
    return [_document(r) for r in rows]


async def get_document(session: AsyncSession, document_id: str) -> Document:
    row = (
        await session.execute(
            text(
                f"SELECT {_DOC_COLUMNS} FROM registration.documents d "
                "LEFT JOIN registration.verifications v ON v.document_id = d.id WHERE d.id = :id"
            ),
            {"id": document_id},
        )
    ).one_or_none()
    if row is None:
        raise NotFound("DOCUMENT_NOT_FOUND", f"document {document_id!r} does not exist")
    return _document(row)


async def list_registrations(
    session: AsyncSession, *, channel: str, states: Sequence[str], form_id: str, size: int, token: str
) -> tuple[list[Registration], str]:
    n = page_size(size)
    filters = ["registrations", channel, sorted(states), form_id]
    after = decode_token(token, filters)
    bad = [s for s in states if s not in STATES]
    if bad:
        raise InvalidArgument("INVALID_STATE_FILTER", f"unknown state {bad[0]!r}")
    where = "channel = :ch"
    params: dict[str, Any] = {"ch": channel, "n": n + 1}
    if states:
        where += " AND state = ANY(:states)"
        params["states"] = list(states)
    if form_id:
        where += " AND form_id = :form"
        params["form"] = form_id
    if after is not None:
        where += " AND (created_at, id) < (CAST(:at AS timestamptz), :aid)"
        params |= {"at": datetime.fromisoformat(after[0]), "aid": after[1]}
    rows = (
        await session.execute(
            text(
                f"SELECT {_REG_COLUMNS} FROM registration.registrations WHERE {where} "
                "ORDER BY created_at DESC, id DESC LIMIT :n"
            ),
            params,
        )
    ).all()
    out = []
    for row in rows[:n]:
        reg = _registration(row)
        ok, missing = await _status(session, reg)
        out.append(_with(reg, satisfied=ok, missing=tuple(missing), account=await _account(session, reg.id)))
    token_out = encode_token([out[-1].created_at.isoformat(), out[-1].id], filters) if len(rows) > n else ""
    return out, token_out


# ------------------------------------------------------------------ documents and signatures


async def check_upload_target(session: AsyncSession, *, channel: str, registration_id: str) -> None:
    reg = await get_registration(session, channel=channel, registration_id=registration_id, full=False)
    if reg.terminal:
        raise FailedPrecondition(
            "REGISTRATION_CLOSED",
            f"registration is {reg.state}",
            metadata={"registration_id": registration_id},
        )


async def store_document(
    session: AsyncSession,
    storage: DocumentStorage,
    *,
    channel: str,
    registration_id: str,
    document_type_code: str,
    filename: str,
    content_type: str,
    content: bytes,
    sha256: str,
    number: str,
    issuing_authority: str,
    expiration_date: str,
) -> Document:
    reg = await _lock(session, registration_id, channel)
    if reg.terminal:
        raise FailedPrecondition(
            "REGISTRATION_CLOSED",
            f"registration is {reg.state}",
            metadata={"registration_id": registration_id},
        )
    dt = await get_document_type(session, document_type_code)
    v = Violations()
    if dt.requires_number and not number.strip():
        v.add("header.number", "this document type needs its number")
    if dt.requires_issuing_authority and not issuing_authority.strip():
        v.add("header.issuing_authority", "this document type needs its issuing authority")
    expiry: date | None = None
    if expiration_date:
        try:
            expiry = date.fromisoformat(expiration_date)
        except ValueError:
            v.add("header.expiration_date", "must be a date YYYY-MM-DD")
    elif dt.requires_expiration_date:
        v.add("header.expiration_date", "this document type needs its expiration date")
    v.raise_if_any("the document is invalid")
    doc_id = new_id("doc")
    key = f"registration/{registration_id}/{doc_id}"
    await storage.put(session, key, content, sha256)
    await session.execute(
        text(
            "INSERT INTO registration.documents (id, registration_id, document_type_code, filename, content_type, "
            "size_bytes, sha256, storage_key, number, issuing_authority, expiration_date) VALUES (:id, :r, :t, :f, "
            ":ct, :n, :h, :k, :num, :auth, :exp)"
        ),
        {
            "id": doc_id,
            "r": registration_id,
            "t": document_type_code,
            "f": filename,
            "ct": content_type,
            "n": len(content),
            "h": sha256,
            "k": key,
            "num": number,
            "auth": issuing_authority,
            "exp": expiry,
        },
    )
    await session.execute(
        text("INSERT INTO registration.verifications (document_id, status) VALUES (:d, 'pending')"),
        {"d": doc_id},
    )
    await emit(
        session,
        Event(
            "registration.document.uploaded",
            "registration",
            registration_id,
            {"document_id": doc_id, "document_type_code": document_type_code, "sha256": sha256},
            channel,
        ),
    )
    return await get_document(session, doc_id)


def signature_digest(
    code: str, version: int, body_sha256: str, method: str, signature: bytes, signer: str
) -> str:
    """SHA-256 binding the exact agreement version to the signature (length-prefixed, so unambiguous)."""
    h = hashlib.sha256()
    for part in (
        code.encode(),
        str(version).encode(),
        body_sha256.encode(),
        method.encode(),
        signer.encode(),
        signature,
    ):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


async def sign_agreement(
    session: AsyncSession,
    provider: ESignatureProvider,
    *,
    channel: str,
    registration_id: str,
    agreement_code: str,
    agreement_version: int,
    method: str,
    signer_name: str,
    signer_email: str,
    signature: bytes,
    external_reference: str,
    ip_address: str,
    user_agent: str,
) -> Signature:
    reg = await _lock(session, registration_id, channel)
    if reg.terminal:
        raise FailedPrecondition(
            "REGISTRATION_CLOSED",
            f"registration is {reg.state}",
            metadata={"registration_id": registration_id},
        )
    agreement = await get_agreement(session, agreement_code)
    v = Violations()
    if method not in SIGNATURE_METHODS:
        v.add("method", "must be DRAWN, TYPED, CHECKBOX or EXTERNAL")
    if not signer_name.strip():
        v.add("signer_name", "is required")
    if method in ("drawn", "typed") and not signature:
        v.add("signature", f"a {method} signature carries the signature")
    if method == "typed":
        try:
            signature.decode("utf-8")
        except UnicodeDecodeError:
            v.add("signature", "a typed signature is UTF-8 text")
    if len(signature) > 1024 * 1024:
        v.add("signature", "must be at most 1 MiB")
    v.raise_if_any("the signature is invalid")
    if agreement_version and agreement_version != agreement.version:
        raise FailedPrecondition(
            "AGREEMENT_VERSION_OUTDATED",
            f"version {agreement_version} is not the current version ({agreement.version}) of {agreement_code!r}",
            metadata={"agreement_code": agreement_code, "current_version": str(agreement.version)},
        )
    if method == "checkbox" and agreement.signature_required:
        raise FailedPrecondition(
            "SIGNATURE_REQUIRED",
            f"{agreement_code!r} needs a signature; a checkbox acceptance is not enough",
            metadata={"agreement_code": agreement_code},
        )
    evidence = await provider.sign(
        SignatureRequest(
            registration_id,
            agreement_code,
            agreement.version,
            method,
            signer_name,
            signer_email,
            signature,
            external_reference,
        )
    )
    digest = signature_digest(
        agreement_code, agreement.version, agreement.body_sha256, method, signature, signer_name.strip()
    )
    sig_id = new_id("sig")
    row = (
        await session.execute(
            text(
                "INSERT INTO registration.signatures (id, registration_id, agreement_code, agreement_version, "
                "method, signer_name, signer_email, ip_address, user_agent, content_sha256, external_reference, "
                "provider) VALUES (:id, :r, :c, :v, :m, :name, :email, :ip, :ua, :h, :ext, :p) RETURNING id, "
                "registration_id, agreement_code, agreement_version, method, signer_name, signer_email, ip_address, "
                "user_agent, content_sha256, external_reference, provider, signed_at"
            ),
            {
                "id": sig_id,
                "r": registration_id,
                "c": agreement_code,
                "v": agreement.version,
                "m": method,
                "name": signer_name.strip(),
                "email": signer_email,
                "ip": ip_address,
                "ua": user_agent[:512],
                "h": digest,
                "ext": evidence.external_reference,
                "p": evidence.provider,
            },
        )
    ).one()
    await emit(
        session,
        Event(
            "registration.agreement.signed",
            "registration",
            registration_id,
            {"agreement_code": agreement_code, "version": agreement.version, "sha256": digest},
            channel,
        ),
    )
    return Signature(*row)


# ------------------------------------------------------------------ review


async def review(
    session: AsyncSession, *, channel: str, caller: Caller, registration_id: str, decision: str, note: str
) -> Registration:
    """Record the decision; the workflow applies it (see apply_decision)."""
    if decision not in ("approve", "deny"):
        raise InvalidArgument(
            "DECISION_REQUIRED",
            "decision must be APPROVE or DENY",
            field_violations=[],
        )
    reg = await _lock(session, registration_id, channel)
    meta = {"registration_id": registration_id, "state": reg.state}
    if reg.terminal:
        raise FailedPrecondition("REGISTRATION_CLOSED", f"registration is already {reg.state}", metadata=meta)
    if reg.decision:
        raise FailedPrecondition(
            "DECISION_ALREADY_RECORDED", f"a decision ({reg.decision}) is already recorded", metadata=meta
        )
    if decision == "approve":
        ok, missing = await _status(session, reg)
        if not ok:
            raise FailedPrecondition(
                "REQUIREMENTS_NOT_MET",
                "the registration cannot be approved before its requirements are met",
                metadata=meta,
                precondition_violations=[
                    PreconditionViolation(
                        "REQUIREMENT", f"{m.kind}/{m.code}", f"{m.kind} {m.code!r} is missing"
                    )
                    for m in missing
                ],
            )
    await session.execute(
        text(
            "UPDATE registration.registrations SET decision = :d, decision_note = :n, reviewer = :r, "
            "updated_at = now() WHERE id = :id"
        ),
        {"d": decision, "n": note, "r": caller.subject, "id": registration_id},
    )
    await emit(
        session,
        Event(
            "registration.reviewed",
            "registration",
            registration_id,
            {"decision": decision, "reviewer": caller.subject},
            channel,
        ),
    )
    return await get_registration(session, channel=channel, registration_id=registration_id)


# ------------------------------------------------------------------ lifecycle steps (workflow activities)


async def advance(session: AsyncSession, registration_id: str) -> Registration:
    """submitted/documents_pending/in_review -> documents_pending or in_review, by the requirements."""
    reg = await _lock(session, registration_id, None)
    if reg.terminal:
        return reg
    ok, _ = await _status(session, reg)
    target = "in_review" if ok else "documents_pending"
    if target != reg.state:
        note = "requirements met" if ok else "waiting for documents or signatures"
        await _transition(session, reg, target, WORKFLOW_ACTOR, note, OPEN)
    return await get_registration(session, channel=None, registration_id=registration_id, full=False)


async def ensure_account(session: AsyncSession, registration_id: str) -> Account:
    """The pending account (created by submit; recreated here only if it is missing)."""
    reg = await get_registration(session, channel=None, registration_id=registration_id, full=False)
    if reg.account is None:
        await _create_account(
            session,
            reg.id,
            reg.channel,
            reg.customer_group,
            Address.from_dict(reg.address),
            {"account": {}, "meta": {}, "address": {}, "document": {}},
        )
        reg = await get_registration(session, channel=None, registration_id=registration_id, full=False)
    assert reg.account is not None
    return reg.account


async def once(session: AsyncSession, key: str) -> bool:
    """Claim an effect key (workflow id + step). False: the effect already happened."""
    claimed = (
        await session.execute(
            text(
                "INSERT INTO registration.activity_effects (key, result) VALUES (:k, '{}'::jsonb) "
                "ON CONFLICT (key) DO NOTHING RETURNING key"
            ),
            {"k": key},
        )
    ).scalar_one_or_none()
    return claimed is not None


async def notify(session: AsyncSession, registration_id: str, key: str, topic: str) -> bool:
    """Emit a notification event exactly once per key."""
    if not await once(session, key):
        return False
    reg = await get_registration(session, channel=None, registration_id=registration_id, full=False)
    payload = {
        "state": reg.state,
        "email": reg.account.email if reg.account else "",
        "missing": [m.as_dict() for m in reg.missing],
    }
    await emit(session, Event(topic, "registration", reg.id, payload, reg.channel))
    return True


async def apply_decision(session: AsyncSession, registration_id: str) -> Registration:
    """Activate or deny the account per the recorded decision (no-op when done or undecided)."""
    reg = await _lock(session, registration_id, None)
    if reg.terminal or not reg.decision:
        return reg
    to_state, account_status = ("approved", "active") if reg.decision == "approve" else ("denied", "denied")
    await _transition(session, reg, to_state, reg.reviewer or WORKFLOW_ACTOR, reg.decision_note, OPEN)
    await _set_account(session, reg, account_status)
    return await get_registration(session, channel=None, registration_id=registration_id, full=False)


async def expire(session: AsyncSession, registration_id: str) -> Registration:
    """The timer ran out. A decision recorded just before wins over the timer."""
    reg = await _lock(session, registration_id, None)
    if reg.terminal:
        return reg
    if reg.decision:
        return await apply_decision(session, registration_id)
    await _transition(session, reg, "expired", WORKFLOW_ACTOR, "no decision before the deadline", OPEN)
    await _set_account(session, reg, "expired")
    return await get_registration(session, channel=None, registration_id=registration_id, full=False)


async def _set_account(session: AsyncSession, reg: Registration, status: str) -> None:
    await session.execute(
        text(
            "UPDATE registration.accounts SET status = :s, updated_at = now() "
            "WHERE registration_id = :r AND status = 'pending'"
        ),
        {"s": status, "r": reg.id},
    )
    await emit(
        session,
        Event("registration.account." + status, "account", reg.id, {"registration_id": reg.id}, reg.channel),
    )


async def document_facts(session: AsyncSession, document_id: str) -> DocumentFacts:
    d = await get_document(session, document_id)
    return DocumentFacts(
        d.id,
        d.document_type_code,
        d.content_type,
        d.size_bytes,
        d.sha256,
        d.number,
        d.issuing_authority,
        d.expiration_date,
    )


async def document_content(session: AsyncSession, storage: DocumentStorage, document_id: str) -> bytes:
    d = await get_document(session, document_id)
    return await storage.get(session, d.storage_key)


async def record_verification(
    session: AsyncSession,
    *,
    document_id: str,
    status: str,
    ocr_strategy: str,
    verification_strategy: str,
    confidence_bps: int,
    extracted: Mapping[str, str],
    note: str,
) -> Document:
    """Idempotent: writing the same result twice leaves one row with that result."""
    await session.execute(
        text(
            "INSERT INTO registration.verifications (document_id, status, ocr_strategy, verification_strategy, "
            "confidence_bps, extracted, note, updated_at) VALUES (:d, :s, :o, :v, :c, CAST(:e AS jsonb), :n, now()) "
            "ON CONFLICT (document_id) DO UPDATE SET status = EXCLUDED.status, ocr_strategy = EXCLUDED.ocr_strategy, "
            "verification_strategy = EXCLUDED.verification_strategy, confidence_bps = EXCLUDED.confidence_bps, "
            "extracted = EXCLUDED.extracted, note = EXCLUDED.note, updated_at = now()"
        ),
        {
            "d": document_id,
            "s": status,
            "o": ocr_strategy,
            "v": verification_strategy,
            "c": max(0, min(10000, confidence_bps)),
            "e": json.dumps(dict(extracted)),
            "n": note,
        },
    )
    return await get_document(session, document_id)
