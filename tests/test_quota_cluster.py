"""The Redis quota store on a real Redis Cluster (three masters, three replicas): one request's
scripts touch one slot, concurrent spending never overshoots, a master killed mid-traffic
fails over to its replica with quick 503s (or fail-open 200s) and recovery by itself, and a
slot moved to another master (ASK, TRYAGAIN, then MOVED) loses and double-charges nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from billing.quota import (
    AdmitRequest,
    Limits,
    QuotaConfig,
    QuotaExceeded,
    QuotaUnavailable,
    RedisQuotaStore,
    Scope,
    build_quota_store,
)
from tests.fixtures.redis_cluster import RedisClusterServers
from tests.test_quota_gateway import (
    FULL_MODEL,
    LATENCY_BOUND_S,
    GatewayProcess,
    Reply,
    assert_openai_error,
    chat,
    fleet_config,
    gateway_processes,
    http_client,
    tenant,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 6, 10, 12, 0, 0, tzinfo=UTC)
PROMPT, MAX_OUT, INPUT_COST, OUT_PRICE = 100, 100, 1_000, 20
WORST_CASE = INPUT_COST + MAX_OUT * OUT_PRICE
FUNDED = 50
"""Each tenant's balance and daily budget pay for this many worst-case requests."""
CONCURRENT = 300
"""Requests in flight at once across the two processes (half per tenant)."""


def tenants_on_two_masters(cluster: RedisClusterServers) -> list[str]:
    """Two tenant ids whose slots are served by different masters."""
    first = "acme"
    for n in range(100):
        other = f"globex{n}"
        if cluster.master_of(other).port != cluster.master_of(first).port:
            return [first, other]
    raise AssertionError("no tenant id on another master")


def budgets(tenants: list[str]) -> dict[str, tuple[int, int]]:
    """(balance nanos, daily tokens) per tenant: the first is bound by its balance, the
    second by its daily budget, each funding `FUNDED` worst-case requests."""
    tight_money, tight_tokens = FUNDED * WORST_CASE, FUNDED * (PROMPT + MAX_OUT)
    return {
        tenants[0]: (tight_money, 10 * tight_tokens),
        tenants[1]: (10 * tight_money, tight_tokens),
    }


def scopes_of(tenant_id: str, day_budget: int) -> list[Scope]:
    """What the relay sends for a tenant whose key and model have limits of their own."""
    return [
        Scope(f"tenant:{tenant_id}", Limits(tokens_per_day=day_budget)),
        Scope(f"key:{tenant_id}-key", Limits(rpm=10**6, max_concurrent=10**6)),
        Scope(f"tenant:{tenant_id}:model:gpt-4", Limits(tpm=10**9)),
    ]


def cluster_store(url: str, **config: Any) -> RedisQuotaStore:
    store = build_quota_store(
        QuotaConfig(
            backend="redis", redis_url=url, redis_url_env=None, redis_cluster=True, **config
        )
    )
    assert isinstance(store, RedisQuotaStore)
    return store


# ---- a gateway process: fires admits and settles at the cluster --------------------------------


async def _spender(config: dict[str, Any]) -> dict[str, list[list[int]]]:
    store = cluster_store(config["url"], timeout_ms=5_000)
    rng = random.Random(config["name"])
    await store.balance(config["tenants"][0])  # connected: the slot map is known
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def one(tenant_id: str, index: int) -> tuple[str, list[int] | None]:
        req = AdmitRequest(
            request_id=f"{config['name']}-{tenant_id}-{index}",
            scopes=scopes_of(tenant_id, config["days"][tenant_id]),
            prompt_tokens=PROMPT,
            max_tokens=MAX_OUT,
            input_cost_nanos=INPUT_COST,
            output_price_nanos=OUT_PRICE,
            balance_account=tenant_id,
            now=NOW,
        )
        try:
            admission = await store.admit(req)
        except QuotaExceeded:
            return tenant_id, None
        await asyncio.sleep(rng.random() / 100)
        output = rng.randint(0, admission.granted_max_tokens)
        cost = INPUT_COST + output * OUT_PRICE
        await store.settle(admission, PROMPT + output, cost)
        return tenant_id, [PROMPT + output, cost]

    calls = [one(t, i) for t in config["tenants"] for i in range(config["requests"])]
    outcomes = await asyncio.gather(*calls)
    await store.aclose()
    admitted: dict[str, list[list[int]]] = {t: [] for t in config["tenants"]}
    for tenant_id, outcome in outcomes:
        if outcome is not None:
            admitted[tenant_id].append(outcome)
    return admitted


