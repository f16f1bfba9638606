"""The price catalog: what a request costs, by model, date, prompt tier, time of day and plan.

Prices are quoted per million tokens in one currency and become integer nano-units per
token through `billing.money.price_per_token_nanos` (rule 1: the combined price is rounded
once, half-up). A request's cost is integer arithmetic on its normalised `Usage` (rule 2).

How a price is chosen for `quote(model, prompt_tokens, at, plan)`:

1. **Version.** Each model has price versions with effective dates; the version in force at
   `at` (the request's start) applies, so a mid-month change reprices only later requests.
2. **Tier.** A version either has one `prices` set or Ark-style `tiers` by prompt length: a
   prompt of n tokens pays the first tier with ``n <= max_prompt_tokens``. A prompt longer
   than the last tier is refused (`Unpriced`).
3. **Plan.** A tenant's plan either has its own price versions for a model (they replace
   the list price while one is in force) or scales list prices by its `multiplier`.
4. **Off-peak window.** A window (DeepSeek-style, in a stated time zone, ``[start, end)``,
   crossing midnight when ``end < start``) scales whichever price applies, list or own.

The unit price is ``price_per_token_nanos(price x plan multiplier x window multiplier)``,
rounded once. `Quote.list_*` is the same time-of-day price without the plan, so an invoice
can show a plan discount as its own line.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from billing.money import price_per_token_nanos
from billing.usage import Usage

__all__ = [
    "OffPeakWindow",
    "Plan",
    "PriceCatalog",
    "PriceSet",
    "PriceVersion",
    "PricingConfig",
    "PricingError",
    "Quote",
    "Tier",
    "Unpriced",
]


class PricingError(ValueError):
    """The pricing configuration is wrong; the message names the field path."""


class Unpriced(LookupError):
    """No price is in force for this model, time and prompt length; the message says why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceSet(_Strict):
    """List prices per million tokens. `cached_input` defaults to `input`.

    Reasoning tokens are part of output and bill at the output price.
    """

    input: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    output: Decimal = Field(ge=0)

    @property
    def cached(self) -> Decimal:
        return self.input if self.cached_input is None else self.cached_input


class Tier(PriceSet):
    """Prices for prompts of at most `max_prompt_tokens` (and more than the previous tier's)."""

    max_prompt_tokens: int = Field(gt=0)


def _as_utc(value: Any) -> Any:
    """A date means 00:00 UTC; a naive datetime is UTC; an aware one is converted to UTC."""
    if isinstance(value, str) and len(value) == 10:
        value = date.fromisoformat(value)
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


class PriceVersion(_Strict):
    """Prices in force from `effective_from` until the next version: `prices` or `tiers`."""

    effective_from: datetime
    prices: PriceSet | None = None
    tiers: list[Tier] = []

    @field_validator("effective_from", mode="before")
    @classmethod
    def _date_means_midnight_utc(cls, value: Any) -> Any:
        return _as_utc(value)

    @field_validator("effective_from")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _one_of_prices_or_tiers(self) -> Self:
        if (self.prices is None) == (not self.tiers):
            raise ValueError("give exactly one of 'prices' or 'tiers'")
        previous = 0
        for index, tier in enumerate(self.tiers):
            if tier.max_prompt_tokens <= previous:
                raise ValueError(
                    f"tiers[{index}].max_prompt_tokens ({tier.max_prompt_tokens}) must be greater"
                    f" than the previous tier's ({previous}): tiers are sorted and do not overlap"
                )
            previous = tier.max_prompt_tokens
        return self


def _check_versions(versions: list[PriceVersion]) -> list[PriceVersion]:
    if not versions:
        raise ValueError("at least one price version is required")
    ordered = sorted(versions, key=lambda v: v.effective_from)
    for earlier, later in itertools.pairwise(ordered):
        if earlier.effective_from == later.effective_from:
            raise ValueError(
                f"two price versions take effect at {later.effective_from.isoformat()}"
            )
    return ordered


