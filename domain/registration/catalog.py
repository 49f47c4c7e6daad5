"""Forms (versioned), rules, document types, agreement templates and invitation codes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.registration.forms import check_definition, parse_definition
from domain.registration.rules import (
    Address,
    Evaluation,
    Requirement,
    Rule,
    evaluate,
    parse_geo,
    parse_requirements,
)
from domain.registration.store import catalog as store
from domain.registration.types import DOCUMENT_TYPE_FIELDS as DOCUMENT_TYPE_FIELDS
from domain.registration.types import AgreementTemplate as AgreementTemplate
from domain.registration.types import DocumentType as DocumentType
from domain.registration.types import Form as Form
from domain.registration.types import InvitationCode as InvitationCode
from domain.registration.types import RuleRecord as RuleRecord
from domain.registration.types import new_id
from domain.shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Violations
from domain.shared.outbox import Event, emit
from domain.shared.pagination import decode_token, encode_token, page_size

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CODE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
INVITATION = re.compile(r"^[A-Za-z0-9_-]{4,64}$")
MIME = re.compile(r"^[a-z]+/[a-z0-9.+-]+$")
DEFAULT_EXPIRE_AFTER = 30 * 24 * 3600
DEFAULT_CONTENT_TYPES = ("application/pdf", "image/png", "image/jpeg")
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
MAX_SIZE = 50 * 1024 * 1024
RULE_TYPES = ("require", "block", "exempt")


# ------------------------------------------------------------------ forms


FORM_FIELDS = (
    "name",
    "description",
    "customer_group",
    "invitation_required",
    "steps",
    "expire_after",
    "active",
    "commerce_mode",
)
# Who a form serves; a registration is made in one of the first two.
COMMERCE_MODES = ("b2b", "b2c", "both")


def modes_serving(mode: str) -> tuple[str, ...]:
    """The form modes that serve a registration (or a listing) in `mode`."""
    return (mode, "both") if mode in ("b2b", "b2c") else (mode,)


def check_form_serves(form: Form, mode: str) -> None:
    """COMMERCE_MODE_NOT_SERVED when a registration in `mode` may not use `form`."""
    if form.commerce_mode not in modes_serving(mode):
        raise FailedPrecondition(
            "COMMERCE_MODE_NOT_SERVED",
            f"form {form.slug!r} serves {form.commerce_mode}, not {mode}",
            metadata={"form": form.slug, "commerce_mode": mode, "form_commerce_mode": form.commerce_mode},
        )


async def _check_form(
    session: AsyncSession,
    v: Violations,
    name: str,
    steps: Sequence[Mapping[str, Any]],
    expire_after_seconds: int,
) -> None:
    if not name.strip() or len(name) > 200:
        v.add("form.name", "must be 1 to 200 characters")
    if expire_after_seconds < 1:
        v.add("form.expire_after", "must be at least 1 second")
    definition, parse_v = parse_definition(steps)
    v.items.extend(parse_v.items)
    check_definition(definition, v)
    docs = {f.document_type_code for _, _, f in definition.fields() if f.document_type_code}
    agreements = {f.agreement_code for _, _, f in definition.fields() if f.agreement_code}
    await _check_codes_exist(session, v, docs, agreements, "form.steps")


async def _check_codes_exist(
    session: AsyncSession, v: Violations, docs: Collection[str], agreements: Collection[str], path: str
) -> None:
    missing_docs, missing_agreements = await store.unknown_codes(
        session, documents=docs, agreements=agreements
    )
    for code in missing_docs:
        v.add(path, f"document type {code!r} does not exist")
    for code in missing_agreements:
        v.add(path, f"agreement {code!r} does not exist")


async def create_form(
    session: AsyncSession,
    *,
    channel: str,
    slug: str,
    name: str,
    description: str,
    customer_group: str,
    invitation_required: bool,
    steps: Sequence[Mapping[str, Any]],
    expire_after_seconds: int | None,
    active: bool,
    commerce_mode: str = "",
) -> Form:
    v = Violations()
    if not SLUG.match(slug):
        v.add("form.slug", "must match [a-z0-9][a-z0-9-]{0,62}")
    expire = expire_after_seconds or DEFAULT_EXPIRE_AFTER
    await _check_form(session, v, name, steps, expire)
    v.raise_if_any("the form is invalid")
    form_id = new_id("frm")
    if not await store.insert_form(session, form_id, channel=channel, slug=slug, active=active):
        raise AlreadyExists(
            "FORM_EXISTS", f"form {slug!r} already exists in this channel", metadata={"slug": slug}
        )
    await store.insert_form_version(
        session,
        form_id,
        1,
        name=name.strip(),
        description=description,
        customer_group=customer_group,
        invitation_required=invitation_required,
        steps=steps,
        expire_after_seconds=expire,
        commerce_mode=commerce_mode or "both",
    )
    await emit(
        session, Event("registration.form.created", "registration_form", form_id, {"slug": slug}, channel)
    )
    return await get_form(session, channel=channel, form_id=form_id)


async def update_form(
    session: AsyncSession,
    *,
    channel: str,
    form_id: str,
    fields: Collection[str],
    name: str,
    description: str,
    customer_group: str,
    invitation_required: bool,
    steps: Sequence[Mapping[str, Any]],
    expire_after_seconds: int | None,
    active: bool,
    commerce_mode: str = "",
) -> Form:
    """A new current version: the fields in `fields` (every field when empty)
    from the arguments, the others from the current version."""
    paths = set(fields) or set(FORM_FIELDS)
    v = Violations()
    for p in sorted(paths - set(FORM_FIELDS)):
        v.add("update_mask", f"{p!r} cannot be updated (updatable: {', '.join(FORM_FIELDS)})")
    v.raise_if_any("the update is invalid")
    if not await store.lock_form(session, form_id, channel):
        raise NotFound("FORM_NOT_FOUND", f"form {form_id!r} does not exist", metadata={"form_id": form_id})
    cur = await get_form(session, channel=channel, form_id=form_id)
    new_name = name if "name" in paths else cur.name
    new_steps = list(steps) if "steps" in paths else cur.steps
    expire = (
        (expire_after_seconds or DEFAULT_EXPIRE_AFTER)
        if "expire_after" in paths
        else cur.expire_after_seconds
    )
    await _check_form(session, v, new_name, new_steps, expire)
    v.raise_if_any("the form is invalid")
    version = cur.version + 1
    await store.insert_form_version(
        session,
        form_id,
        version,
        name=new_name.strip(),
        description=description if "description" in paths else cur.description,
        customer_group=customer_group if "customer_group" in paths else cur.customer_group,
        invitation_required=invitation_required
        if "invitation_required" in paths
        else cur.invitation_required,
        steps=new_steps,
        expire_after_seconds=expire,
        commerce_mode=commerce_mode if "commerce_mode" in paths and commerce_mode else cur.commerce_mode,
    )
    await store.set_current_version(
        session, form_id, version, active=active if "active" in paths else cur.active
    )
    await emit(
        session,
        Event("registration.form.updated", "registration_form", form_id, {"version": version}, channel),
    )
    return await get_form(session, channel=channel, form_id=form_id)


async def get_form(
    session: AsyncSession, *, channel: str, form_id: str = "", slug: str = "", version: int = 0
) -> Form:
    if not form_id and not slug:
        raise InvalidArgument("FORM_REQUIRED", "give the form's id or slug", metadata={})
    form = await store.find_form(session, channel=channel, form_id=form_id, slug=slug, version=version)
    if form is None:
        ref = form_id or slug
        raise NotFound("FORM_NOT_FOUND", f"form {ref!r} (version {version or 'current'}) does not exist here")
    return form


async def resolve_form(session: AsyncSession, *, channel: str, ref: str) -> Form:
    """A submission names the form by id or slug."""
    if ref.startswith("frm_"):
        return await get_form(session, channel=channel, form_id=ref)
    return await get_form(session, channel=channel, slug=ref)


async def list_forms(
    session: AsyncSession, *, channel: str, size: int, token: str, commerce_mode: str = ""
) -> tuple[list[Form], str]:
    """Current forms by slug; only those serving `commerce_mode` when given."""
    n = page_size(size)
    filters = ["forms", channel] + ([commerce_mode] if commerce_mode else [])
    after = decode_token(token, filters)
    forms, more = await store.forms_after(
        session,
        channel=channel,
        slug=str(after or ""),
        limit=n,
        modes=modes_serving(commerce_mode) if commerce_mode else (),
    )
    return forms, encode_token(forms[-1].slug, filters) if more else ""


# ------------------------------------------------------------------ rules


def _check_rule(
    v: Violations,
    *,
    name: str,
    type: str,
    geo: Mapping[str, Any],
    requirements: Mapping[str, Any],
    reason: str,
) -> list[Requirement]:
    """The rule's own fields; returns the requirement leaves (their codes are checked against the catalog)."""
    if not name.strip() or len(name) > 200:
        v.add("rule.name", "must be 1 to 200 characters")
    if type not in RULE_TYPES:
        v.add("rule.type", "must be REQUIRE, BLOCK or EXEMPT")
    parse_geo(geo, "rule.geo", v)
    parsed_reqs = parse_requirements(requirements, "rule.requirements", v)
    if type == "require" and parsed_reqs.is_empty():
        v.add("rule.requirements", "a REQUIRE rule needs at least one requirement")
    if type != "require" and not parsed_reqs.is_empty():
        v.add("rule.requirements", "only REQUIRE rules carry requirements")
    if type == "block" and not reason.strip():
        v.add("rule.reason", "a BLOCK rule needs a reason the applicant can read")
    return list(parsed_reqs.leaves())