def spender_main(argv: list[str]) -> None:
    """Entry point of a worker process: prints each tenant's admitted [tokens, cost]."""
    print(json.dumps(asyncio.run(_spender(json.loads(argv[0])))))


async def run_spenders(url: str, days: dict[str, int], processes: int = 2) -> dict[str, list[Any]]:
    """Worker processes released at once; what each tenant was admitted, over all of them."""
    code = "import sys; from tests.test_quota_cluster import spender_main as m; m(sys.argv[1:])"
    tenants = list(days)
    per_process = CONCURRENT // processes // len(tenants)
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            json.dumps(
                {
                    "url": url,
                    "name": f"gw{n}",
                    "tenants": tenants,
                    "days": days,
                    "requests": per_process,
                }
            ),
            cwd=PROJECT_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for n in range(processes)
    ]
    async with asyncio.timeout(60):
        for worker in workers:
            assert worker.stdout is not None
            ready = await worker.stdout.readline()
            assert ready.strip() == b"ready", ready
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        outputs = [await worker.communicate() for worker in workers]
    admitted: dict[str, list[Any]] = {t: [] for t in tenants}
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err.decode()
        for tenant_id, rows in json.loads(out).items():
            admitted[tenant_id] += rows
    return admitted


@pytest.fixture
async def cluster_url(redis_cluster: RedisClusterServers) -> AsyncIterator[str]:
    await asyncio.to_thread(redis_cluster.wait_healthy)
    await asyncio.to_thread(redis_cluster.flush)
    yield redis_cluster.url


async def test_300_concurrent_requests_never_overspend_on_a_cluster(
    redis_cluster: RedisClusterServers, cluster_url: str
) -> None:
    """Two processes, 300 requests at once for two tenants on two masters, each request
    reserving on three scopes and a prepaid balance: no budget or balance is overshot by
    a token or a nano, and each is charged exactly what its requests used."""
    tenants = tenants_on_two_masters(redis_cluster)
    funds = budgets(tenants)
    store = cluster_store(cluster_url)
    for tenant_id, (balance, _) in funds.items():
        await store.set_balance(tenant_id, balance)

    admitted = await run_spenders(cluster_url, {t: day for t, (_, day) in funds.items()})

    for tenant_id, (balance, day_budget) in funds.items():
        billed = sum(cost for _, cost in admitted[tenant_id])
        used = sum(tokens for tokens, _ in admitted[tenant_id])
        assert FUNDED <= len(admitted[tenant_id]) < CONCURRENT // len(tenants)
        assert billed <= balance and used <= day_budget
        assert await store.balance(tenant_id) == balance - billed
        scopes = scopes_of(tenant_id, day_budget)
        assert (await store.remaining(scopes[0], NOW))["tokens_per_day"] == day_budget - used
        assert (await store.remaining(scopes[1], NOW))["max_concurrent"] == 10**6
    await store.aclose()
    # one hash tag per tenant: every key of a tenant lives on its tenant's master
    for tenant_id in tenants:
        master = redis_cluster.master_of(tenant_id)
        with master.client() as client:
            keys = client.keys(f"*{{{tenant_id}}}*")
        assert any(":a:" in k for k in keys) and any(":s:key:" in k for k in keys), keys


async def test_a_request_whose_scopes_span_two_tenants_is_refused_before_redis(
    cluster_url: str,
) -> None:
    store = cluster_store(cluster_url)
    mixed = AdmitRequest(
        request_id="mixed",
        scopes=[Scope("tenant:acme", Limits(rpm=10)), Scope("tenant:initech", Limits(rpm=10))],
        prompt_tokens=1,
        max_tokens=1,
        now=NOW,
    )
    with pytest.raises(ValueError, match="share one shard"):
        await store.admit(mixed)
    await store.aclose()


# ---- failover through running gateways -----------------------------------------------------------


