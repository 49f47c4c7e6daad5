"""Registrations, their pending accounts, state history, documents,
verifications and signatures, and the workflow's step markers: their statements."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.platform.idempotency import StepMarkers, once
from domain.registration.store.rows import js
from domain.registration.types import (
    Account,
    Document,
    HistoryEntry,
    Registration,
    Signature,
    Verification,
)

# Effects of workflow activities, keyed by workflow id + step.
ACTIVITY_EFFECTS = StepMarkers("registration.activity_effects", ("key",), fixed={"result": "'{}'::jsonb"})

# ------------------------------------------------------------------ registrations

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


async def database_now(session: AsyncSession) -> datetime:
    """The transaction's time on the database clock."""
    now: datetime = (await session.execute(text("SELECT now()"))).scalar_one()
    return now


async def insert_registration(
    session: AsyncSession,
    registration_id: str,
    *,
    channel: str,
    form_id: str,
    form_version: int,
    answers: Mapping[str, Any],
    address: Mapping[str, str],
    invitation_code: str,
    customer_group: str,
    requirements: Mapping[str, Any],
    submitted_by: str,
    expires_at: datetime,
) -> None:
    """A new registration in state `submitted`."""
    await session.execute(
        text(
            "INSERT INTO registration.registrations (id, channel, form_id, form_version, state, answers, address, "
            "invitation_code, customer_group, requirements, submitted_by, expires_at) VALUES (:id, :ch, :form, "
            ":ver, 'submitted', CAST(:answers AS jsonb), CAST(:addr AS jsonb), :code, :group, CAST(:req AS jsonb), "
            ":by, :exp)"
        ),
        {
            "id": registration_id,
            "ch": channel,
            "form": form_id,
            "ver": form_version,
            "answers": json.dumps(answers),
            "addr": json.dumps(address),
            "code": invitation_code,
            "group": customer_group,
            "req": json.dumps(requirements),
            "by": submitted_by,
            "exp": expires_at,
        },
    )


async def find_registration(
    session: AsyncSession, registration_id: str, channel: str | None, *, for_update: bool = False
) -> Registration | None:
    """The registration (in `channel` unless None), locked for update when asked."""
    where = "id = :id" + (" AND channel = :ch" if channel is not None else "")
    lock = " FOR UPDATE" if for_update else ""
    row = (
        await session.execute(
            text(f"SELECT {_REG_COLUMNS} FROM registration.registrations WHERE {where}{lock}"),
            {"id": registration_id, "ch": channel},
        )
    ).one_or_none()
    return None if row is None else _registration(row)


async def newest_registrations(
    session: AsyncSession,
    *,
    channel: str,
    states: Sequence[str],
    form_id: str,
    before: tuple[datetime, str] | None,
    limit: int,
) -> tuple[list[Registration], bool]:
    """Up to `limit` of a channel's registrations, newest first, created before
    `before` (created_at, id); and whether more follow."""
    where = "channel = :ch"
    params: dict[str, Any] = {"ch": channel, "n": limit + 1}
    if states:
        where += " AND state = ANY(:states)"
        params["states"] = list(states)
    if form_id:
        where += " AND form_id = :form"
        params["form"] = form_id
    if before is not None:
        where += " AND (created_at, id) < (CAST(:at AS timestamptz), :aid)"
        params |= {"at": before[0], "aid": before[1]}
    rows = (
        await session.execute(
            text(
                f"SELECT {_REG_COLUMNS} FROM registration.registrations WHERE {where} "
                "ORDER BY created_at DESC, id DESC LIMIT :n"
            ),
            params,
        )
    ).all()
    return [_registration(r) for r in rows[:limit]], len(rows) > limit


async def move_state(
    session: AsyncSession, registration_id: str, to_state: str, from_states: Sequence[str]
) -> bool:
    """One conditional state change; False when the state had already moved on."""
    moved = (
        await session.execute(
            text(
                "UPDATE registration.registrations SET state = :to, updated_at = now() "
                "WHERE id = :id AND state = ANY(:from) RETURNING id"
            ),
            {"to": to_state, "id": registration_id, "from": list(from_states)},
        )
    ).scalar_one_or_none()
    return moved is not None


async def record_decision(
    session: AsyncSession, registration_id: str, *, decision: str, note: str, reviewer: str
) -> None:
    await session.execute(
        text(
            "UPDATE registration.registrations SET decision = :d, decision_note = :n, reviewer = :r, "
            "updated_at = now() WHERE id = :id"
        ),
        {"d": decision, "n": note, "r": reviewer, "id": registration_id},
    )