async def create_rule(
    session: AsyncSession,
    *,
    channel: str,
    name: str,
    type: str,
    geo: Mapping[str, Any],
    requirements: Mapping[str, Any],
    reason: str,
    priority: int,
    form_id: str,
    active: bool,
) -> RuleRecord:
    v = Violations()
    leaves = _check_rule(v, name=name, type=type, geo=geo, requirements=requirements, reason=reason)
    await _check_codes_exist(
        session,
        v,
        {r.code for r in leaves if r.kind == "document"},
        {r.code for r in leaves if r.kind == "agreement"},
        "rule.requirements",
    )
    if form_id and not await store.form_exists(session, form_id, channel):
        v.add("rule.form_id", f"form {form_id!r} does not exist in this channel")
    v.raise_if_any("the rule is invalid")
    rule_id = new_id("rul")
    record = await store.insert_rule(
        session,
        rule_id,
        channel=channel,
        name=name.strip(),
        type=type,
        geo=geo,
        requirements=requirements,
        reason=reason,
        priority=priority,
        form_id=form_id,
        active=active,
    )
    await emit(
        session, Event("registration.rule.created", "registration_rule", rule_id, {"type": type}, channel)
    )
    return record


async def list_rules(
    session: AsyncSession, *, channel: str, form_id: str, size: int, token: str
) -> tuple[list[RuleRecord], str]:
    n = page_size(size)
    filters = ["rules", channel, form_id]
    after = decode_token(token, filters)
    recs, more = await store.rules_after(
        session,
        channel=channel,
        form_id=form_id,
        after=None if after is None else (datetime.fromisoformat(after[0]), after[1]),
        limit=n,
    )
    token_out = encode_token([recs[-1].created_at.isoformat(), recs[-1].rule.id], filters) if more else ""
    return recs, token_out