class OffPeakWindow(_Strict):
    """A daily time-of-day window, local to `timezone`, that scales prices by `multiplier`.

    Covers ``[start, end)``; ``end < start`` crosses midnight. `models=None` means all models.
    """

    timezone: str = "UTC"
    start: time
    end: time
    multiplier: Decimal = Field(ge=0)
    models: list[str] | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        return self

    def covers(self, at: datetime) -> bool:
        """Whether the instant `at` falls inside this window (local time in its zone)."""
        local = at.astimezone(ZoneInfo(self.timezone)).time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def applies_to(self, model: str) -> bool:
        return self.models is None or model in self.models

    def label(self) -> str:
        span = f"{self.start:%H:%M}-{self.end:%H:%M}"
        return f"off-peak={self.timezone} {span} x{self.multiplier}"

    def utc_intervals(self, first: date, days: int) -> list[tuple[datetime, datetime]]:
        """The window's occurrences, as UTC intervals, for `days` local days from `first`."""
        zone = ZoneInfo(self.timezone)
        intervals = []
        for offset in range(days):
            day = first + timedelta(days=offset)
            begin = datetime.combine(day, self.start, tzinfo=zone)
            end_day = day if self.start < self.end else day + timedelta(days=1)
            finish = datetime.combine(end_day, self.end, tzinfo=zone)
            intervals.append((begin.astimezone(UTC), finish.astimezone(UTC)))
        return intervals


class Plan(_Strict):
    """A tenant's plan: a multiplier on list prices, and/or its own prices for some models.

    Own prices replace list prices (and ignore `multiplier`) while one of their versions is
    in force; off-peak windows still apply to them.
    """

    multiplier: Decimal = Field(default=Decimal(1), ge=0)
    prices: dict[str, list[PriceVersion]] = {}

    @field_validator("prices")
    @classmethod
    def _versions(cls, value: dict[str, list[PriceVersion]]) -> dict[str, list[PriceVersion]]:
        return {model: _check_versions(versions) for model, versions in value.items()}


class PricingConfig(_Strict):
    """The `pricing:` section of the gateway configuration."""

    currency: str = "USD"
    models: dict[str, list[PriceVersion]] = {}
    off_peak: list[OffPeakWindow] = []
    plans: dict[str, Plan] = {}

    @field_validator("currency")
    @classmethod
    def _currency_code(cls, value: str) -> str:
        if len(value) != 3 or not value.isalpha():
            raise ValueError(f"currency must be a three-letter ISO 4217 code, not {value!r}")
        return value.upper()

    @field_validator("models")
    @classmethod
    def _versions(cls, value: dict[str, list[PriceVersion]]) -> dict[str, list[PriceVersion]]:
        return {model: _check_versions(versions) for model, versions in value.items()}

    @model_validator(mode="after")
    def _windows_do_not_overlap(self) -> Self:
        for (i, a), (j, b) in itertools.combinations(enumerate(self.off_peak), 2):
            if a.models is not None and b.models is not None and not set(a.models) & set(b.models):
                continue
            when = _first_overlap(a, b)
            if when is not None:
                raise ValueError(
                    f"off_peak[{i}] and off_peak[{j}] overlap (both cover {when.isoformat()})"
                    " for the same models"
                )
        return self


# Daily windows are compared over two whole years, so daylight-saving shifts are seen.
_OVERLAP_SCAN_FROM = date(2024, 1, 1)
_OVERLAP_SCAN_DAYS = 731


def _first_overlap(a: OffPeakWindow, b: OffPeakWindow) -> datetime | None:
    """The first instant covered by both windows in the scanned span, if any."""
    first = _OVERLAP_SCAN_FROM - timedelta(days=1)
    xs = a.utc_intervals(first, _OVERLAP_SCAN_DAYS + 2)
    ys = b.utc_intervals(first, _OVERLAP_SCAN_DAYS + 2)
    i = j = 0
    while i < len(xs) and j < len(ys):
        start = max(xs[i][0], ys[j][0])
        if start < min(xs[i][1], ys[j][1]):
            return start
        if xs[i][1] <= ys[j][1]:
            i += 1
        else:
            j += 1
    return None


