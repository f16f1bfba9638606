"""The quota contract, run against both stores: in-process memory, a real redis-server and a
real Redis Cluster."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from billing.idempotency import Claim, IdempotencyConflict
from billing.quota import (
    MAX_BALANCE_NANOS,
    Admission,
    AdmitRequest,
    FailOpenQuotaStore,
    Limits,
    MemoryQuotaStore,
    QuotaConfig,
    QuotaExceeded,
    QuotaStore,
    RedisQuotaStore,
    Scope,
    build_quota_store,
    format_reset,
)
from billing.quota.plan import periods

RESERVATION_TTL_S = 60
# These tests are about what the stores decide, not how fast Redis answers: a deadline well
# past a shared host's stalls (the default 250 ms once timed out a read on a loaded CI host).
TIMEOUT_MS = 5_000
NOW = datetime(2025, 6, 10, 12, 0, 0, tzinfo=UTC)
_ids = itertools.count()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    if request.param == "memory":
        quota: QuotaStore = MemoryQuotaStore(reservation_ttl_s=RESERVATION_TTL_S)
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        quota = RedisQuotaStore(url, reservation_ttl_s=RESERVATION_TTL_S, timeout_ms=TIMEOUT_MS)
    else:  # a Redis Cluster of three masters (keys hash-tagged by tenant)
        cluster = request.getfixturevalue("redis_cluster")
        await asyncio.to_thread(cluster.wait_healthy)
        await asyncio.to_thread(cluster.flush)
        quota = RedisQuotaStore(
            cluster.url, reservation_ttl_s=RESERVATION_TTL_S, cluster=True, timeout_ms=TIMEOUT_MS
        )
    yield quota
    await quota.aclose()


def ask(*scopes: Scope, **fields: object) -> AdmitRequest:
    values: dict[str, object] = {
        "request_id": f"req-{next(_ids)}",
        "scopes": list(scopes),
        "prompt_tokens": 100,
        "max_tokens": 100,
        "now": NOW,
    }
    values.update(fields)
    return AdmitRequest(**values)  # type: ignore[arg-type]


def tenant(**limits: int) -> Scope:
    return Scope("tenant:acme", Limits(**limits))


async def refused(store: QuotaStore, req: AdmitRequest) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as caught:
        await store.admit(req)
    return caught.value


# ---- admission, settlement, balance -------------------------------------------------------


async def test_admit_reserves_worst_case_and_settle_charges_actual(store: QuotaStore) -> None:
    scope = tenant(tokens_per_day=10_000)
    await store.set_balance("acme", 1_000_000)
    req = ask(scope, input_cost_nanos=1_000, output_price_nanos=20, balance_account="acme")

    admission = await store.admit(req)

    assert admission.granted_max_tokens == 100
    assert admission.reserved_tokens == 200
    assert admission.reserved_nanos == 1_000 + 100 * 20
    assert (await store.remaining(scope, NOW))["tokens_per_day"] == 9_800
    # Reservations hold money without spending it.
    assert await store.balance("acme") == 1_000_000

    await store.settle(admission, used_tokens=130, cost_nanos=1_600)

    assert (await store.remaining(scope, NOW))["tokens_per_day"] == 9_870
    assert await store.balance("acme") == 998_400


async def test_settle_is_idempotent(store: QuotaStore) -> None:
    scope = tenant(tokens_per_day=10_000)
    await store.set_balance("acme", 100_000)
    admission = await store.admit(
        ask(scope, input_cost_nanos=100, output_price_nanos=10, balance_account="acme")
    )
    for _ in range(3):
        await store.settle(admission, used_tokens=150, cost_nanos=600)
    assert await store.balance("acme") == 99_400
    assert (await store.remaining(scope, NOW))["tokens_per_day"] == 9_850


async def test_topup_and_initial_balance(store: QuotaStore) -> None:
    assert await store.balance("acme") is None
    await store.set_balance("acme", 500)
    await store.set_balance("acme", 9_999)  # only an unknown account takes the initial balance
    assert await store.balance("acme") == 500
    assert await store.topup("acme", 1_500) == 2_000
    assert await store.balance("acme") == 2_000
    with pytest.raises(ValueError):
        await store.topup("acme", 0)


async def test_a_top_up_cannot_take_a_balance_past_the_largest(store: QuotaStore) -> None:
    await store.set_balance("acme", MAX_BALANCE_NANOS - 10)
    with pytest.raises(ValueError, match="cannot exceed"):
        await store.topup("acme", 11)
    assert await store.balance("acme") == MAX_BALANCE_NANOS - 10  # nothing was added
    assert await store.topup("acme", 10) == MAX_BALANCE_NANOS


async def test_clamps_max_tokens_to_the_token_budget(store: QuotaStore) -> None:
    scope = tenant(tokens_per_day=1_000)
    admission = await store.admit(ask(scope, prompt_tokens=100, max_tokens=2_000))
    assert admission.granted_max_tokens == 900
    assert (await store.remaining(scope, NOW))["tokens_per_day"] == 0


async def test_clamps_max_tokens_to_what_the_balance_pays_for(store: QuotaStore) -> None:
    await store.set_balance("acme", 1_000 + 50 * 20 + 19)
    admission = await store.admit(
        ask(
            tenant(),
            max_tokens=4_096,
            input_cost_nanos=1_000,
            output_price_nanos=20,
            balance_account="acme",
        )
    )
    assert admission.granted_max_tokens == 50
    assert admission.reserved_nanos == 2_000


async def test_refuses_when_nothing_fits_and_reserves_nothing(store: QuotaStore) -> None:
    key = Scope("key:k1", Limits(rpm=10, tokens_per_day=100_000))
    team = tenant(tokens_per_day=150)
    error = await refused(store, ask(key, team, prompt_tokens=150, max_tokens=10))

    assert error.kind == "insufficient_quota"
    assert error.reason == "tokens_per_day"
    assert error.scope == "tenant:acme"
    assert "Daily token budget" in error.message and "150" in error.message
    assert error.retry_after_s is None
    assert error.headers["x-ratelimit-remaining-tokens"] == "150"
    # The key scope was not charged for the refused request: one atomic step.
    assert await store.remaining(key, NOW) == {
        "rpm": 10,
        "tpm": None,
        "max_concurrent": None,
        "tokens_per_day": 100_000,
        "tokens_per_month": None,
    }


async def test_refuses_an_exhausted_balance_as_insufficient_quota(store: QuotaStore) -> None:
    await store.set_balance("acme", 1_019)
    req = ask(tenant(), input_cost_nanos=1_000, output_price_nanos=20, balance_account="acme")
    error = await refused(store, req)
    assert (error.kind, error.reason) == ("insufficient_quota", "balance")
    assert "0.000001019" in error.message and "Top up" in error.message

    nobody = Scope("tenant:nobody", Limits())
    unknown = ask(nobody, input_cost_nanos=1, output_price_nanos=1, balance_account="nobody")
    assert (await refused(store, unknown)).reason == "balance"


async def test_embeddings_need_no_output_tokens(store: QuotaStore) -> None:
    await store.set_balance("acme", 1_000)
    req = ask(
        tenant(tokens_per_day=100),
        max_tokens=0,
        min_tokens=0,
        input_cost_nanos=1_000,
        output_price_nanos=20,
        balance_account="acme",
    )
    admission = await store.admit(req)
    assert admission.granted_max_tokens == 0
    assert admission.reserved_nanos == 1_000


# ---- rate limits ------------------------------------------------------------------------


async def test_requests_per_minute_sliding_window(store: QuotaStore) -> None:
    scope = tenant(rpm=3)
    for second in (45, 50, 55):
        admission = await store.admit(ask(scope, now=NOW + timedelta(seconds=second)))
        await store.settle(admission, 150, 0)
    assert admission.headers["x-ratelimit-limit-requests"] == "3"
    assert admission.headers["x-ratelimit-remaining-requests"] == "0"
    # The oldest request (12:00:45) leaves the window at 12:01:46, 51 s after 12:00:55.
    assert admission.headers["x-ratelimit-reset-requests"] == "51s"

    error = await refused(store, ask(scope, now=NOW + timedelta(seconds=59)))
    assert (error.kind, error.reason) == ("rate_limit", "rpm")
    assert error.retry_after_s == 47.0
    assert "Please try again in 47s" in error.message

    # A new clock minute frees nothing: the last 60 seconds still hold three requests.
    await refused(store, ask(scope, now=NOW + timedelta(minutes=1)))
    await refused(store, ask(scope, now=NOW + timedelta(seconds=105, milliseconds=999)))
    await store.admit(ask(scope, now=NOW + timedelta(seconds=106)))
    error = await refused(store, ask(scope, now=NOW + timedelta(seconds=106)))
    assert error.retry_after_s == 5.0  # 12:00:50 leaves at 12:01:51


@pytest.mark.parametrize("limit", [1, 7])
async def test_no_sixty_second_span_admits_more_than_the_limit(
    store: QuotaStore, limit: int
) -> None:
    """3x the limit fired across a minute boundary, at random moments: in no 60 s span,
    wherever it starts, are more than `limit` requests admitted."""
    scope = Scope(f"tenant:span-{limit}", Limits(rpm=limit))
    rng = random.Random(limit)
    start = NOW + timedelta(seconds=30)
    offsets = [*(rng.uniform(0, 90) for _ in range(3 * limit)), 29.999, 30.0, 59.999, 60.0]
    admitted: list[float] = []
    for offset in sorted(offsets):
        try:
            await store.admit(ask(scope, now=start + timedelta(seconds=offset)))
        except QuotaExceeded:
            continue
        admitted.append(offset)
    assert admitted
    for first in admitted:
        assert sum(1 for t in admitted if first <= t < first + 60) <= limit


async def test_tokens_per_minute_corrected_at_settle(store: QuotaStore) -> None:
    scope = tenant(tpm=500)
    first = await store.admit(ask(scope))  # reserves 200
    second = await store.admit(ask(scope))  # reserves 200
    assert second.headers["x-ratelimit-remaining-tokens"] == "100"
    error = await refused(store, ask(scope, prompt_tokens=150, max_tokens=100))
    assert (error.kind, error.reason) == ("rate_limit", "tpm")
    assert error.retry_after_s == 61.0  # when the 400 reserved at 12:00:00.000 leave the window

    await store.settle(first, used_tokens=110, cost_nanos=0)  # releases 90
    clamped = await store.admit(ask(scope, prompt_tokens=150, max_tokens=100))
    assert clamped.granted_max_tokens == 40  # 500 - 110 - 200 - 150

    too_big = await refused(store, ask(scope, now=NOW + timedelta(minutes=1), prompt_tokens=600))
    assert too_big.reason == "tpm" and too_big.retry_after_s is None
    assert "Request too large" in too_big.message


async def test_tokens_per_minute_roll_across_a_clock_minute(store: QuotaStore) -> None:
    scope = tenant(tpm=500)
    first = await store.admit(ask(scope, now=NOW + timedelta(seconds=59.5)))  # reserves 200
    await store.settle(first, used_tokens=150, cost_nanos=0)  # the window keeps 150
    later = NOW + timedelta(seconds=60.5)  # a new clock minute, the same 60 s
    clamped = await store.admit(ask(scope, now=later, max_tokens=300))
    assert clamped.granted_max_tokens == 250  # 500 - 150 - 100 prompt
    assert clamped.headers["x-ratelimit-remaining-tokens"] == "0"
    assert clamped.headers["x-ratelimit-reset-tokens"] == "1m0s"  # 12:00:59 leaves at 12:02:00
    error = await refused(store, ask(scope, now=later))
    assert error.reason == "tpm" and error.retry_after_s == 59.5
    await store.admit(ask(scope, now=NOW + timedelta(seconds=120)))  # the first one has left


async def test_an_expired_reservation_leaves_the_rolling_window(store: QuotaStore) -> None:
    scope = tenant(tpm=1_000)
    await store.admit(ask(scope))  # reserves 200 at 12:00:00, never settled (a crash)
    settled = await store.admit(ask(scope, now=NOW + timedelta(seconds=1)))
    await store.settle(settled, used_tokens=150, cost_nanos=0)
    # 12:01:00.5: the reservation expired (RESERVATION_TTL_S) but its bucket is still in the
    # window; only the settled 150 count.
    later = NOW + timedelta(seconds=RESERVATION_TTL_S, milliseconds=500)
    admission = await store.admit(ask(scope, now=later, max_tokens=900))
    assert admission.granted_max_tokens == 750  # 1000 - 150 - 100 prompt
    assert (await store.remaining(scope, later))["tpm"] == 0


async def test_concurrent_requests_limit(store: QuotaStore) -> None:
    scope = tenant(max_concurrent=2)
    first = await store.admit(ask(scope))
    await store.admit(ask(scope))
    error = await refused(store, ask(scope))
    assert (error.kind, error.reason) == ("rate_limit", "concurrency")
    assert (await store.remaining(scope, NOW))["max_concurrent"] == 0

    await store.settle(first, 150, 0)
    await store.admit(ask(scope))


async def test_budget_refusal_is_reported_before_rate_limits(store: QuotaStore) -> None:
    scope = tenant(rpm=1, tokens_per_month=1_000)
    await store.admit(ask(scope, max_tokens=900))
    error = await refused(store, ask(scope))
    assert (error.kind, error.reason) == ("insufficient_quota", "tokens_per_month")


# ---- crashed requests --------------------------------------------------------------------


async def test_reservations_of_crashed_requests_expire(store: QuotaStore) -> None:
    scope = tenant(max_concurrent=1, tokens_per_day=1_000)
    await store.set_balance("acme", 3_000)
    paid = {"input_cost_nanos": 1_000, "output_price_nanos": 20, "balance_account": "acme"}
    crashed = await store.admit(ask(scope, **paid))  # never settled: its gateway died

    still_held = await refused(store, ask(scope, now=NOW + timedelta(seconds=30), **paid))
    assert still_held.reason in ("concurrency", "balance")

    later = NOW + timedelta(seconds=RESERVATION_TTL_S)
    admission = await store.admit(ask(scope, now=later, **paid))
    assert admission.granted_max_tokens == 100  # the whole balance and budget are free again
    assert (await store.remaining(scope, later))["tokens_per_day"] == 800

    # A settle that arrives after the reservation expired still charges what was used.
    await store.settle(crashed, used_tokens=120, cost_nanos=1_400)
    assert await store.balance("acme") == 1_600
    assert (await store.remaining(scope, later))["tokens_per_day"] == 680


# ---- calendar periods in the scope's time zone ---------------------------------------------


async def test_daily_budget_follows_new_york_days_across_dst(store: QuotaStore) -> None:
    scope = Scope("tenant:ny", Limits(tokens_per_day=300), timezone="America/New_York")
    # 2025-03-09 is a 23-hour day in New York: 05:00Z to 04:00Z the next day.
    first = await store.admit(ask(scope, max_tokens=200, now=datetime(2025, 3, 9, 5, tzinfo=UTC)))
    await store.settle(first, used_tokens=300, cost_nanos=0)
    same_day = datetime(2025, 3, 10, 3, 59, 59, tzinfo=UTC)
    error = await refused(store, ask(scope, now=same_day))
    assert error.reason == "tokens_per_day"
    assert "resets in 1s" in error.message
    assert error.headers["x-ratelimit-reset-tokens"] == "1s"

    await store.admit(ask(scope, max_tokens=200, now=datetime(2025, 3, 10, 4, 0, tzinfo=UTC)))
    # The day before the change was still on standard time: it ended at 05:00Z.
    before = datetime(2025, 3, 9, 4, 59, 59, tzinfo=UTC)
    await store.admit(ask(scope, max_tokens=200, now=before))


async def test_monthly_budget_follows_shanghai_month_end(store: QuotaStore) -> None:
    scope = Scope("tenant:sh", Limits(tokens_per_month=300), timezone="Asia/Shanghai")
    # 2025-01-31 23:59:59 in Shanghai is 15:59:59Z; February starts at 16:00Z.
    january_last = datetime(2025, 1, 31, 15, 59, 59, tzinfo=UTC)
    await store.settle(await store.admit(ask(scope, max_tokens=200, now=january_last)), 300, 0)
    assert (await refused(store, ask(scope, now=january_last))).reason == "tokens_per_month"
    february_first = datetime(2025, 1, 31, 16, 0, 0, tzinfo=UTC)
    admission = await store.admit(ask(scope, max_tokens=200, now=february_first))
    assert admission.headers["x-ratelimit-reset-tokens"] == "672h0m0s"  # 28 days of February


def test_periods_are_calendar_aligned_in_the_zone() -> None:
    p = periods(datetime(2025, 11, 2, 4, 30, tzinfo=UTC), "America/New_York")
    assert p.day == "2025-11-02"  # 00:30 EDT
    assert p.day_reset_ms == 24.5 * 3_600_000  # a 25-hour day: DST ends at 02:00 local
    assert p.month == "2025-11"
    q = periods(datetime(2024, 12, 31, 16, 0, tzinfo=UTC), "Asia/Shanghai")
    assert (q.day, q.month) == ("2025-01-01", "2025-01")


def test_reset_format_matches_openai() -> None:
    assert format_reset(20) == "20ms"
    assert format_reset(1_000) == "1s"
    assert format_reset(1_200) == "2s"
    assert format_reset(360_000) == "6m0s"
    assert format_reset(3_723_000) == "1h2m3s"


# ---- concurrency: admission and spending are one atomic step ---------------------------------


PROMPT, MAX_OUT, INPUT_COST, OUT_PRICE = 100, 100, 1_000, 20
WORST_CASE = INPUT_COST + MAX_OUT * OUT_PRICE


async def test_200_concurrent_admissions_fund_exactly_50(store: QuotaStore) -> None:
    budget = 50 * WORST_CASE
    await store.set_balance("acme", budget)
    scope = tenant(tokens_per_day=50 * (PROMPT + MAX_OUT))

    async def one() -> Admission | QuotaExceeded:
        try:
            return await store.admit(paid_request(scope))
        except QuotaExceeded as exc:
            return exc

    outcomes = await asyncio.gather(*(one() for _ in range(200)))
    admitted = [o for o in outcomes if isinstance(o, Admission)]
    assert len(admitted) == 50
    assert all(a.granted_max_tokens == MAX_OUT for a in admitted)
    assert {o.kind for o in outcomes if isinstance(o, QuotaExceeded)} == {"insufficient_quota"}
    for admission in admitted:
        await store.settle(admission, PROMPT + MAX_OUT, WORST_CASE)
    assert await store.balance("acme") == 0


async def test_200_concurrent_requests_never_overspend(store: QuotaStore) -> None:
    budget = 50 * WORST_CASE
    await store.set_balance("acme", budget)
    day_budget = 50 * (PROMPT + MAX_OUT)
    scope = tenant(tokens_per_day=day_budget)
    rng = random.Random(7)

    async def one() -> tuple[int, int] | None:
        try:
            admission = await store.admit(paid_request(scope))
        except QuotaExceeded:
            return None
        await asyncio.sleep(rng.random() / 100)
        output = rng.randint(0, admission.granted_max_tokens)
        cost = INPUT_COST + output * OUT_PRICE
        await store.settle(admission, PROMPT + output, cost)
        return PROMPT + output, cost

    results = [r for r in await asyncio.gather(*(one() for _ in range(200))) if r]
    billed = sum(cost for _, cost in results)
    assert len(results) >= 50
    assert billed <= budget
    # The balance moved by exactly what the admitted requests used: none was billed less.
    assert await store.balance("acme") == budget - billed
    used = sum(tokens for tokens, _ in results)
    assert used <= day_budget
    assert (await store.remaining(scope, NOW))["tokens_per_day"] == day_budget - used


def paid_request(scope: Scope) -> AdmitRequest:
    return ask(
        scope,
        prompt_tokens=PROMPT,
        max_tokens=MAX_OUT,
        input_cost_nanos=INPUT_COST,
        output_price_nanos=OUT_PRICE,
        balance_account="acme",
    )


def test_build_quota_store_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(build_quota_store(QuotaConfig()), MemoryQuotaStore)
    monkeypatch.delenv("MAAS_REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="no URL is configured"):
        build_quota_store(QuotaConfig(backend="redis"))
    monkeypatch.setenv("MAAS_REDIS_URL", "redis://127.0.0.1:1/0")
    closed = build_quota_store(QuotaConfig(backend="redis", redis_url="redis://127.0.0.1:2/0"))
    assert isinstance(closed, RedisQuotaStore) and closed.url == "redis://127.0.0.1:1/0"
    opened = build_quota_store(QuotaConfig(backend="redis", on_unavailable="open"))
    assert isinstance(opened, FailOpenQuotaStore)


def test_build_a_cluster_store_from_config() -> None:
    config = QuotaConfig(
        backend="redis",
        redis_url="redis://127.0.0.1:7000/0",
        redis_url_env=None,
        redis_cluster=True,
        redis_cluster_nodes=["127.0.0.1:7001"],
        on_unavailable="open",
    )
    store = build_quota_store(config)
    assert isinstance(store, FailOpenQuotaStore) and isinstance(store.primary, RedisQuotaStore)
    assert store.primary.cluster and store.fallback.planner.tagged  # the same key names
    with pytest.raises(ValueError, match="braces"):
        QuotaConfig(backend="redis", redis_cluster=True, key_prefix="q:{x}:")


async def test_a_keyed_top_up_applies_once_and_a_keyed_write_replays(store: QuotaStore) -> None:
    await store.set_balance("acme", 1_000)
    claim = Claim("topup-1", "fingerprint-a")
    assert await store.topup_once("acme", 500, claim) == (1_500, False)
    assert await store.topup_once("acme", 500, claim) == (1_500, True)  # replayed, not added
    with pytest.raises(IdempotencyConflict):
        await store.topup_once("acme", 500, Claim("topup-1", "fingerprint-b"))
    assert await store.balance("acme") == 1_500

    write = Claim("create-1", "fingerprint-c")
    assert await store.idempotency_begin(write) is None  # go ahead
    with pytest.raises(IdempotencyConflict):
        await store.idempotency_begin(write)  # still running
    await store.idempotency_finish(write, 201, '{"id": "k1"}')
    stored = await store.idempotency_begin(write)
    assert stored is not None and (stored.s, stored.b) == (201, '{"id": "k1"}')
    failed = Claim("create-2", "fingerprint-d")
    assert await store.idempotency_begin(failed) is None
    await store.idempotency_abandon(failed)
    assert await store.idempotency_begin(failed) is None  # free again after a failure
