"""The Redis quota store across gateway processes, and when Redis dies, hangs and returns."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from billing.quota import (
    Admission,
    AdmitRequest,
    Limits,
    QuotaConfig,
    QuotaExceeded,
    QuotaStore,
    QuotaUnavailable,
    RedisQuotaStore,
    Scope,
    build_quota_store,
)
from tests.fixtures.redis_server import RedisServer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 6, 10, 12, 0, 0, tzinfo=UTC)
PROMPT, MAX_OUT, INPUT_COST, OUT_PRICE = 100, 100, 1_000, 20
WORST_CASE = INPUT_COST + MAX_OUT * OUT_PRICE


# ---- a gateway process: fires admits (and settles) at a shared Redis ------------------------


async def _gateway_process(config: dict[str, Any]) -> list[list[int]]:
    store = RedisQuotaStore(config["url"], reservation_ttl_s=600, timeout_ms=2_000)
    control = redis.asyncio.Redis.from_url(config["url"])
    scope = Scope("tenant:acme", Limits(**config["limits"]))
    rng = random.Random(config["name"])
    await control.incr("test:ready")
    await eventually(lambda: control.get("test:go"), interval_s=0.002)

    async def one(index: int) -> list[int] | None:
        req = AdmitRequest(
            request_id=f"{config['name']}-{index}",
            scopes=[scope],
            prompt_tokens=PROMPT,
            max_tokens=MAX_OUT,
            input_cost_nanos=INPUT_COST,
            output_price_nanos=OUT_PRICE,
            balance_account=config.get("account"),
            now=datetime.fromisoformat(config["now"]),
        )
        try:
            admission = await store.admit(req)
        except QuotaExceeded:
            return None
        output = admission.granted_max_tokens
        if config["settle"]:
            await asyncio.sleep(rng.random() / 100)
            output = rng.randint(0, admission.granted_max_tokens)
            await store.settle(admission, PROMPT + output, INPUT_COST + output * OUT_PRICE)
        return [PROMPT + output, INPUT_COST + output * OUT_PRICE]

    outcomes = await asyncio.gather(*(one(i) for i in range(config["requests"])))
    await store.aclose()
    await control.aclose()
    return [o for o in outcomes if o is not None]


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout_s: float = 30, interval_s: float = 0.01
) -> None:
    """Wait until `check()` is truthy (state owned by another process or task)."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - polling state we do not own
            await asyncio.sleep(interval_s)


def gateway_process_main(argv: list[str]) -> None:
    """Entry point of a worker process: prints the admitted requests' [tokens, cost]."""
    print(json.dumps(asyncio.run(_gateway_process(json.loads(argv[0])))))


async def run_gateways(url: str, processes: int = 2, **config: Any) -> list[list[int]]:
    """Start `processes` gateway processes, release them at once, gather what they admitted."""
    control = redis.asyncio.Redis.from_url(url)
    code = (
        "import sys; from tests.test_quota_redis import gateway_process_main as m; m(sys.argv[1:])"
    )
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            json.dumps({"url": url, "name": f"gw{n}", "now": NOW.isoformat(), **config}),
            cwd=PROJECT_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for n in range(processes)
    ]
    try:

        async def all_ready() -> bool:
            return int(await control.get("test:ready") or 0) >= processes

        await eventually(all_ready)
        await control.set("test:go", 1)
        async with asyncio.timeout(60):
            outputs = [await worker.communicate() for worker in workers]
    finally:
        await control.aclose()
    admitted: list[list[int]] = []
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err.decode()
        admitted += json.loads(out)
    return admitted


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisQuotaStore]:
    quota = RedisQuotaStore(redis_url)
    yield quota
    await quota.aclose()


