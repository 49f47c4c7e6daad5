"""Temporal workflows: the registration lifecycle and document verification.

Workflow ids come from the resources (`registration-<id>`,
`document-verification-<id>`), so starting twice is harmless, and every
activity gets a key built from the workflow id and the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain.registration.activities import (
        DocumentInput,
        OcrOutput,
        StepInput,
        StepResult,
        VerificationInput,
        VerificationOutput,
    )

ACTIVITY_TIMEOUT = timedelta(seconds=30)
RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=10))

# Signal names: the servicer and the verification workflow send these.
REVIEW_SIGNAL = "ReviewRegistration"
REQUIREMENTS_SIGNAL = "RequirementsUpdated"


@dataclass
class RegistrationInput:
    registration_id: str
    # ISO-8601 deadline (the registration's expires_at): the expiry timer.
    expires_at: str


@dataclass
class DocumentVerificationInput:
    document_id: str
    registration_id: str


async def _step(name: str, inp: object) -> StepResult:
    result: StepResult = await workflow.execute_activity(
        name, inp, start_to_close_timeout=ACTIVITY_TIMEOUT, retry_policy=RETRY, result_type=StepResult
    )
    return result


@workflow.defn(name="RegistrationWorkflow")
class RegistrationWorkflow:
    """validate -> pending account -> notify -> wait (requirements, decision) -> approve/deny, or expire."""

    def __init__(self) -> None:
        self._decided = False
        self._changed = False
        self._state = "submitted"

    @workflow.signal(name=REVIEW_SIGNAL)
    def review(self) -> None:
        # The decision itself is in the database (recorded by ReviewRegistration);
        # the signal only wakes the workflow, so a duplicate signal is harmless.
        self._decided = True

    @workflow.signal(name=REQUIREMENTS_SIGNAL)
    def requirements_updated(self) -> None:
        self._changed = True

    @workflow.query(name="state")
    def state(self) -> str:
        return self._state

    @workflow.run
    async def run(self, inp: RegistrationInput) -> str:
        wid = workflow.info().workflow_id
        rid = inp.registration_id
        result = await _step("registration.validate", StepInput(rid, f"{wid}:validate"))
        self._state = result.state
        if result.terminal:
            return result.state
        await _step("registration.create_pending_account", StepInput(rid, f"{wid}:account"))
        await workflow.execute_activity(
            "registration.notify",
            StepInput(rid, f"{wid}:notify-submitted"),
            start_to_close_timeout=ACTIVITY_TIMEOUT,
            retry_policy=RETRY,
        )
        deadline = datetime.fromisoformat(inp.expires_at)
        refreshes = 0
        while True:
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining <= 0:
                break
            try:
                await workflow.wait_condition(lambda: self._decided or self._changed, timeout=remaining)
            except TimeoutError:
                break
            if self._changed:
                self._changed = False
                refreshes += 1
                result = await _step("registration.refresh", StepInput(rid, f"{wid}:refresh-{refreshes}"))
                self._state = result.state
            if self._decided:
                self._decided = False
                result = await _step("registration.apply_decision", StepInput(rid, f"{wid}:decision"))
                self._state = result.state
            if result.terminal:
                return result.state
        result = await _step("registration.expire", StepInput(rid, f"{wid}:expire"))
        self._state = result.state
        return result.state


@workflow.defn(name="DocumentVerificationWorkflow")
class DocumentVerificationWorkflow:
    """OCR strategy, then verification strategy; the result is stored with its confidence."""

    @workflow.run
    async def run(self, inp: DocumentVerificationInput) -> str:
        wid = workflow.info().workflow_id
        ocr: OcrOutput = await workflow.execute_activity(
            "registration.document_ocr",
            DocumentInput(inp.document_id, f"{wid}:ocr"),
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=RETRY,
            result_type=OcrOutput,
        )
        outcome: VerificationOutput = await workflow.execute_activity(
            "registration.document_verification",
            VerificationInput(inp.document_id, f"{wid}:verify", ocr),
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=RETRY,
            result_type=VerificationOutput,
        )
        # A verdict can change which requirements are met (a rejected document does not count).
        handle = workflow.get_external_workflow_handle(f"registration-{inp.registration_id}")
        try:
            await handle.signal(REQUIREMENTS_SIGNAL)
        except ApplicationError as exc:
            # The registration already finished (decided or expired): nothing to wake.
            workflow.logger.info("registration workflow not signalled: %s", exc.message)
        return outcome.status