@dataclass(frozen=True, slots=True)
class Quote:
    """The unit prices (nano-units per token) that apply to one request.

    `version` names the model, the price version's effective date, the tier, the off-peak
    window and the plan; the ledger stores it beside the cost. `list_*` are the prices
    without the plan (but with the time-of-day window), for showing a plan discount.
    """

    model: str
    version: str
    currency: str
    input_nanos: int
    cached_nanos: int
    output_nanos: int
    list_input_nanos: int
    list_cached_nanos: int
    list_output_nanos: int

    def cost(self, usage: Usage) -> int:
        """Rule 2: what this usage costs, in nano-units (exact, no rounding)."""
        return (
            usage.uncached_input * self.input_nanos
            + usage.cached_input * self.cached_nanos
            + usage.output * self.output_nanos
        )

    def list_cost(self, usage: Usage) -> int:
        """The same usage at list price (no plan), in nano-units."""
        return (
            usage.uncached_input * self.list_input_nanos
            + usage.cached_input * self.list_cached_nanos
            + usage.output * self.list_output_nanos
        )

    def worst_case(self, prompt_tokens: int, max_output_tokens: int) -> int:
        """The most a request can cost: the whole prompt uncached plus every output token."""
        return prompt_tokens * self.input_nanos + max_output_tokens * self.output_nanos


@dataclass(frozen=True, slots=True)
class _Line:
    """One model's price versions (list or a plan's own), ready for bisecting on dates."""

    starts: tuple[datetime, ...]
    versions: tuple[PriceVersion, ...]

    def at(self, moment: datetime) -> int:
        return bisect_right(self.starts, moment) - 1


def _tier_of(version: PriceVersion, prompt_tokens: int) -> tuple[int, PriceSet] | None:
    if version.prices is not None:
        return -1, version.prices
    for index, tier in enumerate(version.tiers):
        if prompt_tokens <= tier.max_prompt_tokens:
            return index, tier
    return None


def _tier_label(version: PriceVersion, index: int) -> str:
    if index < 0:
        return ""
    low = version.tiers[index - 1].max_prompt_tokens + 1 if index else 0
    return f";tier={low}-{version.tiers[index].max_prompt_tokens}"