async def channel_rules(session: AsyncSession, channel: str) -> list[Rule]:
    return await store.active_rules(session, channel)


async def evaluate_rules(
    session: AsyncSession, *, channel: str, address: Address, form_id: str
) -> Evaluation:
    return evaluate(await channel_rules(session, channel), address, form_id)


# ------------------------------------------------------------------ document types


def _check_doc_type(v: Violations, values: Mapping[str, Any]) -> None:
    if not str(values["name"]).strip():
        v.add("document_type.name", "is required")
    for i, ct in enumerate(values["allowed_content_types"]):
        if not MIME.match(ct):
            v.add(f"document_type.allowed_content_types[{i}]", f"{ct!r} is not a MIME type")
    if not 1 <= int(values["max_size_bytes"]) <= MAX_SIZE:
        v.add("document_type.max_size_bytes", f"must be 1 to {MAX_SIZE}")


def _document_type_not_found(code: str) -> NotFound:
    return NotFound(
        "DOCUMENT_TYPE_NOT_FOUND", f"document type {code!r} does not exist", metadata={"code": code}
    )


async def create_document_type(
    session: AsyncSession, *, code: str, values: Mapping[str, Any]
) -> DocumentType:
    vals = dict(values)
    vals["allowed_content_types"] = list(vals.get("allowed_content_types") or DEFAULT_CONTENT_TYPES)
    vals["max_size_bytes"] = int(vals.get("max_size_bytes") or DEFAULT_MAX_SIZE)
    v = Violations()
    if not CODE.match(code):
        v.add("document_type.code", "must match [a-z0-9][a-z0-9_-]{0,62}")
    _check_doc_type(v, vals)
    v.raise_if_any("the document type is invalid")
    created = await store.insert_document_type(session, code, vals)
    if created is None:
        raise AlreadyExists(
            "DOCUMENT_TYPE_EXISTS", f"document type {code!r} already exists", metadata={"code": code}
        )
    await emit(session, Event("registration.document_type.created", "document_type", code, {"code": code}))
    return created