async def stranded(
    session: AsyncSession, older_than_seconds: float, limit: int
) -> list[tuple[str, datetime]]:
    """Registrations still `submitted` a while after their last change: (id, expires_at)."""
    rows = await session.execute(
        text(
            """
            SELECT id, expires_at FROM registration.registrations
            WHERE state = 'submitted' AND updated_at < now() - make_interval(secs => :secs)
            ORDER BY updated_at LIMIT :limit
            """
        ),
        {"secs": older_than_seconds, "limit": limit},
    )
    return [(r[0], r[1]) for r in rows.all()]


# ------------------------------------------------------------------ history


async def append_history(
    session: AsyncSession, registration_id: str, from_state: str, to_state: str, actor: str, note: str
) -> None:
    await session.execute(
        text(
            "INSERT INTO registration.history (registration_id, from_state, to_state, actor, note) "
            "VALUES (:r, :f, :t, :a, :n)"
        ),
        {"r": registration_id, "f": from_state, "t": to_state, "a": actor, "n": note},
    )


async def history_of(session: AsyncSession, registration_id: str) -> list[HistoryEntry]:
    rows = (
        await session.execute(
            text(
                "SELECT from_state, to_state, actor, note, at FROM registration.history "
                "WHERE registration_id = :r ORDER BY id"
            ),
            {"r": registration_id},
        )
    ).all()
    return [HistoryEntry(*h) for h in rows]


# ------------------------------------------------------------------ accounts


async def insert_account(
    session: AsyncSession,
    account_id: str,
    *,
    channel: str,
    registration_id: str,
    company_name: str,
    email: str,
    customer_group: str,
    address: Mapping[str, str],
    attributes: Mapping[str, str],
) -> None:
    """A pending account; nothing when the registration has one (one per registration)."""
    await session.execute(
        text(
            "INSERT INTO registration.accounts (id, channel, registration_id, status, company_name, email, "
            "customer_group, address, attributes) VALUES (:id, :ch, :reg, 'pending', :company, :email, :group, "
            "CAST(:addr AS jsonb), CAST(:attrs AS jsonb)) ON CONFLICT (registration_id) DO NOTHING"
        ),
        {
            "id": account_id,
            "ch": channel,
            "reg": registration_id,
            "company": company_name,
            "email": email,
            "group": customer_group,
            "addr": json.dumps(address),
            "attrs": json.dumps(attributes),
        },
    )


async def account_of(session: AsyncSession, registration_id: str) -> Account | None:
    row = (
        await session.execute(
            text(
                "SELECT id, status, company_name, email, customer_group, address, attributes, created_at, updated_at "
                "FROM registration.accounts WHERE registration_id = :r"
            ),
            {"r": registration_id},
        )
    ).one_or_none()
    if row is None:
        return None
    return Account(row[0], row[1], row[2], row[3], row[4], js(row[5]), js(row[6]), row[7], row[8])


async def settle_account(session: AsyncSession, registration_id: str, status: str) -> None:
    """The pending account's final status (active, denied, expired); no change once settled."""
    await session.execute(
        text(
            "UPDATE registration.accounts SET status = :s, updated_at = now() "
            "WHERE registration_id = :r AND status = 'pending'"
        ),
        {"s": status, "r": registration_id},
    )


# ------------------------------------------------------------------ documents and verifications

_DOC_COLUMNS = (
    "d.id, d.registration_id, d.document_type_code, d.filename, d.content_type, d.size_bytes, d.sha256, "
    "d.storage_key, d.number, d.issuing_authority, coalesce(to_char(d.expiration_date, 'YYYY-MM-DD'), ''), "
    "d.created_at, v.status, v.ocr_strategy, v.verification_strategy, v.confidence_bps, v.extracted, v.note, "
    "v.updated_at"
)
_DOC_FROM = "registration.documents d LEFT JOIN registration.verifications v ON v.document_id = d.id"


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


async def documents_of(session: AsyncSession, registration_id: str) -> list[Document]:
    rows = (
        await session.execute(
            text(
                f"SELECT {_DOC_COLUMNS} FROM {_DOC_FROM} WHERE d.registration_id = :r ORDER BY d.created_at, d.id"
            ),
            {"r": registration_id},
        )
    ).all()
    return [_document(r) for r in rows]


async def find_document(session: AsyncSession, document_id: str) -> Document | None:
    row = (
        await session.execute(
            text(f"SELECT {_DOC_COLUMNS} FROM {_DOC_FROM} WHERE d.id = :id"), {"id": document_id}
        )
    ).one_or_none()
    return None if row is None else _document(row)


