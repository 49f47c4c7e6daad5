"""Temporal activities of the registration module.

Each activity runs one short transaction. They are idempotent: state changes
are conditional on the state they leave (a retry finds the work done and
returns the current state), notifications claim an effect key built from the
workflow id and the step, and verification results are upserts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from domain.registration import submissions
from domain.registration.storage import DocumentStorage, PostgresDocumentStorage
from domain.registration.strategies import ManualReview, NoOcr, OcrResult, OcrStrategy, VerificationStrategy
from domain.shared.uow import UnitOfWork


@dataclass
class StepInput:
    registration_id: str
    # Workflow id + step: the idempotency key of the step's effect.
    key: str


@dataclass
class StepResult:
    state: str
    terminal: bool
    satisfied: bool
    account_status: str = ""


@dataclass
class DocumentInput:
    document_id: str
    key: str


@dataclass
class OcrOutput:
    strategy: str
    text: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    confidence_bps: int = 0


@dataclass
class VerificationInput:
    document_id: str
    key: str
    ocr: OcrOutput


@dataclass
class VerificationOutput:
    status: str
    confidence_bps: int
    registration_id: str


def _result(reg: submissions.Registration) -> StepResult:
    return StepResult(reg.state, reg.terminal, reg.satisfied, reg.account.status if reg.account else "")


class RegistrationActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        storage: DocumentStorage | None = None,
        ocr: OcrStrategy | None = None,
        verifier: VerificationStrategy | None = None,
    ) -> None:
        self.sessions = sessions
        self.storage: DocumentStorage = storage or PostgresDocumentStorage()
        self.ocr: OcrStrategy = ocr or NoOcr()
        self.verifier: VerificationStrategy = verifier or ManualReview()

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.validate_registration,
            self.create_pending_account,
            self.notify_registration,
            self.refresh_registration,
            self.apply_registration_decision,
            self.expire_registration,
            self.run_document_ocr,
            self.run_document_verification,
        ]

    @activity.defn(name="registration.validate")
    async def validate_registration(self, inp: StepInput) -> StepResult:
        """Re-read the submission and move it to documents_pending or in_review."""
        async with UnitOfWork(self.sessions) as uow:
            reg = await submissions.advance(uow.session, inp.registration_id)
            await uow.commit()
        return _result(reg)

    @activity.defn(name="registration.create_pending_account")
    async def create_pending_account(self, inp: StepInput) -> StepResult:
        async with UnitOfWork(self.sessions) as uow:
            await submissions.ensure_account(uow.session, inp.registration_id)
            await uow.commit()
            reg = await submissions.get_registration(
                uow.session, channel=None, registration_id=inp.registration_id, full=False
            )
        return _result(reg)

    @activity.defn(name="registration.notify")
    async def notify_registration(self, inp: StepInput) -> bool:
        async with UnitOfWork(self.sessions) as uow:
            sent = await submissions.notify(
                uow.session, inp.registration_id, inp.key, "registration.notification"
            )
            await uow.commit()
        return sent

    @activity.defn(name="registration.refresh")
    async def refresh_registration(self, inp: StepInput) -> StepResult:
        return await self.validate_registration(inp)

    @activity.defn(name="registration.apply_decision")
    async def apply_registration_decision(self, inp: StepInput) -> StepResult:
        async with UnitOfWork(self.sessions) as uow:
            reg = await submissions.apply_decision(uow.session, inp.registration_id)
            await uow.commit()
        return _result(reg)

    @activity.defn(name="registration.expire")
    async def expire_registration(self, inp: StepInput) -> StepResult:
        async with UnitOfWork(self.sessions) as uow:
            reg = await submissions.expire(uow.session, inp.registration_id)
            await uow.commit()
        return _result(reg)

    @activity.defn(name="registration.document_ocr")
    async def run_document_ocr(self, inp: DocumentInput) -> OcrOutput:
        async with UnitOfWork(self.sessions) as uow:
            facts = await submissions.document_facts(uow.session, inp.document_id)
            content = await submissions.document_content(uow.session, self.storage, inp.document_id)
        result: OcrResult = await self.ocr.extract(content, facts)
        return OcrOutput(self.ocr.name, result.text, dict(result.fields), result.confidence_bps)

    @activity.defn(name="registration.document_verification")
    async def run_document_verification(self, inp: VerificationInput) -> VerificationOutput:
        async with UnitOfWork(self.sessions) as uow:
            facts = await submissions.document_facts(uow.session, inp.document_id)
        ocr = OcrResult(inp.ocr.text, dict(inp.ocr.fields), inp.ocr.confidence_bps)
        outcome = await self.verifier.verify(facts, ocr)
        async with UnitOfWork(self.sessions) as uow:
            doc = await submissions.record_verification(
                uow.session,
                document_id=inp.document_id,
                status=outcome.status,
                ocr_strategy=inp.ocr.strategy,
                verification_strategy=self.verifier.name,
                confidence_bps=outcome.confidence_bps,
                extracted=ocr.fields,
                note=outcome.note,
            )
            await uow.commit()
        return VerificationOutput(outcome.status, outcome.confidence_bps, doc.registration_id)