async def get_document_type(session: AsyncSession, code: str, *, for_update: bool = False) -> DocumentType:
    found = await store.find_document_type(session, code, for_update=for_update)
    if found is None:
        raise _document_type_not_found(code)
    return found


async def list_document_types(
    session: AsyncSession, *, size: int, token: str
) -> tuple[list[DocumentType], str]:
    n = page_size(size)
    after = decode_token(token, "document_types")
    items, more = await store.document_types_after(session, code=str(after or ""), limit=n)
    return items, encode_token(items[-1].code, "document_types") if more else ""


async def update_document_type(
    session: AsyncSession, *, code: str, fields: Collection[str], values: Mapping[str, Any]
) -> DocumentType:
    paths = set(fields) or set(DOCUMENT_TYPE_FIELDS)
    v = Violations()
    for p in sorted(paths - set(DOCUMENT_TYPE_FIELDS)):
        v.add("update_mask", f"{p!r} cannot be updated")
    v.raise_if_any("the update is invalid")
    cur = await get_document_type(session, code, for_update=True)
    merged = {f: (values[f] if f in paths else getattr(cur, f)) for f in DOCUMENT_TYPE_FIELDS}
    merged["allowed_content_types"] = list(merged["allowed_content_types"] or DEFAULT_CONTENT_TYPES)
    merged["max_size_bytes"] = int(merged["max_size_bytes"] or DEFAULT_MAX_SIZE)
    _check_doc_type(v, merged)
    v.raise_if_any("the document type is invalid")
    updated = await store.update_document_type(session, code, merged)
    await emit(
        session, Event("registration.document_type.updated", "document_type", code, {"fields": sorted(paths)})
    )
    return updated


async def delete_document_type(session: AsyncSession, code: str) -> None:
    await get_document_type(session, code, for_update=True)
    if await store.document_type_in_use(session, code):
        raise FailedPrecondition(
            "DOCUMENT_TYPE_IN_USE",
            f"documents of type {code!r} exist; deactivate it instead",
            metadata={"code": code},
        )
    await store.delete_document_type(session, code)
    await emit(session, Event("registration.document_type.deleted", "document_type", code, {"code": code}))


# ------------------------------------------------------------------ agreements


async def publish_agreement(
    session: AsyncSession, *, code: str, title: str, body: str, signature_required: bool, create: bool
) -> AgreementTemplate:
    """create=True: version 1 (ALREADY_EXISTS if any); False: the next version (NOT_FOUND if none)."""
    v = Violations()
    if not CODE.match(code):
        v.add("agreement.code", "must match [a-z0-9][a-z0-9_-]{0,62}")
    if not title.strip():
        v.add("agreement.title", "is required")
    if not body.strip():
        v.add("agreement.body", "is required")
    v.raise_if_any("the agreement is invalid")
    await store.lock_agreement_code(session, code)
    latest = await store.latest_agreement_version(session, code)
    if create and latest is not None:
        raise AlreadyExists("AGREEMENT_EXISTS", f"agreement {code!r} already exists", metadata={"code": code})
    if not create and latest is None:
        raise NotFound("AGREEMENT_NOT_FOUND", f"agreement {code!r} does not exist", metadata={"code": code})
    version = (latest or 0) + 1
    published = await store.insert_agreement(
        session,
        code=code,
        version=version,
        title=title.strip(),
        body=body,
        body_sha256=hashlib.sha256(body.encode()).hexdigest(),
        signature_required=signature_required,
    )
    await emit(session, Event("registration.agreement.published", "agreement", code, {"version": version}))
    return published