async def test_two_processes_never_overspend_a_budget_for_50(
    redis_url: str, store: RedisQuotaStore
) -> None:
    budget, day_budget = 50 * WORST_CASE, 50 * (PROMPT + MAX_OUT)
    await store.set_balance("acme", budget)
    limits = {"tokens_per_day": day_budget}

    admitted = await run_gateways(
        redis_url, requests=100, settle=True, account="acme", limits=limits
    )

    billed = sum(cost for _, cost in admitted)
    used = sum(tokens for tokens, _ in admitted)
    assert len(admitted) >= 50
    assert billed <= budget and used <= day_budget
    assert await store.balance("acme") == budget - billed  # each billed exactly what it used
    scope = Scope("tenant:acme", Limits(**limits))
    assert (await store.remaining(scope, NOW))["tokens_per_day"] == day_budget - used


async def test_two_processes_admit_exactly_the_50_that_are_funded(
    redis_url: str, store: RedisQuotaStore
) -> None:
    await store.set_balance("acme", 50 * WORST_CASE)
    admitted = await run_gateways(redis_url, requests=100, settle=False, account="acme", limits={})
    assert len(admitted) == 50
    assert all(tokens == PROMPT + MAX_OUT for tokens, _ in admitted)


async def test_requests_per_minute_hold_across_two_processes(redis_url: str) -> None:
    admitted = await run_gateways(redis_url, requests=40, settle=True, limits={"rpm": 30})
    assert len(admitted) == 30


async def test_tokens_per_minute_hold_across_two_processes(
    redis_url: str, store: RedisQuotaStore
) -> None:
    admitted = await run_gateways(redis_url, requests=40, settle=True, limits={"tpm": 3_000})
    used = sum(tokens for tokens, _ in admitted)
    assert len(admitted) >= 3_000 // (PROMPT + MAX_OUT)
    assert used <= 3_000
    scope = Scope("tenant:acme", Limits(tpm=3_000))
    assert (await store.remaining(scope, NOW))["tpm"] == 3_000 - used


# ---- Redis dies, hangs and comes back ---------------------------------------------------------


def ask(scope: Scope, **fields: Any) -> AdmitRequest:
    values: dict[str, Any] = {
        "request_id": f"r-{time.monotonic_ns()}-{random.random()}",
        "scopes": [scope],
        "prompt_tokens": PROMPT,
        "max_tokens": MAX_OUT,
        "now": datetime.now(UTC),
    }
    values.update(fields)
    return AdmitRequest(**values)