async def test_a_master_killed_mid_traffic_fails_over_with_quick_503s_and_recovers(
    tmp_path: Path,
    tokenizer_dir: Path,
    redis_cluster: RedisClusterServers,
    cluster_url: str,
) -> None:
    """Two `maas-gateway serve` processes on the cluster, one failing closed, one open; the
    master of one tenant's slot is killed. Its replica takes over within seconds: meanwhile
    that tenant gets quick 503s (200s failing open), a tenant on another master is served
    throughout, and afterwards everything is served again without a restart."""
    hit, spared = tenants_on_two_masters(redis_cluster)
    quotas = {
        "backend": "redis",
        "redis_url": cluster_url,
        "redis_url_env": None,
        "redis_cluster": True,
        "timeout_ms": 500,
        "retry_interval_ms": 200,
    }
    stanzas = [tenant(t, {"rpm": 10**6, "tpm": 10**9}, balance=10**12) for t in (hit, spared)]
    configs = {
        "closed": fleet_config(tmp_path, tokenizer_dir, quotas, stanzas),
        "open": fleet_config(
            tmp_path, tokenizer_dir, {**quotas, "on_unavailable": "open"}, stanzas
        ),
    }
    victim = redis_cluster.master_of(hit)
    with gateway_processes(configs, tmp_path) as gateways:
        closed, opened = gateways
        async with cluster_traffic(gateways, [hit, spared]) as seen:
            await asyncio.sleep(1.0)
            killed = time.monotonic()
            await asyncio.to_thread(redis_cluster.kill, victim)
            promoted = await asyncio.to_thread(wait_for_new_master, redis_cluster, hit, victim)
            await asyncio.sleep(2.0)
            ended = time.monotonic()
        assert closed.process.poll() is None and opened.process.poll() is None  # no restarts

    try:
        assert redis_cluster.master_of(hit).port != victim.port  # the replica took over
        assert promoted - killed < 10
        show = timeline(seen, killed)
        for sent, gw, tenant_id, reply in seen:
            assert reply.seconds < LATENCY_BOUND_S, (gw, tenant_id, sent - killed, reply.seconds)
            if reply.status != 200:
                assert (gw, tenant_id) == ("closed", hit), show
                assert_openai_error(reply, 503, "service_unavailable")
        before = seen_of(seen, "closed", hit, until=killed - 0.3)
        assert before and all(r.status == 200 for r in before), show
        gap = seen_of(seen, "closed", hit, killed + 0.3, promoted - 0.3)
        assert gap and all(r.status == 503 for r in gap), show
        after = seen_of(seen, "closed", hit, promoted + 1.0, ended)
        assert after and all(r.status == 200 for r in after), show
        for gw, tenant_id in (("closed", spared), ("open", hit), ("open", spared)):
            served = seen_of(seen, gw, tenant_id, killed, ended)
            assert served and all(r.status == 200 for r in served), (gw, tenant_id, show)
    finally:
        await asyncio.to_thread(redis_cluster.restart, victim)  # back, as a replica
        await asyncio.to_thread(redis_cluster.wait_healthy)


Seen = list[tuple[float, str, str, Reply]]


def seen_of(
    seen: Seen, gw: str, tenant_id: str, since: float = 0.0, until: float = float("inf")
) -> list[Reply]:
    return [r for t, g, tid, r in seen if g == gw and tid == tenant_id and since <= t < until]


def timeline(seen: Seen, start: float) -> str:
    return " ".join(f"{g[0]}{tid[0]}{t - start:+.2f}:{r.status}" for t, g, tid, r in seen)


