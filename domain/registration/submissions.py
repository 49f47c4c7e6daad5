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
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from domain.registration.catalog import (
    Form,
    channel_rules,
    check_form_serves,
    get_agreement,
    get_document_type,
    get_invitation_code,
    redeem_invitation_code,
    resolve_form,
)
from domain.registration.forms import (
    Answer,
    FieldType,
    FormDefinition,
    mapped_values,
    required_uploads,
    validate_answers,
    visible_fields,
)
from domain.registration.rules import (
    Address,
    Evaluation,
    Requirement,
    RequirementGroup,
    Satisfied,
    evaluate,
    parse_requirements,
    requirement_status,
)
from domain.registration.storage import DocumentStorage
from domain.registration.store import registrations as store
from domain.registration.strategies import (
    DocumentFacts,
    ESignatureProvider,
    SignatureRequest,
)
from domain.registration.types import OPEN, STATES, Account, AgreementTemplate, DocumentType, new_id

# The records this module's functions return, under the names callers use.
from domain.registration.types import Document as Document
from domain.registration.types import Registration as Registration
from domain.registration.types import Signature as Signature
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

SIGNATURE_METHODS = ("drawn", "typed", "checkbox", "external")
WORKFLOW_ACTOR = "system:workflow"


def registration_workflow_id(registration_id: str) -> str:
    return f"registration-{registration_id}"


def verification_workflow_id(document_id: str) -> str:
    return f"document-verification-{document_id}"


# ------------------------------------------------------------------ submit


@dataclass(frozen=True)
class _Applicant:
    """A submission's checked answers: those kept, the address rules are
    evaluated against, and the answers grouped by mapping target."""

    answers: dict[str, Answer]
    address: Address
    mapped: dict[str, dict[str, Answer]]


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


def _check_answers(
    form: Form,
    definition: FormDefinition,
    answers: Mapping[str, Answer],
    address: Address,
    invitation_code: str,
) -> _Applicant:
    """The answers against the form; INVALID_ARGUMENT with every violation found."""
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
    return _Applicant(kept, addr, mapped)


def _refuse_if_blocked(evaluation: Evaluation) -> None:
    if evaluation.blocked and evaluation.blocking_rule is not None:
        rule = evaluation.blocking_rule
        raise FailedPrecondition(
            "REGISTRATION_BLOCKED",
            f"registrations from this address are not accepted: {rule.reason}",
            metadata={"rule_id": rule.id, "reason": rule.reason},
            precondition_violations=[PreconditionViolation("GEO_RULE", f"rules/{rule.id}", rule.reason)],
        )


def _requirements(
    definition: FormDefinition, answers: Mapping[str, Answer], evaluation: Evaluation
) -> RequirementGroup:
    """The rules' requirements and the documents and agreements the form itself demands."""
    docs, agreements = required_uploads(definition, answers)
    implicit = RequirementGroup(
        requirements=tuple(Requirement("document", d) for d in docs)
        + tuple(Requirement("agreement", a) for a in agreements)
    )
    groups = tuple(g for g in (*evaluation.requirements.groups, implicit) if not g.is_empty())
    return RequirementGroup(groups=groups)