class PriceCatalog:
    """Validated prices, answering `quote()` on the request path.

    Construction checks the configuration against the served models: every served model
    must have a list price, and every model named in the pricing must be served.
    """

    def __init__(self, config: PricingConfig, served_models: Iterable[str]) -> None:
        self.config = config
        self.currency = config.currency
        served = set(served_models)
        _check_models(config, served)
        self._list = {m: _line(v) for m, v in config.models.items()}
        self._own = {
            (plan, m): _line(v) for plan, p in config.plans.items() for m, v in p.prices.items()
        }
        self._windows = {
            m: tuple((i, w) for i, w in enumerate(config.off_peak) if w.applies_to(m))
            for m in config.models
        }
        self._cache: dict[tuple[Any, ...], Quote] = {}

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self.config.models)

    def quote(self, model: str, prompt_tokens: int, at: datetime, plan: str | None = None) -> Quote:
        """The prices in force for `model` at `at` (the request's start) under `plan`.

        Raises `Unpriced` when no price applies and `PricingError` for an undefined plan.
        """
        line = self._list.get(model)
        if line is None:
            raise Unpriced(f"model {model!r} has no price; it cannot be served")
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        if plan is not None and plan not in self.config.plans:
            raise PricingError(f"plan {plan!r} is not defined in pricing.plans")
        list_index = line.at(at)
        if list_index < 0:
            raise Unpriced(
                f"model {model!r} has no price in force at {at.isoformat()}; its first price"
                f" takes effect at {line.starts[0].isoformat()}"
            )
        list_version = line.versions[list_index]
        list_tier = _tier_of(list_version, prompt_tokens)
        own_line = self._own.get((plan, model)) if plan is not None else None
        own_index = own_line.at(at) if own_line is not None else -1
        own_tier = None
        if own_line is not None and own_index >= 0:
            own_tier = _tier_of(own_line.versions[own_index], prompt_tokens)
            if own_tier is None:
                raise Unpriced(self._too_long(model, prompt_tokens, own_line.versions[own_index]))
        elif list_tier is None:
            raise Unpriced(self._too_long(model, prompt_tokens, list_version))
        window = next(((i, w) for i, w in self._windows[model] if w.covers(at)), None)
        key = (
            model,
            plan,
            list_index,
            list_tier[0] if list_tier else None,
            own_index if own_tier else None,
            own_tier[0] if own_tier else None,
            window[0] if window else None,
        )
        quote = self._cache.get(key)
        if quote is None:
            own = own_line.versions[own_index] if own_line is not None and own_tier else None
            quote = self._build(
                model, plan, list_version, list_tier, own, own_tier, window[1] if window else None
            )
            self._cache[key] = quote
        return quote

    def _build(
        self,
        model: str,
        plan: str | None,
        list_version: PriceVersion,
        list_tier: tuple[int, PriceSet] | None,
        own_version: PriceVersion | None,
        own_tier: tuple[int, PriceSet] | None,
        window: OffPeakWindow | None,
    ) -> Quote:
        hours = window.multiplier if window is not None else Decimal(1)
        suffix = f";{window.label()}" if window is not None else ""
        if own_tier is not None and own_version is not None and plan is not None:
            prices, scale = own_tier[1], hours
            version = (
                f"{model}@{_stamp(own_version)}{_tier_label(own_version, own_tier[0])}"
                f"{suffix};plan={plan} own price"
            )
        else:
            assert list_tier is not None
            multiplier = self.config.plans[plan].multiplier if plan is not None else Decimal(1)
            prices, scale = list_tier[1], hours * multiplier
            plan_part = f";plan={plan} x{multiplier}" if plan is not None else ""
            version = (
                f"{model}@{_stamp(list_version)}{_tier_label(list_version, list_tier[0])}"
                f"{suffix}{plan_part}"
            )
        list_prices = list_tier[1] if list_tier is not None else prices
        list_scale = hours if list_tier is not None else scale
        return Quote(
            model=model,
            version=version,
            currency=self.currency,
            input_nanos=price_per_token_nanos(prices.input * scale),
            cached_nanos=price_per_token_nanos(prices.cached * scale),
            output_nanos=price_per_token_nanos(prices.output * scale),
            list_input_nanos=price_per_token_nanos(list_prices.input * list_scale),
            list_cached_nanos=price_per_token_nanos(list_prices.cached * list_scale),
            list_output_nanos=price_per_token_nanos(list_prices.output * list_scale),
        )

    @staticmethod
    def _too_long(model: str, prompt_tokens: int, version: PriceVersion) -> str:
        longest = version.tiers[-1].max_prompt_tokens
        return (
            f"a prompt of {prompt_tokens} tokens is longer than the largest priced tier of"
            f" model {model!r} ({longest} tokens)"
        )


def _line(versions: list[PriceVersion]) -> _Line:
    ordered = sorted(versions, key=lambda v: v.effective_from)
    return _Line(tuple(v.effective_from for v in ordered), tuple(ordered))


def _stamp(version: PriceVersion) -> str:
    return version.effective_from.strftime("%Y-%m-%dT%H:%MZ")


def _check_models(config: PricingConfig, served: set[str]) -> None:
    """Every served model is priced and every priced model is served."""
    for model in config.models:
        if model not in served:
            raise PricingError(f"pricing.models.{model}: unknown model {model!r} (not served)")
    for name, plan in config.plans.items():
        for model in plan.prices:
            if model not in served:
                raise PricingError(
                    f"pricing.plans.{name}.prices.{model}: unknown model {model!r} (not served)"
                )
    for index, window in enumerate(config.off_peak):
        for model in window.models or ():
            if model not in served:
                raise PricingError(
                    f"pricing.off_peak[{index}].models: unknown model {model!r} (not served)"
                )
    missing = sorted(served - set(config.models))
    if missing:
        raise PricingError(
            f"pricing.models: no list price for served model(s) {', '.join(map(repr, missing))};"
            " an unpriced model would be served free"
        )
