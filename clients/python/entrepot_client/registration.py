"""Helpers for RegistrationService callers: answers, chunked uploads, waiting on the lifecycle.

async with Entrepot(target, token, channel="web") as ep:
    reg = await ep.registration.submit_registration(
        registration_pb2.SubmitRegistrationRequest(
            form="wholesale", answers=answers(company="Acme", accept_terms=True), request_id=str(uuid4())
        )
    )
    doc = await upload_document(ep, reg.id, "license", "license.pdf", "application/pdf", pdf_bytes)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

from entrepot.platform.v1 import types_pb2
from entrepot.registration.v1 import registration_pb2 as pb

CHUNK_SIZE = 256 * 1024
TERMINAL_STATES = frozenset(
    {pb.Registration.STATE_APPROVED, pb.Registration.STATE_DENIED, pb.Registration.STATE_EXPIRED}
)


def field_value(value: Any) -> pb.FieldValue:
    """str -> text, bool -> flag, list/tuple -> choices, PostalAddress or dict -> address."""
    if isinstance(value, pb.FieldValue):
        return value
    if isinstance(value, bool):
        return pb.FieldValue(flag=value)
    if isinstance(value, str):
        return pb.FieldValue(text=value)
    if isinstance(value, int):
        return pb.FieldValue(text=str(value))
    if isinstance(value, (list, tuple)):
        return pb.FieldValue(choices=pb.StringList(values=[str(v) for v in value]))
    if isinstance(value, types_pb2.PostalAddress):
        return pb.FieldValue(address=value)
    if isinstance(value, dict):
        return pb.FieldValue(address=types_pb2.PostalAddress(**value))
    raise TypeError(f"cannot send {type(value).__name__} as an answer")


def answers(**values: Any) -> dict[str, pb.FieldValue]:
    return {k: field_value(v) for k, v in values.items()}


async def _messages(
    header: pb.UploadRegistrationDocumentRequest.Header,
    content: bytes | AsyncIterable[bytes] | Iterable[bytes],
    chunk_size: int,
) -> AsyncIterator[pb.UploadRegistrationDocumentRequest]:
    yield pb.UploadRegistrationDocumentRequest(header=header)
    if isinstance(content, bytes):
        for i in range(0, len(content), chunk_size):
            yield pb.UploadRegistrationDocumentRequest(chunk=content[i : i + chunk_size])
    elif isinstance(content, AsyncIterable):
        async for piece in content:
            yield pb.UploadRegistrationDocumentRequest(chunk=piece)
    else:
        for piece in content:
            yield pb.UploadRegistrationDocumentRequest(chunk=piece)


async def upload_document(
    client: Any,
    registration_id: str,
    document_type_code: str,
    filename: str,
    content_type: str,
    content: bytes | AsyncIterable[bytes] | Iterable[bytes],
    *,
    request_id: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    timeout: float | None = 60.0,
    **header_fields: str,
) -> pb.RegistrationDocument:
    """Stream a document (header, then chunks). Retry with the same request_id after a failure."""
    header = pb.UploadRegistrationDocumentRequest.Header(
        registration_id=registration_id,
        document_type_code=document_type_code,
        filename=filename,
        content_type=content_type,
        request_id=request_id or str(uuid.uuid4()),
        **header_fields,
    )
    result: pb.RegistrationDocument = await client.registration.upload_registration_document(
        _messages(header, content, chunk_size), timeout=timeout
    )
    return result


async def wait_for_state(
    client: Any, registration_id: str, states: Iterable[int], *, timeout: float = 30.0, interval: float = 0.1
) -> pb.Registration:
    """Poll GetRegistration until the registration is in one of `states` (the workflow runs asynchronously)."""
    wanted = set(states)
    deadline = time.monotonic() + timeout
    while True:
        reg: pb.Registration = await client.registration.get_registration(
            pb.GetRegistrationRequest(id=registration_id)
        )
        if reg.state in wanted:
            return reg
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"registration {registration_id} is {pb.Registration.State.Name(reg.state)} after {timeout}s"
            )
        await asyncio.sleep(interval)


async def forms_for(
    client: Any, commerce_mode: int, *, page_size: int = 100
) -> AsyncIterator[pb.RegistrationForm]:
    """The channel's forms that serve `commerce_mode` (pb.COMMERCE_MODE_B2B or _B2C:
    the forms for that mode and those for both; _BOTH: only the forms for both)."""
    request = pb.ListRegistrationFormsRequest(page_size=page_size, commerce_mode=commerce_mode)  # type: ignore[arg-type]
    while True:
        page: pb.ListRegistrationFormsResponse = await client.registration.list_registration_forms(request)
        for form in page.forms:
            yield form
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token
