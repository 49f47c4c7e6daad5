"""Payment gateways: the PaymentGateway protocol and the built-in simulated PSP.

A gateway refunds money on one tender. It must honour the idempotency key:
the same key always names the same refund, so calling again after a crash,
a timeout or a retry returns the first refund instead of paying twice (the
contract every real PSP offers: Stripe's Idempotency-Key, Adyen's
idempotency key, ...). Real PSPs plug in behind the same protocol.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker


@dataclass(frozen=True)
class GatewayRefund:
    idempotency_key: str
    tender_id: str
    method: str
    gateway_reference: str
    currency: str
    amount_minor: int


@dataclass(frozen=True)
class GatewayResult:
    gateway_refund_id: str
    amount_minor: int


class GatewayError(Exception):
    """A refusal or an outage. `retryable=False` means retrying cannot help (declined)."""

    def __init__(self, error_type: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retryable = retryable


class PaymentGateway(Protocol):
    async def refund(self, request: GatewayRefund) -> GatewayResult: ...


class SimulatedGateway:
    """A PSP simulated in its own tables (refunds.sim_psp_*), in its own transactions,
    as an outside system would be.

    Behaviours per tender gateway reference (configure_simulated_psp):
    fail the first N calls (retryable), fail every call (declined, not
    retryable), or record the refund and then time out the first N calls
    (the caller cannot tell whether money moved: the idempotency key is what
    keeps its retry from paying twice).
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def refund(self, request: GatewayRefund) -> GatewayResult:
        if request.amount_minor <= 0:
            raise GatewayError("GatewayInvalid", "amount must be positive", retryable=False)
        async with self.sessions() as s, s.begin():
            existing = await _find(s, request.idempotency_key)
            if existing is not None:
                return _checked(existing, request)
            rule = (
                await s.execute(
                    text(
                        """
                        UPDATE refunds.sim_psp_rules SET attempts = attempts + 1
                        WHERE gateway_reference = :ref
                        RETURNING attempts, fail_times, fail_forever,
                                  timeout_after_charge_times, timeout_seconds
                        """
                    ),
                    {"ref": request.gateway_reference},
                )
            ).first()
        if rule is not None:
            attempts, fail_times, fail_forever = rule[0], rule[1], rule[2]
            if fail_forever:
                raise GatewayError("GatewayDeclined", "the PSP declined the refund", retryable=False)
            if attempts <= fail_times:
                raise GatewayError(
                    "GatewayUnavailable", f"the PSP is unavailable (call {attempts})", retryable=True
                )
        async with self.sessions() as s, s.begin():
            await s.execute(
                text(
                    """
                    INSERT INTO refunds.sim_psp_refunds
                        (idempotency_key, psp_refund_id, gateway_reference, amount_minor, currency)
                    VALUES (:key, :psp, :ref, :amount, :currency)
                    ON CONFLICT (idempotency_key) DO NOTHING
                    """
                ),
                {
                    "key": request.idempotency_key,
                    "psp": f"sim_re_{uuid.uuid4().hex[:16]}",
                    "ref": request.gateway_reference,
                    "amount": request.amount_minor,
                    "currency": request.currency,
                },
            )
            stored = await _find(s, request.idempotency_key)
        assert stored is not None
        if rule is not None and rule[0] <= rule[3]:
            # Money moved, but the answer never reaches the caller.
            await asyncio.sleep(float(rule[4]))
            raise GatewayError("GatewayTimeout", "the PSP did not answer in time", retryable=True)
        return _checked(stored, request)


async def _find(s: AsyncSession, key: str) -> tuple[str, int, str] | None:
    row = (
        await s.execute(
            text(
                "SELECT psp_refund_id, amount_minor, currency FROM refunds.sim_psp_refunds "
                "WHERE idempotency_key = :key"
            ),
            {"key": key},
        )
    ).first()
    return None if row is None else (str(row[0]), int(row[1]), str(row[2]))


def _checked(stored: tuple[str, int, str], request: GatewayRefund) -> GatewayResult:
    psp_id, amount, currency = stored
    if amount != request.amount_minor or currency != request.currency:
        # What real PSPs do when a key is reused with other parameters.
        raise GatewayError(
            "GatewayIdempotencyMismatch",
            "idempotency key reused with a different amount or currency",
            retryable=False,
        )
    return GatewayResult(gateway_refund_id=psp_id, amount_minor=amount)


async def configure_simulated_psp(
    session: AsyncSession,
    gateway_reference: str,
    *,
    fail_times: int = 0,
    fail_forever: bool = False,
    timeout_after_charge_times: int = 0,
    timeout_seconds: float = 1.0,
) -> None:
    """Sets (or resets, with the defaults) the simulated PSP's behaviour for a tender."""
    await session.execute(
        text(
            """
            INSERT INTO refunds.sim_psp_rules AS r (gateway_reference, fail_times, fail_forever,
                timeout_after_charge_times, timeout_seconds, attempts)
            VALUES (:ref, :ft, :ff, :tt, :ts, 0)
            ON CONFLICT (gateway_reference) DO UPDATE SET fail_times = EXCLUDED.fail_times,
                fail_forever = EXCLUDED.fail_forever,
                timeout_after_charge_times = EXCLUDED.timeout_after_charge_times,
                timeout_seconds = EXCLUDED.timeout_seconds, attempts = 0
            """
        ),
        {
            "ref": gateway_reference,
            "ft": fail_times,
            "ff": fail_forever,
            "tt": timeout_after_charge_times,
            "ts": timeout_seconds,
        },
    )


@dataclass(frozen=True)
class SimulatedRefund:
    idempotency_key: str
    psp_refund_id: str
    gateway_reference: str
    amount_minor: int
    currency: str


async def simulated_psp_refunds(session: AsyncSession, gateway_reference: str) -> list[SimulatedRefund]:
    """What the simulated PSP paid out for a tender reference (for tests and demos)."""
    rows = await session.execute(
        text(
            "SELECT idempotency_key, psp_refund_id, gateway_reference, amount_minor, currency "
            "FROM refunds.sim_psp_refunds WHERE gateway_reference = :ref ORDER BY created_at"
        ),
        {"ref": gateway_reference},
    )
    return [SimulatedRefund(str(a), str(b), str(c), int(d), str(e)) for a, b, c, d, e in rows.all()]
