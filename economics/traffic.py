"""The synthetic month: every request of every tenant, planned up front from the seed.

For each tenant, hour by hour through its own calendar month (local time, so the whole
month lands on one invoice), the expected number of requests is proportional to
``diurnal[local hour] x weekly[local weekday] x growth ** days`` and scaled so the tenant's
month holds ``share x requests``. The hour's count is a Poisson draw, its requests start
at uniform moments inside it. Each request draws its model, prompt and output length and
whether it streams. A tenant draws from its own generator seeded by the scenario seed and
its id, so adding a tenant does not change the others' traffic.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from billing.invoice import month_period
from economics.scenario import LengthDistribution, Scenario, TenantProfile
from providers.lengths import draw_length

__all__ = ["PlannedRequest", "plan_month", "prompt_text"]

_HOUR = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of the synthetic month."""

    at: datetime  # UTC, when the request starts on the simulated clock
    tenant_id: str
    model: str
    prompt_tokens: int  # words in the prompt (about one token each)
    max_tokens: int  # the output length the tenant's profile drew
    stream: bool
    index: int  # the tenant's n-th request, for a distinct prompt


def plan_month(scenario: Scenario, timezones: dict[str, str]) -> list[PlannedRequest]:
    """Every request of the month, ordered by start time (ties by tenant and index)."""
    total_share = sum(p.share for p in scenario.tenants.values())
    planned: list[PlannedRequest] = []
    for tenant_id, profile in scenario.tenants.items():
        expected = scenario.requests * profile.share / total_share
        zone = timezones.get(tenant_id, "UTC")
        rng = random.Random(f"{scenario.seed}:{tenant_id}")
        planned += _plan_tenant(tenant_id, profile, scenario.month, zone, expected, rng)
    planned.sort(key=lambda r: (r.at, r.tenant_id, r.index))
    return planned


def _plan_tenant(
    tenant_id: str,
    profile: TenantProfile,
    month: str,
    timezone: str,
    expected: float,
    rng: random.Random,
) -> list[PlannedRequest]:
    start, end = month_period(month, timezone)
    hourly = profile.hourly_weights()
    daily_growth = profile.growth.daily_rate()
    hours: list[tuple[datetime, float]] = []
    moment = start.astimezone(UTC)
    finish = end.astimezone(UTC)
    while moment < finish:
        local = moment.astimezone(start.tzinfo)
        days = (moment - start).total_seconds() / 86400
        weight = hourly[local.hour] * profile.weekly[local.weekday()] * daily_growth**days
        hours.append((moment, weight))
        moment += _HOUR
    total = sum(w for _, w in hours) or 1.0
    models = list(profile.models)
    model_weights = [profile.models[m] for m in models]
    requests: list[PlannedRequest] = []
    for hour_start, weight in hours:
        count = _poisson(rng, expected * weight / total)
        offsets = sorted(rng.randrange(3_600_000_000) for _ in range(count))
        for offset in offsets:
            requests.append(
                PlannedRequest(
                    at=hour_start + timedelta(microseconds=offset),
                    tenant_id=tenant_id,
                    model=rng.choices(models, model_weights)[0],
                    prompt_tokens=_draw(rng, profile.prompt_tokens),
                    max_tokens=_draw(rng, profile.output_tokens),
                    stream=rng.random() < profile.stream_share,
                    index=len(requests),
                )
            )
    return requests


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 50:  # a normal approximation is plenty for traffic counts
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, product, count = math.exp(-mean), rng.random(), 0
    while product > limit:
        product *= rng.random()
        count += 1
    return count


def _draw(rng: random.Random, spec: LengthDistribution) -> int:
    return draw_length(rng, spec.distribution, spec.mean, spec.sd, spec.min, spec.max)


_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at"
    " which but have an they you were had her she there been one all we their has would"
    " when if so no will can more about them some out into time only could new other than"
    " first these then may any like now my its over also after most made did many before"
    " must through back years where much your way well down should because each just those"
    " people how too little state good very make world still own see men work long here"
).split()


def prompt_text(words: int, index: int) -> str:
    """A prompt of `words` common words (about one token each), distinct per `index`."""
    size = len(_WORDS)
    start = (index * 7919) % size
    body = [_WORDS[(start + i * 13) % size] for i in range(max(0, words - 2))]
    return f"Request {index}: " + " ".join(body)
