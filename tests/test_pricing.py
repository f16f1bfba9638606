"""The price catalog: versions, tiers, off-peak windows, plans, rounding and validation."""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from billing.pricing import PriceCatalog, PricingConfig, PricingError, Unpriced
from billing.usage import Usage

SERVED = ["gpt-4o", "doubao-pro", "deepseek-chat"]

CONFIG: dict[str, Any] = {
    "currency": "USD",
    "models": {
        "gpt-4o": [
            {
                "effective_from": "2025-01-01",
                "prices": {"input": "2.50", "cached_input": "1.25", "output": "10.00"},
            },
            {"effective_from": "2025-01-15T00:00:00Z", "prices": {"input": "2", "output": "8"}},
        ],
        "doubao-pro": [
            {
                "effective_from": "2025-01-01",
                "tiers": [
                    {"max_prompt_tokens": 32_768, "input": "0.8", "output": "2"},
                    {"max_prompt_tokens": 131_072, "input": "1.2", "output": "5"},
                    {"max_prompt_tokens": 262_144, "input": "2.4", "output": "10"},
                ],
            }
        ],
        "deepseek-chat": [
            {
                "effective_from": "2025-01-01",
                "prices": {"input": "0.27", "cached_input": "0.07", "output": "1.10"},
            }
        ],
    },
    "off_peak": [
        # DeepSeek's discount hours: 00:30-08:30 Beijing time (16:30-00:30 UTC).
        {
            "timezone": "Asia/Shanghai",
            "start": "00:30",
            "end": "08:30",
            "multiplier": "0.5",
            "models": ["deepseek-chat"],
        },
        # A window that crosses local midnight.
        {
            "timezone": "UTC",
            "start": "22:00",
            "end": "02:00",
            "multiplier": "0.25",
            "models": ["doubao-pro"],
        },
    ],
    "plans": {
        "gold": {"multiplier": "0.8"},
        "acme": {
            "prices": {
                "deepseek-chat": [
                    {"effective_from": "2025-01-10", "prices": {"input": "0.2", "output": "1"}}
                ]
            }
        },
    },
}

DAY = datetime(2025, 1, 20, 12, 0, tzinfo=UTC)


def catalog(config: dict[str, Any] | None = None, served: list[str] | None = None) -> PriceCatalog:
    return PriceCatalog(PricingConfig.model_validate(config or CONFIG), served or SERVED)


def changed(path: list[Any], value: Any) -> dict[str, Any]:
    config = copy.deepcopy(CONFIG)
    target = config
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return config


# ---- versions -----------------------------------------------------------------------------


def test_a_mid_month_price_change_reprices_only_later_requests() -> None:
    prices = catalog()
    usage = Usage(uncached_input=1_000, cached_input=500, output=200)
    before = prices.quote("gpt-4o", 1_500, datetime(2025, 1, 14, 23, 59, 59, tzinfo=UTC))
    after = prices.quote("gpt-4o", 1_500, datetime(2025, 1, 15, tzinfo=UTC))

    assert (before.input_nanos, before.cached_nanos, before.output_nanos) == (2_500, 1_250, 10_000)
    assert before.cost(usage) == 1_000 * 2_500 + 500 * 1_250 + 200 * 10_000
    # cached_input defaults to input in the new version
    assert (after.input_nanos, after.cached_nanos, after.output_nanos) == (2_000, 2_000, 8_000)
    assert after.cost(usage) == 1_500 * 2_000 + 200 * 8_000
    assert before.version == "gpt-4o@2025-01-01T00:00Z"
    assert after.version == "gpt-4o@2025-01-15T00:00Z"
    assert before.currency == "USD"


def test_no_price_before_the_first_version_is_refused() -> None:
    with pytest.raises(Unpriced, match="no price in force"):
        catalog().quote("gpt-4o", 10, datetime(2024, 12, 31, 23, 59, tzinfo=UTC))


def test_an_unpriced_model_is_refused() -> None:
    with pytest.raises(Unpriced, match="'o3' has no price"):
        catalog().quote("o3", 10, DAY)


def test_reasoning_tokens_bill_as_output() -> None:
    quote = catalog().quote("gpt-4o", 10, DAY)
    plain = Usage(uncached_input=10, output=100)
    reasoning = Usage(uncached_input=10, output=100, reasoning=80)
    assert quote.cost(reasoning) == quote.cost(plain) == 10 * 2_000 + 100 * 8_000
    assert quote.worst_case(10, 100) == quote.cost(plain)


