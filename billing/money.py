"""Exact money. Every amount is an integer number of nano-units (1e-9 of a currency unit).

The rounding rules, written once:

1. **Unit prices.** A price is quoted per million tokens. The price that applies to a
   request (list price x plan multiplier x time-window multiplier, or a tenant's own
   price) is rounded once, half-up, to a whole number of nano-units *per token*
   (i.e. 0.001 currency units per million tokens). See `price_per_token_nanos`.
2. **Request cost.** tokens x unit price, summed over token kinds: integer arithmetic,
   no rounding at all. This is the cost a caller is told, the ledger stores, and quotas
   and balances are charged.
3. **Invoices.** A line's amount is the exact sum of its requests' costs, rounded once,
   half-up, to the currency's minor unit (cents for USD and CNY, yen for JPY). Tax is the
   rounded subtotal x rate, rounded the same way. See `round_to_minor`.

Integer nano-units keep sums exact in SQL (`BIGINT` holds 9.2 billion units of
currency), and below 2**53 (9 million units) in Redis Lua, which counts in doubles.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

NANOS_PER_UNIT = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per million tokens

#: Digits after the decimal point in each currency's minor unit (ISO 4217).
MINOR_UNIT_DIGITS: dict[str, int] = {"USD": 2, "CNY": 2, "EUR": 2, "GBP": 2, "JPY": 0, "KRW": 0}


def price_per_token_nanos(price_per_million: Decimal | int | str) -> int:
    """Rule 1: a per-million-token price as whole nano-units per token, rounded half-up."""
    per_token = Decimal(price_per_million) * NANOS_PER_UNIT / TOKENS_PER_PRICE_UNIT
    return int(per_token.to_integral_value(rounding=ROUND_HALF_UP))


def apply_multiplier(nanos_per_token: int, multiplier: Decimal | str) -> int:
    """Rule 1 again: a price scaled by a plan or window multiplier, rounded half-up."""
    scaled = Decimal(nanos_per_token) * Decimal(multiplier)
    return int(scaled.to_integral_value(rounding=ROUND_HALF_UP))


def to_nanos(amount: Decimal | int | str) -> int:
    """An exact currency amount as nano-units; refuses amounts finer than a nano-unit."""
    nanos = Decimal(amount) * NANOS_PER_UNIT
    if nanos != nanos.to_integral_value():
        raise ValueError(f"amount {amount} is finer than 1e-9")
    return int(nanos)


def to_decimal(nanos: int) -> Decimal:
    """Nano-units as an exact Decimal amount of currency."""
    return Decimal(nanos).scaleb(-9)


def format_amount(nanos: int) -> str:
    """Nano-units as a plain decimal string with nine places, e.g. '0.000012300'."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_UNIT)
    return f"{sign}{whole}.{frac:09d}"


def format_price_per_million(nanos_per_token: int) -> str:
    """A per-token price in nano-units, shown per million tokens (three places)."""
    return f"{Decimal(nanos_per_token).scaleb(-3):.3f}"


def minor_digits(currency: str) -> int:
    return MINOR_UNIT_DIGITS.get(currency.upper(), 2)


def round_to_minor(nanos: int, currency: str) -> Decimal:
    """Rule 3: an exact amount rounded half-up to the currency's minor unit."""
    quantum = Decimal(1).scaleb(-minor_digits(currency))
    return to_decimal(nanos).quantize(quantum, rounding=ROUND_HALF_UP)