async def test_killing_redis_fails_closed_and_recovers_without_restart(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisQuotaStore(redis_url, timeout_ms=200, retry_interval_ms=100)
    scope = Scope("tenant:acme", Limits(rpm=1_000_000, tokens_per_day=10**12))
    outcomes: list[tuple[float, str, float]] = []  # (started, outcome, seconds)
    running = True

    async def gateway_traffic() -> None:
        while running:
            started = time.monotonic()
            try:
                admission = await store.admit(ask(scope))
                await store.settle(admission, PROMPT + 10, 0)
                outcome = "ok"
            except QuotaUnavailable:
                outcome = "unavailable"
            outcomes.append((started, outcome, time.monotonic() - started))
            await asyncio.sleep(0.005)

    traffic = [asyncio.create_task(gateway_traffic()) for _ in range(20)]
    try:
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        redis_server.stop()
        await asyncio.sleep(0.7)
        await asyncio.to_thread(redis_server.start)
        back_at = time.monotonic()
        await asyncio.sleep(1.0)
    finally:
        running = False
        await asyncio.gather(*traffic)
        redis_server.start()

    during = [o for started, o, _ in outcomes if killed_at + 0.05 < started < back_at - 0.05]
    after = [o for started, o, _ in outcomes if started > back_at + 0.7]
    assert during and set(during) == {"unavailable"}  # clean refusals, no other errors
    assert after and set(after) == {"ok"}  # recovered by itself, same store object
    assert max(seconds for _, _, seconds in outcomes) < 1.0  # never hung
    assert store.pending_settles == 0
    await store.aclose()


async def test_a_hung_redis_gives_unavailable_within_the_timeout(redis_url: str) -> None:
    store = RedisQuotaStore(redis_url, timeout_ms=150, retry_interval_ms=0)
    scope = Scope("tenant:acme", Limits(rpm=100))
    await store.admit(ask(scope))
    pause(redis_url, 1_500)
    started = time.monotonic()
    with pytest.raises(QuotaUnavailable, match="unreachable"):
        await store.admit(ask(scope))
    assert time.monotonic() - started < 0.6
    await asyncio.sleep(1.6)
    await store.admit(ask(scope))
    await store.aclose()


def fail_open_store(redis_url: str, timeout_ms: int) -> QuotaStore:
    """Redis, falling back to the in-process store while Redis does not answer."""
    return build_quota_store(
        QuotaConfig(
            backend="redis",
            redis_url=redis_url,
            redis_url_env=None,
            on_unavailable="open",
            timeout_ms=timeout_ms,
            retry_interval_ms=100,
        )
    )


async def test_fail_open_serves_from_memory_and_replays_into_redis(redis_url: str) -> None:
    store = fail_open_store(redis_url, timeout_ms=100)
    scope = Scope("tenant:acme", Limits(rpm=3))
    paid = {
        "now": NOW,
        "input_cost_nanos": INPUT_COST,
        "output_price_nanos": OUT_PRICE,
        "balance_account": "acme",
    }
    await store.set_balance("acme", 1_000_000)
    first = await store.admit(ask(scope, **paid))
    assert first.backend == "redis"
    await store.settle(first, PROMPT + 50, 2_000)

    pause(redis_url, 1_500)
    served: list[Admission] = [await store.admit(ask(scope, **paid)) for _ in range(3)]
    assert [a.backend for a in served] == ["fallback"] * 3
    # The fallback still enforces limits, per process and from an empty state.
    with pytest.raises(QuotaExceeded):
        await store.admit(ask(scope, **paid))
    for admission in served:
        await store.settle(admission, PROMPT + 10, 1_200)

    async with asyncio.timeout(5):
        while True:
            try:
                admission = await store.admit(ask(scope, **paid))
            except QuotaExceeded:
                await asyncio.sleep(0.05)
                continue
            if admission.backend == "redis":
                break
            await store.settle(admission, PROMPT, 0)
            await asyncio.sleep(0.05)
    primary = store.primary  # type: ignore[attr-defined]

    async def replayed() -> bool:
        return primary.pending_settles == 0

    await eventually(replayed)
    # What was spent while Redis hung has been charged to the shared balance.
    assert await store.balance("acme") == 1_000_000 - 2_000 - 3 * 1_200
    await store.aclose()


def pause(url: str, milliseconds: int) -> None:
    """Make Redis stop answering every client for a while, keeping its data."""
    with redis.Redis.from_url(url) as client:
        client.client_pause(milliseconds, all=True)


# ---- initial balances while Redis is away ----------------------------------------------------


async def test_initial_balance_waits_for_redis_and_is_written_before_anything_else(
    redis_server: RedisServer, redis_url: str
) -> None:
    """A gateway starting with Redis down opens its prepaid accounts once Redis is back, before
    its first admission there; a later start (a restart, a replica) never resets them."""
    paid = {"input_cost_nanos": INPUT_COST, "output_price_nanos": OUT_PRICE}
    scope = Scope("tenant:acme", Limits(rpm=1_000))
    redis_server.stop()
    try:
        store = RedisQuotaStore(redis_url, timeout_ms=200, retry_interval_ms=100)
        await store.set_balance("acme", 10 * WORST_CASE)  # does not raise: kept for later
        assert store.pending_openings == 1
        with pytest.raises(QuotaUnavailable):
            await store.admit(ask(scope, balance_account="acme", **paid))
    finally:
        redis_server.start()
    await asyncio.sleep(0.15)  # past the fail-fast interval

    admission = await store.admit(ask(scope, balance_account="acme", **paid))
    assert admission.granted_max_tokens == MAX_OUT  # the balance was there before the admission
    assert store.pending_openings == 0
    await store.settle(admission, PROMPT + 40, INPUT_COST + 40 * OUT_PRICE)
    spent = INPUT_COST + 40 * OUT_PRICE
    assert await store.balance("acme") == 10 * WORST_CASE - spent

    replica = RedisQuotaStore(redis_url)
    await replica.set_balance("acme", 10 * WORST_CASE)
    assert await replica.balance("acme") == 10 * WORST_CASE - spent  # not reset
    await replica.aclose()
    await store.aclose()


async def test_fail_open_from_the_start_replays_spending_into_the_opened_account(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Failing open with Redis down since start-up: what was spent meanwhile is charged to the
    initial balance once Redis answers (the account is opened before the settles replay)."""
    store = fail_open_store(redis_url, timeout_ms=200)
    paid = {"input_cost_nanos": INPUT_COST, "output_price_nanos": OUT_PRICE}
    scope = Scope("tenant:acme", Limits(rpm=1_000))
    redis_server.stop()
    try:
        await store.set_balance("acme", 1_000_000)
        served = [await store.admit(ask(scope, balance_account="acme", **paid)) for _ in range(3)]
        assert [a.backend for a in served] == ["fallback"] * 3
        for admission in served:
            await store.settle(admission, PROMPT + 10, 1_200)
    finally:
        redis_server.start()
    await asyncio.sleep(0.15)

    after = await store.admit(ask(scope, balance_account="acme", **paid))
    assert after.backend == "redis"
    await store.settle(after, PROMPT, 1_000)
    primary = store.primary  # type: ignore[attr-defined]

    async def replayed() -> bool:
        return primary.pending_settles == 0

    await eventually(replayed)
    assert await store.balance("acme") == 1_000_000 - 3 * 1_200 - 1_000
    await store.aclose()


# ---- settles sent without waiting --------------------------------------------------------------


async def test_a_settle_sent_without_waiting_charges_what_an_awaited_one_does(
    redis_url: str,
) -> None:
    """The relay sends settles on the pipelined connection and answers at once; Redis ends
    up where awaited settles leave it."""
    paid = {"input_cost_nanos": INPUT_COST, "output_price_nanos": OUT_PRICE}
    balances = []
    for account, soon in (("awaited", False), ("soon", True)):
        store = RedisQuotaStore(redis_url)
        scope = Scope(f"tenant:{account}", Limits(tokens_per_day=10_000))
        await store.set_balance(account, 1_000_000)
        for used in range(10):
            admission = await store.admit(ask(scope, balance_account=account, **paid))
            if soon:
                assert store.settle_soon(admission, PROMPT + used, 1_000 + used)
            else:
                await store.settle(admission, PROMPT + used, 1_000 + used)
        await store.aclose()  # answers the settles in flight first
        store = RedisQuotaStore(redis_url)
        left = await store.remaining(scope, datetime.now(UTC))
        balances.append((await store.balance(account), left["tokens_per_day"]))
        await store.aclose()
    assert balances[0] == balances[1] == (1_000_000 - 10 * 1_000 - 45, 10_000 - 10 * PROMPT - 45)


async def test_a_settle_redis_does_not_answer_is_queued_and_replayed(redis_url: str) -> None:
    store = RedisQuotaStore(redis_url, timeout_ms=150, retry_interval_ms=100)
    scope = Scope("tenant:paused", Limits(tokens_per_day=10_000))
    await store.set_balance("paused", 1_000_000)
    paid = {"input_cost_nanos": INPUT_COST, "output_price_nanos": OUT_PRICE}
    admission = await store.admit(ask(scope, balance_account="paused", **paid))
    pause(redis_url, 600)
    assert store.settle_soon(admission, PROMPT + 5, 1_234)  # sent; Redis does not answer

    async def queued() -> bool:
        return store.pending_settles == 1

    await eventually(queued)
    # Marked unreachable: the next one is not sent this way (the relay awaits `settle`).
    assert not store.settle_soon(admission, PROMPT + 5, 1_234)
    await asyncio.sleep(0.7)
    with pytest.raises(QuotaExceeded):  # any call that reaches Redis replays the queue
        await store.admit(ask(scope, balance_account="paused", max_tokens=10**9, min_tokens=10**9))

    async def replayed() -> bool:
        return store.pending_settles == 0

    await eventually(replayed)
    assert await store.balance("paused") == 1_000_000 - 1_234  # charged once
    await store.aclose()
