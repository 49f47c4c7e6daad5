"""Money in integer minor units. There is no float anywhere on this path."""

from __future__ import annotations

from dataclasses import dataclass

# ISO-4217 active codes and their minor-unit exponents (the common subset a
# B2B/B2C platform meets; extend when a channel needs another).
CURRENCY_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        "AED ARS AUD BAM BGN BRL BWP CAD CHF CNY COP CRC CZK DKK DOP DZD EGP EUR GBP GEL GHS GTQ HKD HNL HUF "
        "IDR ILS INR KES KZT LKR MAD MDL MKD MXN MYR NGN NOK NZD PEN PHP PKR PLN QAR RON RSD RUB SAR SEK SGD "
        "THB TRY TTD TWD UAH USD UYU UZS ZAR".split(),
        2,
    ),
    **dict.fromkeys("CLP ISK JPY KRW PYG UGX VND XAF XOF".split(), 0),
    **dict.fromkeys("BHD JOD KWD OMR TND".split(), 3),
}


def is_currency(code: str) -> bool:
    return code in CURRENCY_EXPONENTS


@dataclass(frozen=True)
class Money:
    currency: str
    amount_minor: int

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.currency, self.amount_minor + other.amount_minor)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.currency, self.amount_minor - other.amount_minor)

    def _same(self, other: Money) -> None:
        if other.currency != self.currency:
            raise ValueError(f"currency mismatch: {self.currency} vs {other.currency}")