# ---- tiers by prompt length -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_tokens", "input_nanos", "tier"),
    [
        (0, 800, "0-32768"),
        (32_768, 800, "0-32768"),
        (32_769, 1_200, "32769-131072"),
        (131_072, 1_200, "32769-131072"),
        (131_073, 2_400, "131073-262144"),
        (262_144, 2_400, "131073-262144"),
    ],
)
def test_prompt_tiers_at_their_boundaries(prompt_tokens: int, input_nanos: int, tier: str) -> None:
    quote = catalog().quote("doubao-pro", prompt_tokens, DAY)
    assert quote.input_nanos == input_nanos
    assert quote.version == f"doubao-pro@2025-01-01T00:00Z;tier={tier}"


def test_a_prompt_beyond_the_last_tier_is_refused() -> None:
    with pytest.raises(Unpriced, match="262145 tokens is longer than the largest"):
        catalog().quote("doubao-pro", 262_145, DAY)


# ---- time-of-day windows --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("at", "output_nanos"),
    [
        (datetime(2025, 1, 20, 16, 29, 59, tzinfo=UTC), 1_100),  # 00:29:59 in Beijing
        (datetime(2025, 1, 20, 16, 30, tzinfo=UTC), 550),  # 00:30 in Beijing
        (datetime(2025, 1, 20, 23, 59, 59, tzinfo=UTC), 550),  # crosses UTC midnight
        (datetime(2025, 1, 21, 0, 29, 59, tzinfo=UTC), 550),
        (datetime(2025, 1, 21, 0, 30, tzinfo=UTC), 1_100),  # 08:30 in Beijing
    ],
)
def test_off_peak_window_in_its_time_zone(at: datetime, output_nanos: int) -> None:
    assert catalog().quote("deepseek-chat", 10, at).output_nanos == output_nanos


@pytest.mark.parametrize(
    ("clock", "discounted"),
    [
        ((21, 59, 59), False),
        ((22, 0, 0), True),
        ((23, 59, 59), True),
        ((0, 0, 0), True),
        ((1, 59, 59), True),
        ((2, 0, 0), False),
    ],
)
def test_off_peak_window_across_midnight(clock: tuple[int, int, int], discounted: bool) -> None:
    at = datetime(2025, 1, 20, *clock, tzinfo=UTC)
    quote = catalog().quote("doubao-pro", 1_000, at)
    assert quote.input_nanos == (200 if discounted else 800)
    assert ("off-peak=UTC 22:00-02:00 x0.25" in quote.version) is discounted
    # The list price is the public price at that hour: the window applies to it too.
    assert quote.list_input_nanos == quote.input_nanos


def test_windows_only_touch_their_models() -> None:
    assert catalog().quote("gpt-4o", 10, datetime(2025, 1, 20, 23, tzinfo=UTC)).input_nanos == 2_000


# ---- plans ----------------------------------------------------------------------------------


def test_plan_multiplier_discounts_list_prices() -> None:
    quote = catalog().quote("gpt-4o", 1_000, DAY, plan="gold")
    assert (quote.input_nanos, quote.output_nanos) == (1_600, 6_400)
    assert (quote.list_input_nanos, quote.list_output_nanos) == (2_000, 8_000)
    usage = Usage(uncached_input=1_000, output=100)
    assert quote.list_cost(usage) - quote.cost(usage) == 1_000 * 400 + 100 * 1_600
    assert quote.version == "gpt-4o@2025-01-15T00:00Z;plan=gold x0.8"


def test_a_tenants_own_price_replaces_the_list_price_once_in_force() -> None:
    prices = catalog()
    before = prices.quote("deepseek-chat", 10, datetime(2025, 1, 9, 12, tzinfo=UTC), plan="acme")
    assert before.input_nanos == 270  # the list price (the plan has no multiplier)
    own = prices.quote("deepseek-chat", 10, DAY, plan="acme")
    assert (own.input_nanos, own.cached_nanos, own.output_nanos) == (200, 200, 1_000)
    assert (own.list_input_nanos, own.list_output_nanos) == (270, 1_100)
    assert own.version == "deepseek-chat@2025-01-10T00:00Z;plan=acme own price"
    # Off-peak hours scale the tenant's own price as well.
    night = prices.quote("deepseek-chat", 10, datetime(2025, 1, 20, 17, tzinfo=UTC), plan="acme")
    assert (night.input_nanos, night.list_input_nanos) == (100, 135)
    # Other models of the same plan keep list prices.
    assert prices.quote("gpt-4o", 10, DAY, plan="acme").input_nanos == 2_000


def test_an_undefined_plan_is_a_configuration_error() -> None:
    with pytest.raises(PricingError, match="plan 'platinum' is not defined"):
        catalog().quote("gpt-4o", 10, DAY, plan="platinum")


# ---- rounding (billing.money rule 1: once, half-up, to whole nanos per token) ------------------