async def submit(
    session: AsyncSession,
    *,
    channel: str,
    caller: Caller,
    form_ref: str,
    answers: Mapping[str, Answer],
    address: Address,
    invitation_code: str,
    commerce_mode: str = "",
) -> Registration:
    """`commerce_mode` ("b2b" or "b2c"; "" = not checked): the mode the applicant registers in."""
    form = await resolve_form(session, channel=channel, ref=form_ref)
    if not form.active:
        raise FailedPrecondition("FORM_INACTIVE", f"form {form.slug!r} does not accept submissions")
    if commerce_mode:
        check_form_serves(form, commerce_mode)
    definition = form.definition()
    applicant = _check_answers(form, definition, answers, address, invitation_code)
    evaluation = evaluate(await channel_rules(session, channel), applicant.address, form.id)
    _refuse_if_blocked(evaluation)
    customer_group = form.customer_group
    if invitation_code:
        # Read now for the customer group; the use is taken at the end (below), so
        # the code's row lock is held only for the last statements of the transaction.
        ic = await get_invitation_code(session, channel=channel, code=invitation_code)
        customer_group = ic.customer_group or customer_group

    reg_id = new_id("reg")
    await store.insert_registration(
        session,
        reg_id,
        channel=channel,
        form_id=form.id,
        form_version=form.version,
        answers=applicant.answers,
        address=applicant.address.as_dict(),
        invitation_code=invitation_code,
        customer_group=customer_group,
        requirements=_requirements(definition, applicant.answers, evaluation).as_dict(),
        submitted_by=caller.subject,
        expires_at=await store.database_now(session) + timedelta(seconds=form.expire_after_seconds),
    )
    await store.append_history(session, reg_id, "", "submitted", caller.subject, "")
    await _create_account(session, reg_id, channel, customer_group, applicant.address, applicant.mapped)
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
        await redeem_invitation_code(
            session, channel=channel, code=invitation_code, form_id=form.id, registration_id=reg_id
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
    await store.insert_account(
        session,
        new_id("acc"),
        channel=channel,
        registration_id=reg_id,
        company_name=company,
        email=email,
        customer_group=customer_group,
        address=addr.as_dict(),
        attributes=attributes,
    )


async def _transition(
    session: AsyncSession, reg: Registration, to_state: str, actor: str, note: str, from_states: Sequence[str]
) -> bool:
    """Conditional state change + history + outbox. False when the state had already moved on."""
    if not await store.move_state(session, reg.id, to_state, from_states):
        return False
    await store.append_history(session, reg.id, reg.state, to_state, actor, note)
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


def _not_found(registration_id: str) -> NotFound:
    return NotFound(
        "REGISTRATION_NOT_FOUND",
        f"registration {registration_id!r} does not exist",
        metadata={"registration_id": registration_id},
    )


async def _lock(session: AsyncSession, registration_id: str, channel: str | None) -> Registration:
    reg = await store.find_registration(session, registration_id, channel, for_update=True)
    if reg is None:
        raise _not_found(registration_id)
    return reg


async def _status(session: AsyncSession, reg: Registration) -> tuple[bool, list[Requirement]]:
    group = parse_requirements(reg.requirements, "requirements", Violations())
    docs, agreements = await store.fulfilled_codes(session, reg.id)
    fields = {k for k, v in reg.answers.items() if v not in ("", [], False, None)}
    return requirement_status(group, Satisfied(docs, agreements, frozenset(fields)))


async def _summary(session: AsyncSession, reg: Registration) -> Registration:
    """The registration with its requirement status and account."""
    ok, missing = await _status(session, reg)
    return replace(reg, satisfied=ok, missing=tuple(missing), account=await store.account_of(session, reg.id))


async def get_registration(
    session: AsyncSession, *, channel: str | None, registration_id: str, full: bool = True
) -> Registration:
    """The registration with its status and account; `full` adds its documents,
    signatures and history."""
    reg = await store.find_registration(session, registration_id, channel)
    if reg is None:
        raise _not_found(registration_id)
    reg = await _summary(session, reg)
    if not full:
        return reg
    return replace(
        reg,
        documents=tuple(await store.documents_of(session, reg.id)),
        signatures=tuple(await store.signatures_of(session, reg.id)),
        history=tuple(await store.history_of(session, reg.id)),
    )


async def get_document(session: AsyncSession, document_id: str) -> Document:
    doc = await store.find_document(session, document_id)
    if doc is None:
        raise NotFound("DOCUMENT_NOT_FOUND", f"document {document_id!r} does not exist")
    return doc


async def list_registrations(
    session: AsyncSession, *, channel: str, states: Sequence[str], form_id: str, size: int, token: str
) -> tuple[list[Registration], str]:
    n = page_size(size)
    filters = ["registrations", channel, sorted(states), form_id]
    after = decode_token(token, filters)
    bad = [s for s in states if s not in STATES]
    if bad:
        raise InvalidArgument("INVALID_STATE_FILTER", f"unknown state {bad[0]!r}")
    regs, more = await store.newest_registrations(
        session,
        channel=channel,
        states=states,
        form_id=form_id,
        before=None if after is None else (datetime.fromisoformat(after[0]), after[1]),
        limit=n,
    )
    out = [await _summary(session, reg) for reg in regs]
    token_out = encode_token([out[-1].created_at.isoformat(), out[-1].id], filters) if more else ""
    return out, token_out


# ------------------------------------------------------------------ documents and signatures


def _refuse_if_closed(reg: Registration) -> None:
    if reg.terminal:
        raise FailedPrecondition(
            "REGISTRATION_CLOSED",
            f"registration is {reg.state}",
            metadata={"registration_id": reg.id},
        )


async def check_upload_target(session: AsyncSession, *, channel: str, registration_id: str) -> None:
    _refuse_if_closed(
        await get_registration(session, channel=channel, registration_id=registration_id, full=False)
    )


def _check_document_header(
    dt: DocumentType, number: str, issuing_authority: str, expiration_date: str
) -> date | None:
    """The header the document type demands (number, issuing authority, expiration
    date); the expiration date parsed."""
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
    return expiry


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
    _refuse_if_closed(await _lock(session, registration_id, channel))
    dt = await get_document_type(session, document_type_code)
    expiry = _check_document_header(dt, number, issuing_authority, expiration_date)
    doc_id = new_id("doc")
    key = f"registration/{registration_id}/{doc_id}"
    await storage.put(session, key, content, sha256)
    await store.insert_document(
        session,
        doc_id,
        registration_id=registration_id,
        document_type_code=document_type_code,
        filename=filename,
        content_type=content_type,
        size_bytes=len(content),
        sha256=sha256,
        storage_key=key,
        number=number,
        issuing_authority=issuing_authority,
        expiration_date=expiry,
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


def _check_signature(method: str, signer_name: str, signature: bytes) -> None:
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


def _check_signable(agreement: AgreementTemplate, asked_version: int, method: str) -> None:
    """The version signed must be the current one; a checkbox does not sign an
    agreement that needs a signature."""
    code = agreement.code
    if asked_version and asked_version != agreement.version:
        raise FailedPrecondition(
            "AGREEMENT_VERSION_OUTDATED",
            f"version {asked_version} is not the current version ({agreement.version}) of {code!r}",
            metadata={"agreement_code": code, "current_version": str(agreement.version)},
        )
    if method == "checkbox" and agreement.signature_required:
        raise FailedPrecondition(
            "SIGNATURE_REQUIRED",
            f"{code!r} needs a signature; a checkbox acceptance is not enough",
            metadata={"agreement_code": code},
        )


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
    _refuse_if_closed(await _lock(session, registration_id, channel))
    agreement = await get_agreement(session, agreement_code)
    _check_signature(method, signer_name, signature)
    _check_signable(agreement, agreement_version, method)
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
    signed = await store.insert_signature(
        session,
        new_id("sig"),
        registration_id=registration_id,
        agreement_code=agreement_code,
        agreement_version=agreement.version,
        method=method,
        signer_name=signer_name.strip(),
        signer_email=signer_email,
        ip_address=ip_address,
        user_agent=user_agent[:512],
        content_sha256=digest,
        external_reference=evidence.external_reference,
        provider=evidence.provider,
    )
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
    return signed


# ------------------------------------------------------------------ review


async def _check_reviewable(session: AsyncSession, reg: Registration, decision: str) -> None:
    """Open, undecided, and (for an approval) with every requirement met."""
    meta = {"registration_id": reg.id, "state": reg.state}
    if reg.terminal:
        raise FailedPrecondition("REGISTRATION_CLOSED", f"registration is already {reg.state}", metadata=meta)
    if reg.decision:
        raise FailedPrecondition(
            "DECISION_ALREADY_RECORDED", f"a decision ({reg.decision}) is already recorded", metadata=meta
        )
    if decision != "approve":
        return
    ok, missing = await _status(session, reg)
    if not ok:
        raise FailedPrecondition(
            "REQUIREMENTS_NOT_MET",
            "the registration cannot be approved before its requirements are met",
            metadata=meta,
            precondition_violations=[
                PreconditionViolation("REQUIREMENT", f"{m.kind}/{m.code}", f"{m.kind} {m.code!r} is missing")
                for m in missing
            ],
        )


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
    await _check_reviewable(session, await _lock(session, registration_id, channel), decision)
    await store.record_decision(
        session, registration_id, decision=decision, note=note, reviewer=caller.subject
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


async def notify(session: AsyncSession, registration_id: str, key: str, topic: str) -> bool:
    """Emit a notification event exactly once per key (workflow id + step)."""
    if not await store.first_time(session, key):
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
    await store.settle_account(session, reg.id, status)
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
    await store.upsert_verification(
        session,
        document_id,
        status=status,
        ocr_strategy=ocr_strategy,
        verification_strategy=verification_strategy,
        confidence_bps=max(0, min(10000, confidence_bps)),
        extracted=extracted,
        note=note,
    )
    return await get_document(session, document_id)