async def insert_document(
    session: AsyncSession,
    document_id: str,
    *,
    registration_id: str,
    document_type_code: str,
    filename: str,
    content_type: str,
    size_bytes: int,
    sha256: str,
    storage_key: str,
    number: str,
    issuing_authority: str,
    expiration_date: date | None,
) -> None:
    """The document, with its verification pending."""
    await session.execute(
        text(
            "INSERT INTO registration.documents (id, registration_id, document_type_code, filename, content_type, "
            "size_bytes, sha256, storage_key, number, issuing_authority, expiration_date) VALUES (:id, :r, :t, :f, "
            ":ct, :n, :h, :k, :num, :auth, :exp)"
        ),
        {
            "id": document_id,
            "r": registration_id,
            "t": document_type_code,
            "f": filename,
            "ct": content_type,
            "n": size_bytes,
            "h": sha256,
            "k": storage_key,
            "num": number,
            "auth": issuing_authority,
            "exp": expiration_date,
        },
    )
    await session.execute(
        text("INSERT INTO registration.verifications (document_id, status) VALUES (:d, 'pending')"),
        {"d": document_id},
    )


async def upsert_verification(
    session: AsyncSession,
    document_id: str,
    *,
    status: str,
    ocr_strategy: str,
    verification_strategy: str,
    confidence_bps: int,
    extracted: Mapping[str, str],
    note: str,
) -> None:
    """The document's verification result; writing the same result twice leaves one row with it."""
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
            "c": confidence_bps,
            "e": json.dumps(dict(extracted)),
            "n": note,
        },
    )


async def insert_blob(session: AsyncSession, key: str, content: bytes, sha256: str) -> None:
    """A document's content (PostgresDocumentStorage); nothing when the key is stored."""
    await session.execute(
        text(
            "INSERT INTO registration.document_blobs (key, content, size_bytes, sha256) "
            "VALUES (:k, :c, :n, :h) ON CONFLICT (key) DO NOTHING"
        ),
        {"k": key, "c": content, "n": len(content), "h": sha256},
    )


async def find_blob(session: AsyncSession, key: str) -> bytes | None:
    content = (
        await session.execute(
            text("SELECT content FROM registration.document_blobs WHERE key = :k"), {"k": key}
        )
    ).scalar_one_or_none()
    return None if content is None else bytes(content)


async def delete_blob(session: AsyncSession, key: str) -> None:
    await session.execute(text("DELETE FROM registration.document_blobs WHERE key = :k"), {"k": key})


async def fulfilled_codes(
    session: AsyncSession, registration_id: str
) -> tuple[frozenset[str], frozenset[str]]:
    """The document types uploaded (and not rejected) and the agreements signed."""
    docs = (
        await session.execute(
            text(
                f"SELECT DISTINCT d.document_type_code FROM {_DOC_FROM} "
                "WHERE d.registration_id = :r AND coalesce(v.status, '') <> 'rejected'"
            ),
            {"r": registration_id},
        )
    ).scalars()
    agreements = (
        await session.execute(
            text("SELECT DISTINCT agreement_code FROM registration.signatures WHERE registration_id = :r"),
            {"r": registration_id},
        )
    ).scalars()
    return frozenset(docs), frozenset(agreements)


# ------------------------------------------------------------------ signatures

_SIG_COLUMNS = (
    "id, registration_id, agreement_code, agreement_version, method, signer_name, signer_email, "
    "ip_address, user_agent, content_sha256, external_reference, provider, signed_at"
)


async def signatures_of(session: AsyncSession, registration_id: str) -> list[Signature]:
    rows = (
        await session.execute(
            text(
                f"SELECT {_SIG_COLUMNS} FROM registration.signatures WHERE registration_id = :r "
                "ORDER BY signed_at, id"
            ),
            {"r": registration_id},
        )
    ).all()
    return [Signature(*s) for s in rows]


async def insert_signature(
    session: AsyncSession,
    signature_id: str,
    *,
    registration_id: str,
    agreement_code: str,
    agreement_version: int,
    method: str,
    signer_name: str,
    signer_email: str,
    ip_address: str,
    user_agent: str,
    content_sha256: str,
    external_reference: str,
    provider: str,
) -> Signature:
    row = (
        await session.execute(
            text(
                "INSERT INTO registration.signatures (id, registration_id, agreement_code, agreement_version, "
                "method, signer_name, signer_email, ip_address, user_agent, content_sha256, external_reference, "
                f"provider) VALUES (:id, :r, :c, :v, :m, :name, :email, :ip, :ua, :h, :ext, :p) RETURNING {_SIG_COLUMNS}"
            ),
            {
                "id": signature_id,
                "r": registration_id,
                "c": agreement_code,
                "v": agreement_version,
                "m": method,
                "name": signer_name,
                "email": signer_email,
                "ip": ip_address,
                "ua": user_agent,
                "h": content_sha256,
                "ext": external_reference,
                "p": provider,
            },
        )
    ).one()
    return Signature(*row)


# ------------------------------------------------------------------ step markers


async def first_time(session: AsyncSession, key: str) -> bool:
    """True the first time the effect `key` (workflow id + step) is claimed (in this transaction)."""
    return await once(session, ACTIVITY_EFFECTS, key)