@pytest.mark.parametrize(
    ("per_million", "multiplier", "nanos"),
    [
        ("0.0005", "1", 1),  # exactly .5 nano rounds up
        ("0.0004999", "1", 0),
        ("0.0015", "1", 2),
        ("0.0025", "0.5", 1),  # 1.25 once; rounding 2.5 first would have given 2
        ("0.001", "0.5", 1),  # exactly .5 after the multiplier
        ("3", "0.333", 999),
    ],
)
def test_unit_prices_round_once_half_up(per_million: str, multiplier: str, nanos: int) -> None:
    config = {
        "models": {
            "m": [{"effective_from": "2025-01-01", "prices": {"input": per_million, "output": "0"}}]
        },
        "plans": {"p": {"multiplier": multiplier}},
    }
    quote = catalog(config, ["m"]).quote("m", 3, DAY, plan="p")
    assert quote.input_nanos == nanos
    # A request's cost is exact: no further rounding.
    assert quote.cost(Usage(uncached_input=3)) == 3 * nanos


# ---- validation at start ------------------------------------------------------------------


def test_unknown_model_is_named() -> None:
    config = changed(["models", "gpt-4o-mni"], CONFIG["models"]["gpt-4o"])
    with pytest.raises(PricingError, match=r"pricing\.models\.gpt-4o-mni: unknown model"):
        catalog(config)
    plan = changed(["plans", "gold", "prices"], {"o1": CONFIG["models"]["gpt-4o"]})
    with pytest.raises(PricingError, match=r"pricing\.plans\.gold\.prices\.o1: unknown model"):
        catalog(plan)


def test_a_served_model_without_price_is_refused_at_start() -> None:
    with pytest.raises(PricingError, match=r"no list price for served model.*'o3'"):
        catalog(served=[*SERVED, "o3"])


def test_negative_price_names_the_field() -> None:
    config = changed(["models", "gpt-4o", 0, "prices", "output"], "-1")
    with pytest.raises(ValidationError, match=r"models\.gpt-4o\.0\.prices\.output"):
        catalog(config)


def test_overlapping_windows_are_refused() -> None:
    config = copy.deepcopy(CONFIG)
    config["off_peak"].append(
        {"timezone": "UTC", "start": "01:00", "end": "03:00", "multiplier": "0.9"}
    )
    with pytest.raises(ValidationError, match=r"off_peak\[1\] and off_peak\[2\] overlap"):
        catalog(config)
    # Disjoint model lists may share hours.
    config["off_peak"][2]["models"] = ["gpt-4o"]
    catalog(config)


def test_windows_in_different_zones_overlap_by_the_instant() -> None:
    config = copy.deepcopy(CONFIG)
    # 00:00-00:15 UTC is 08:00-08:15 in Beijing, inside the first window (00:30-08:30 there).
    config["off_peak"].append(
        {"timezone": "UTC", "start": "00:00", "end": "00:15", "multiplier": "0.9"}
    )
    with pytest.raises(ValidationError, match=r"off_peak\[0\] and off_peak\[2\] overlap"):
        catalog(config)


@pytest.mark.parametrize(
    "tiers",
    [
        [{"max_prompt_tokens": 131_072}, {"max_prompt_tokens": 32_768}],  # unsorted
        [{"max_prompt_tokens": 32_768}, {"max_prompt_tokens": 32_768}],  # overlapping
    ],
)
def test_unsorted_or_overlapping_tiers_are_refused(tiers: list[dict[str, Any]]) -> None:
    priced = [{**tier, "input": "1", "output": "1"} for tier in tiers]
    config = changed(["models", "doubao-pro", 0, "tiers"], priced)
    with pytest.raises(ValidationError, match=r"models\.doubao-pro\.0\s+.*tiers\[1\]"):
        catalog(config)


def test_prices_and_tiers_are_exclusive() -> None:
    config = changed(
        ["models", "gpt-4o", 0, "tiers"], [{"max_prompt_tokens": 1, "input": "1", "output": "1"}]
    )
    with pytest.raises(ValidationError, match="exactly one of 'prices' or 'tiers'"):
        catalog(config)


def test_empty_window_and_unknown_zone_are_refused() -> None:
    with pytest.raises(ValidationError, match="window would be empty"):
        catalog(changed(["off_peak", 0, "end"], "00:30"))
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        catalog(changed(["off_peak", 0, "timezone"], "Mars/Olympus"))


def test_quote_is_cheap_on_the_hot_path() -> None:
    prices = catalog()
    at = datetime(2025, 1, 20, 17, tzinfo=UTC)
    started = time.perf_counter()
    for n in range(20_000):
        prices.quote("deepseek-chat", n, at, plan="gold")
    per_quote_us = (time.perf_counter() - started) / 20_000 * 1e6
    assert per_quote_us < 100, f"{per_quote_us:.1f} us per quote"