async def get_agreement(session: AsyncSession, code: str, version: int = 0) -> AgreementTemplate:
    found = await store.find_agreement(session, code, version)
    if found is None:
        raise NotFound(
            "AGREEMENT_NOT_FOUND", f"agreement {code!r} (version {version or 'latest'}) does not exist"
        )
    return found


async def list_agreements(
    session: AsyncSession, *, size: int, token: str
) -> tuple[list[AgreementTemplate], str]:
    n = page_size(size)
    after = decode_token(token, "agreements")
    items, more = await store.agreements_after(session, code=str(after or ""), limit=n)
    return items, encode_token(items[-1].code, "agreements") if more else ""


# ------------------------------------------------------------------ invitation codes


async def create_invitation_code(
    session: AsyncSession,
    *,
    channel: str,
    code: str,
    form_id: str,
    customer_group: str,
    max_uses: int,
    expires_at: datetime | None,
    active: bool,
) -> InvitationCode:
    v = Violations()
    if not INVITATION.match(code):
        v.add("invitation_code.code", "must be 4 to 64 of [A-Za-z0-9_-]")
    if max_uses < 1:
        v.add("invitation_code.max_uses", "must be at least 1")
    if form_id and not await store.form_exists(session, form_id, channel):
        v.add("invitation_code.form_id", f"form {form_id!r} does not exist in this channel")
    v.raise_if_any("the invitation code is invalid")
    created = await store.insert_invitation_code(
        session,
        channel=channel,
        code=code,
        form_id=form_id,
        customer_group=customer_group,
        max_uses=max_uses,
        expires_at=expires_at,
        active=active,
    )
    if created is None:
        raise AlreadyExists(
            "INVITATION_CODE_EXISTS", f"invitation code {code!r} already exists", metadata={"code": code}
        )
    await emit(session, Event("registration.invitation_code.created", "invitation_code", code, {}, channel))
    return created


async def get_invitation_code(session: AsyncSession, *, channel: str, code: str) -> InvitationCode:
    found = await store.find_invitation_code(session, channel=channel, code=code)
    if found is None:
        raise NotFound(
            "INVITATION_CODE_NOT_FOUND", f"invitation code {code!r} does not exist", metadata={"code": code}
        )
    return found


async def list_invitation_codes(
    session: AsyncSession, *, channel: str, size: int, token: str
) -> tuple[list[InvitationCode], str]:
    n = page_size(size)
    filters = ["invitation_codes", channel]
    after = decode_token(token, filters)
    items, more = await store.invitation_codes_after(session, channel=channel, code=str(after or ""), limit=n)
    return items, encode_token(items[-1].code, filters) if more else ""


async def redeem_invitation_code(
    session: AsyncSession, *, channel: str, code: str, form_id: str, registration_id: str
) -> InvitationCode:
    """Take one use of the code for a registration, atomically (one conditional
    UPDATE decides, store.take_invitation_use; no read-then-write in Python).
    When no use could be taken, a plain read explains why."""
    taken = await store.take_invitation_use(session, channel=channel, code=code, form_id=form_id)
    if taken is not None:
        await store.record_redemption(session, channel=channel, code=code, registration_id=registration_id)
        return taken
    ic = await get_invitation_code(session, channel=channel, code=code)
    meta = {"code": code}
    if not ic.active:
        raise FailedPrecondition(
            "INVITATION_CODE_INACTIVE", "the invitation code is not active", metadata=meta
        )
    if ic.form_id and ic.form_id != form_id:
        raise FailedPrecondition(
            "INVITATION_CODE_WRONG_FORM", "the invitation code is for another form", metadata=meta
        )
    if ic.uses >= ic.max_uses:
        raise FailedPrecondition(
            "INVITATION_CODE_EXHAUSTED", "the invitation code has been used up", metadata=meta
        )
    raise FailedPrecondition("INVITATION_CODE_EXPIRED", "the invitation code has expired", metadata=meta)