def wait_for_new_master(cluster: RedisClusterServers, tag: str, old: Any) -> float:
    """When a node other than `old` serves `tag`'s slot (monotonic time)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if cluster.master_of(tag).port != old.port:
                return time.monotonic()
        except (redis.RedisError, AssertionError):
            pass
        time.sleep(0.05)
    with cluster.live().client() as client:
        nodes = client.execute_command("CLUSTER", "NODES")
    raise AssertionError(f"no replica took over from {old.port}:\n{nodes}")


@contextlib.asynccontextmanager
async def cluster_traffic(
    gateways: list[GatewayProcess], tenants: list[str]
) -> AsyncIterator[Seen]:
    """Requests for each tenant to each gateway in a loop, with when each was sent."""
    seen: Seen = []
    stop = asyncio.Event()

    async def caller(client: httpx.AsyncClient, gw: GatewayProcess, tenant_id: str) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            reply = await chat(client, gw, tenant_id, model=FULL_MODEL, max_tokens=3)
            seen.append((sent, gw.name, tenant_id, reply))
            await asyncio.sleep(0.02)

    async with http_client() as client:
        calls = [caller(client, gw, t) for gw in gateways for t in tenants for _ in range(2)]
        tasks = [asyncio.create_task(call) for call in calls]
        try:
            yield seen
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def test_a_store_whose_slot_map_predates_a_failover_follows_moved(
    redis_cluster: RedisClusterServers, cluster_url: str
) -> None:
    """A gateway idle through a failover still sends to the old master, now back as a
    replica: it answers MOVED, and the store asks the slot map again and goes on, without
    an error and without losing the request."""
    store = cluster_store(cluster_url)
    await store.set_balance("acme", 10 * WORST_CASE)
    first = await store.admit(paid("acme", "before"))
    await store.settle(first, PROMPT + 10, INPUT_COST + 10 * OUT_PRICE)
    victim = redis_cluster.master_of("acme")
    # Replication is asynchronous: a write acknowledged just before its master dies can be
    # lost with it. Wait until the replica has these, so the test is about MOVED alone.
    with victim.client() as client:
        assert client.execute_command("WAIT", 1, 5000) >= 1
    await asyncio.to_thread(redis_cluster.kill, victim)
    try:
        await asyncio.to_thread(wait_for_new_master, redis_cluster, "acme", victim)
    finally:
        await asyncio.to_thread(redis_cluster.restart, victim)
    await asyncio.to_thread(redis_cluster.wait_healthy)
    assert redis_cluster.master_of("acme").port != victim.port  # the old master is a replica

    after = await store.admit(paid("acme", "after"))
    await store.settle(after, PROMPT + 20, INPUT_COST + 20 * OUT_PRICE)
    spent = 2 * INPUT_COST + 30 * OUT_PRICE
    assert await store.balance("acme") == 10 * WORST_CASE - spent
    await store.aclose()


def paid(tenant_id: str, request_id: str) -> AdmitRequest:
    return AdmitRequest(
        request_id=request_id,
        scopes=scopes_of(tenant_id, 10**9),
        prompt_tokens=PROMPT,
        max_tokens=MAX_OUT,
        input_cost_nanos=INPUT_COST,
        output_price_nanos=OUT_PRICE,
        balance_account=tenant_id,
        now=NOW,
    )


def _node_id(node: Any) -> str:
    with node.client() as client:
        return str(client.execute_command("CLUSTER", "MYID"))


def _set_slot(cluster: RedisClusterServers, slot: int, *state: str) -> None:
    """`CLUSTER SETSLOT slot NODE id` on every master, as `redis-cli --cluster` ends a move."""
    for port in cluster.masters():
        with cluster.node_at(port).client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, *state)


async def test_a_slot_being_migrated_refuses_quickly_then_follows_moved(
    redis_cluster: RedisClusterServers, cluster_url: str
) -> None:
    """A tenant's slot moves to another master. While it moves, the scripts, which create
    keys, can run on neither master (Redis answers ASK, then TRYAGAIN after ASKING): an
    admission is refused as unavailable within the latency bound, charging nothing, and a
    settle is kept and replayed. Once the move ends the old master answers MOVED, the store
    asks the slot map again, and every request is charged once: the balance is exact."""
    from redis.crc import key_slot

    tag = "migrating"
    slot = key_slot(tag.encode())
    store = cluster_store(cluster_url)
    await store.set_balance(tag, 10 * WORST_CASE)
    first = await store.admit(paid(tag, "before"))
    await store.settle(first, PROMPT + 10, INPUT_COST + 10 * OUT_PRICE)
    open_one = await store.admit(paid(tag, "settled-during-the-move"))

    source = redis_cluster.master_of(tag)
    target = redis_cluster.node_at(next(p for p in redis_cluster.masters() if p != source.port))
    source_id, target_id = _node_id(source), _node_id(target)
    with target.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    with source.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        assert keys, "the tenant's quota keys are in its slot"
        client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        assert client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0  # ASK now

    started = time.monotonic()
    with pytest.raises(QuotaUnavailable):
        await store.admit(paid(tag, "during"))
    refused_in = time.monotonic() - started
    assert refused_in < LATENCY_BOUND_S, f"refused after {refused_in:.2f} s"
    await store.settle(open_one, PROMPT + 20, INPUT_COST + 20 * OUT_PRICE)  # kept for later
    assert store.pending_settles == 1

    await asyncio.to_thread(_set_slot, redis_cluster, slot, "NODE", target_id)
    assert redis_cluster.master_of(tag).port == target.port
    await asyncio.sleep(store.retry_interval_s)
    after = await store.admit(paid(tag, "after"))  # MOVED, then the kept settle replays
    await store.settle(after, PROMPT + 30, INPUT_COST + 30 * OUT_PRICE)
    for _ in range(100):  # the replay runs in the background: up to 5 s
        if not store.pending_settles:
            break
        await asyncio.sleep(0.05)
    assert store.pending_settles == 0

    spent = 3 * INPUT_COST + 60 * OUT_PRICE  # "during" was refused: it cost nothing
    assert await store.balance(tag) == 10 * WORST_CASE - spent
    await store.aclose()
