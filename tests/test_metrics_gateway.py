"""Metrics end to end: a real Prometheus scrapes a real gateway under real traffic.

One gateway (on a real loopback socket) serves several tenants (one prepaid, budgets set, one
with a tiny rpm, one whose balance runs out) and several models on two simulated backends,
one of which injects server errors, upstream 429s and cut streams. While the traffic runs,
every dashboard panel and alert rule must evaluate and return data. When it stops, the token,
revenue and compute cost counters, scraped directly and through Prometheus, must equal the
ledger's sums exactly, per tenant, model and deployment; provisioned accelerator cost grows at
each hardware profile's hourly price, and a deployment that served nothing is all idle.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from billing.store.schema import ENTRIES
from gateway.auth import hash_key
from gateway.config import parse_settings
from tests.fixtures.prometheus_server import (
    PrometheusLauncher,
    PrometheusServer,
    check_dashboards_and_rules,
    iter_dashboard_exprs,
    iter_rule_exprs,
    resolve_variables,
    substitute_variables,
)
from tests.harness import (
    ACME_KEY,
    ACME_LIMITED_KEY,
    GLOBEX_KEY,
    RunningGateway,
    base_config,
)

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
DASHBOARD_FILES = sorted((DASHBOARDS / "grafana").glob("*.json"))
ALERTS = DASHBOARDS / "prometheus" / "alerts.yml"

INITECH_KEY = "sk-test-initech-00000000000000000000000000000000000"
UMBRELLA_KEY = "sk-test-umbrella-0000000000000000000000000000000000"
KEYS = {
    ACME_KEY: "acme",
    ACME_LIMITED_KEY: "acme",
    GLOBEX_KEY: "globex",
    INITECH_KEY: "initech",
    UMBRELLA_KEY: "umbrella",
}
#: error.type of the gateway's own quota refusals; an upstream's 429 is "rate_limit_error".
REFUSAL_TYPES = {"requests", "tokens", "insufficient_quota"}
HUGE = {"rpm": 1_000_000, "tpm": 1_000_000_000}


#: Hardware deployments: accelerators per hour (price x count), in USD.
HOURLY = {"sim/sim-mini": Decimal("6.4"), "sim-flaky/sim-4": Decimal("1.8"), "sim/sim-idle": 3}


def hardware(price: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "effective_from": "2026-01-01",
            "hardware": {"accelerator": "L4", "price_per_hour": price, "count": count},
        }
    ]


def gateway_config(tmp: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """Three simulated backends (one flaky, one always busy), five models (one never asked
    for), four tenants; compute costs from hardware profiles and one wholesale price."""
    fast = {"time_scale": 0.02, "capacity": 4}  # no seed: faults drawn afresh per attempt
    output = {"distribution": "uniform", "mean": 20, "sd": 10, "min": 5, "max": 40}
    return base_config(
        tmp,
        tokenizer_dir,
        providers=[
            {"name": "sim", "type": "simulated", **fast, "output": output},
            {
                "name": "sim-flaky",
                "type": "simulated",
                **fast,
                "output": output,
                "errors": {"rate_500": 0.3, "rate_429": 0.1, "rate_cut": 0.15},
            },
            {"name": "sim-busy", "type": "simulated", **fast, "errors": {"rate_429": 1.0}},
        ],
        models=[
            {
                "name": "gpt-4o-mini",
                "aliases": ["mini"],
                "deployments": [{"provider": "sim", "model": "sim-mini"}],
            },
            {"name": "gpt-4", "deployments": [{"provider": "sim-flaky", "model": "sim-4"}]},
            {"name": "gpt-busy", "deployments": [{"provider": "sim-busy", "model": "sim-busy"}]},
            {"name": "gpt-idle", "deployments": [{"provider": "sim", "model": "sim-idle"}]},
            {
                "name": "text-embedding-3-small",
                "kind": "embedding",
                "deployments": [{"provider": "sim", "model": "sim-embed"}],
            },
        ],
        routing={"breaker": {"consecutive_failures": 8, "open_s": 1}},
        pricing={
            "models": {
                name: [{"effective_from": "2026-01-01", "prices": {"input": "1", "output": "2"}}]
                for name in ("gpt-busy", "gpt-idle")
            }
        },
        compute_costs={
            "deployments": {
                "sim/sim-mini": hardware("3.2", 2),
                "sim-flaky/sim-4": hardware("1.8", 1),
                "sim/sim-idle": hardware("1.5", 2),
                "sim-busy/sim-busy": [
                    {"effective_from": "2026-01-01", "wholesale": {"input": "0.5", "output": "1"}}
                ],
            }
        },
        metrics={"enabled": True, "flush_interval_s": 0.2},
        tenants=[
            {
                "id": "acme",
                "balance": "50",
                "limits": {**HUGE, "tokens_per_day": 50_000_000, "tokens_per_month": 900_000_000},
                "keys": [
                    {"id": "acme-main", "hash": hash_key(ACME_KEY)},
                    {
                        "id": "acme-limited",
                        "hash": hash_key(ACME_LIMITED_KEY),
                        "models": ["gpt-4o-mini"],
                        "limits": {"rpm": 2},
                    },
                ],
            },
            {
                "id": "globex",
                "timezone": "Asia/Shanghai",
                "limits": {**HUGE, "tokens_per_day": 20_000_000},
                "keys": [{"id": "globex-main", "hash": hash_key(GLOBEX_KEY)}],
            },
            {
                "id": "initech",
                "limits": {"rpm": 3, "tpm": 1_000_000},
                "keys": [{"id": "initech-main", "hash": hash_key(INITECH_KEY)}],
            },
            {
                "id": "umbrella",
                "balance": "0.0002",
                "limits": HUGE,
                "keys": [{"id": "umbrella-main", "hash": hash_key(UMBRELLA_KEY)}],
            },
        ],
    )


def request_mix() -> list[tuple[str, str, dict[str, Any]]]:
    """(key, path, body) for every kind of request the traffic cycles through."""
    chat = [{"role": "user", "content": "Say something about meters and money."}]
    mix: list[tuple[str, str, dict[str, Any]]] = []
    for key in (ACME_KEY, GLOBEX_KEY, INITECH_KEY, UMBRELLA_KEY):
        for model in ("gpt-4o-mini", "gpt-4"):
            for stream in (False, True):
                body: dict[str, Any] = {"model": model, "messages": chat, "max_tokens": 30}
                if stream:
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                mix.append((key, "/v1/chat/completions", body))
        mix.append(
            (key, "/v1/completions", {"model": "mini", "prompt": "Once upon", "max_tokens": 20})
        )
        mix.append(
            (
                key,
                "/v1/embeddings",
                {"model": "text-embedding-3-small", "input": ["a meter", "a bill"]},
            )
        )
    limited = {"model": "gpt-4o-mini", "messages": chat, "max_tokens": 10}
    mix.append((ACME_LIMITED_KEY, "/v1/chat/completions", limited))
    busy = {"model": "gpt-busy", "messages": chat, "max_tokens": 10}  # the upstream says 429
    mix += [(ACME_KEY, "/v1/chat/completions", busy), (GLOBEX_KEY, "/v1/chat/completions", busy)]
    return mix


@dataclass
class Traffic:
    """What the callers saw: answers by status, and the gateway's refusals by tenant."""

    statuses: Counter[int] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    upstream_429s: int = 0


async def send_traffic(url: str, stop: asyncio.Event, traffic: Traffic, workers: int = 4) -> None:
    """Cycle through `request_mix()` with a few concurrent callers until `stop` is set."""
    mix = itertools.cycle(request_mix())

    async def worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            key, path, body = next(mix)
            headers = {"authorization": f"Bearer {key}"}
            async with client.stream("POST", path, json=body, headers=headers) as response:
                content = await response.aread()
            traffic.statuses[response.status_code] += 1
            if response.status_code == 429:
                error_type = httpx.Response(429, content=content).json()["error"]["type"]
                if error_type in REFUSAL_TYPES:
                    traffic.refusals[KEYS[key]] += 1
                else:
                    traffic.upstream_429s += 1
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(workers)))


@dataclass
class Live:
    gateway: RunningGateway
    prometheus: PrometheusServer
    target: str
    stop: asyncio.Event
    sending: asyncio.Task[None]
    traffic: Traffic

    async def stop_traffic(self) -> None:
        self.stop.set()
        await self.sending


@pytest_asyncio.fixture(scope="module")
async def live(
    prometheus_launcher: PrometheusLauncher,
    tokenizer_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Live]:
    """A gateway under traffic, scraped every second by a Prometheus with the alert rules."""
    tmp = tmp_path_factory.mktemp("metrics-gateway")
    settings = parse_settings(gateway_config(tmp, tokenizer_dir))
    async with RunningGateway(settings) as gateway:
        stop = asyncio.Event()
        traffic = Traffic()
        sending = asyncio.create_task(send_traffic(gateway.url, stop, traffic))
        target = gateway.metrics_url.removeprefix("http://").removesuffix("/metrics")
        try:
            prometheus = await prometheus_launcher.astart([target], rule_files=[ALERTS])
            await prometheus.wait_for_scrapes(target, 5)
            yield Live(gateway, prometheus, target, stop, sending, traffic)
            await prometheus.aclose()
        finally:
            stop.set()
            await sending


def test_promtool_check_rules_passes() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found; install the Debian package prometheus"
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_every_panel_and_rule_returns_data_from_the_gateway(live: Live) -> None:
    report = await check_dashboards_and_rules(live.prometheus, DASHBOARD_FILES, [ALERTS])
    assert report.problems == [], "\n".join(report.problems)
    panels = sum(
        len(list(iter_dashboard_exprs(json.loads(path.read_text())))) for path in DASHBOARD_FILES
    )
    assert len(report.evaluated) >= panels + 10
    # The traffic really had every ingredient the panels show.
    statuses = live.traffic.statuses
    assert statuses[200] and statuses[429] and sum(statuses[s] for s in (502, 503, 504))


async def test_every_panel_and_signal_shows_numbers_not_only_nan(live: Live) -> None:
    """A panel whose every value is NaN (say 0/0 on an idle backend) draws nothing."""
    prometheus = live.prometheus
    checks: list[tuple[str, str]] = []
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text())
        values = await resolve_variables(dashboard, prometheus)
        for item in iter_dashboard_exprs(dashboard):
            checks.append((f"{path.stem} / {item.panel}", substitute_variables(item.expr, values)))
    for rule in iter_rule_exprs(yaml.safe_load(ALERTS.read_text())):
        checks.append((f"alert {rule.name}", rule.signal or rule.expr))
    blank = []
    for where, expr in checks:
        numbers = (await prometheus.query(expr)).values()
        if not any(math.isfinite(number) for number in numbers):
            blank.append(f"{where}: {expr} -> {numbers[:3]}")
    assert blank == [], "\n".join(blank)


async def test_prometheus_evaluates_every_alert_rule_without_errors(live: Live) -> None:
    rules = await live.prometheus.wait_for_rule_evaluations()
    expected = [rule.name for rule in iter_rule_exprs(yaml.safe_load(ALERTS.read_text()))]
    assert sorted(rule["name"] for rule in rules) == sorted(expected)
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule


async def test_budget_and_balance_gauges_describe_the_tenants(live: Live) -> None:
    prometheus = live.prometheus
    limits = (await prometheus.query(_last("maas_tenant_budget_limit_tokens"))).by_labels(
        "tenant", "window"
    )
    assert limits[("acme", "day")] == 50_000_000 and limits[("globex", "day")] == 20_000_000
    remaining = (await prometheus.query(_last("maas_tenant_budget_remaining_tokens"))).by_labels(
        "tenant", "window"
    )
    assert 0 < remaining[("acme", "day")] < 50_000_000
    balances = (await prometheus.query(_last("maas_tenant_balance_nanos"))).by_labels("tenant")
    assert set(balances) == {("acme",), ("umbrella",)}  # only the prepaid tenants
    assert 0 < balances[("acme",)] < 50 * 10**9
    assert balances[("umbrella",)] < 200_000


def _last(selector: str) -> str:
    """The latest value of each series, even if the very last scrape timed out."""
    return f"last_over_time({selector}[15s])"


async def _scrape(url: str) -> dict[str, list[Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    assert response.status_code == 200
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def _exact(value: float | str) -> int:
    number = Decimal(str(value))
    assert number == number.to_integral_value(), value
    return int(number)


def _sum_by(samples: list[Any], name: str, *labels: str) -> dict[tuple[str, ...], int]:
    totals: Counter[tuple[str, ...]] = Counter()
    for sample in samples:
        if sample.name == name:
            totals[tuple(sample.labels[label] for label in labels)] += _exact(sample.value)
    return {key: total for key, total in totals.items() if total}


async def _money_by_deployment(live: Live) -> dict[str, dict[tuple[str, ...], int]]:
    """Revenue and compute cost per (tenant, deployment) in the ledger; "none" where the
    request ended before a deployment was chosen."""
    query = select(
        ENTRIES.c.tenant_id,
        ENTRIES.c.deployment,
        func.sum(ENTRIES.c.cost_nanos),
        func.sum(ENTRIES.c.compute_cost_nanos),
    ).group_by(ENTRIES.c.tenant_id, ENTRIES.c.deployment)
    async with live.gateway.gateway.ledger.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    sums: dict[str, dict[tuple[str, ...], int]] = {"revenue": {}, "compute": {}}
    for tenant, deployment, revenue, compute in rows:
        key = (tenant, deployment or "none")
        if revenue:
            sums["revenue"][key] = int(revenue)
        if compute:
            sums["compute"][key] = int(compute)
    return sums


async def _ledger_sums(live: Live) -> dict[str, dict[tuple[str, ...], int]]:
    """Per (tenant, model) sums of the ledger's entries, in the metrics' label shapes."""
    columns = ("uncached_input", "cached_input", "output", "cost_nanos")
    query = select(
        ENTRIES.c.tenant_id,
        ENTRIES.c.model,
        func.count(),
        *(func.sum(ENTRIES.c[name]) for name in columns),
    ).group_by(ENTRIES.c.tenant_id, ENTRIES.c.model)
    async with live.gateway.gateway.ledger.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    sums: dict[str, dict[tuple[str, ...], int]] = {"requests": {}, "tokens": {}, "cost": {}}
    for tenant, model, count, uncached, cached, output, cost in rows:
        model = model or "none"  # refused before a model was resolved
        sums["requests"][(tenant, model)] = int(count)
        for token_type, total in zip(columns[:3], (uncached, cached, output), strict=True):
            if total:
                sums["tokens"][(tenant, model, token_type)] = int(total)
        if cost:
            sums["cost"][(tenant, model)] = int(cost)
    return sums


async def _billed_failures(live: Live) -> int:
    """Cost the ledger holds for requests that ended in an error (streams cut part-way)."""
    query = select(func.sum(ENTRIES.c.cost_nanos)).where(ENTRIES.c.status_code >= 400)
    async with live.gateway.gateway.ledger.engine.connect() as connection:
        return int((await connection.execute(query)).scalar() or 0)


IDLE_BY_DEPLOYMENT = (
    "(sum by (deployment) (rate(maas_provisioned_cost_nanos_total[10s]))"
    " - sum by (deployment) (rate(maas_compute_cost_nanos_total[10s])))"
    " or sum by (deployment) (rate(maas_provisioned_cost_nanos_total[10s]))"
)


async def test_provisioned_cost_grows_at_the_hardware_price_and_idle_is_the_rest(
    live: Live,
) -> None:
    prometheus = live.prometheus
    samples = await prometheus.query("maas_provisioned_cost_nanos_total[10s]")
    growth = {}
    for item in samples.series:
        (t0, v0), *_, (t1, v1) = item["values"]
        growth[item["metric"]["deployment"]] = (float(v1) - float(v0)) / (t1 - t0)
    assert set(growth) == set(HOURLY)  # wholesale provisions nothing
    for name, hourly in HOURLY.items():  # nanos per second of wall time
        assert growth[name] == pytest.approx(float(hourly) * 1e9 / 3600, rel=0.02), name
    at = time.time() - 1  # one instant for the three queries below

    async def by_deployment(expr: str) -> dict[tuple[str, ...], float]:
        return (await prometheus.query(f"({expr}) * 3600 / 1e9", at=at)).by_labels("deployment")

    per_hour = await by_deployment(
        "sum by (deployment) (rate(maas_provisioned_cost_nanos_total[10s]))"
    )
    idle = await by_deployment(IDLE_BY_DEPLOYMENT)
    assert idle[("sim/sim-idle",)] == pytest.approx(per_hour[("sim/sim-idle",)], rel=1e-9)
    used = await by_deployment("sum by (deployment) (rate(maas_compute_cost_nanos_total[10s]))")
    # (below zero here: time_scale 0.02 serves tokens 50 times faster than the latency model
    # the cost per token assumes, so the accelerators look more than fully used)
    assert used[("sim/sim-mini",)] > 0
    assert idle[("sim/sim-mini",)] == pytest.approx(
        per_hour[("sim/sim-mini",)] - used[("sim/sim-mini",)], rel=1e-6
    )


async def _until_a_cut_stream_is_billed(live: Live, seconds: float = 60) -> None:
    """Keep the traffic going until a stream the flaky upstream cut part-way is in the
    ledger with a cost: the cut is random (`rate_cut`), a few per minute of this traffic."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await live.gateway.gateway.ledger.flush()
        if await _billed_failures(live) > 0:
            return
        await asyncio.sleep(0.5)


async def test_scraped_token_and_cost_totals_equal_the_ledger(live: Live) -> None:
    """Runs last: stops the traffic, flushes the ledger, then scrapes."""
    await _until_a_cut_stream_is_billed(live)
    await live.stop_traffic()
    await live.gateway.gateway.ledger.flush()
    ledger = await _ledger_sums(live)
    assert len(ledger["cost"]) >= 6 and sum(ledger["cost"].values()) > 10**6
    assert {key[2] for key in ledger["tokens"]} == {"uncached_input", "output"}
    assert await _billed_failures(live) > 0  # cut streams bill what was delivered

    # Directly from /metrics.
    families = await _scrape(live.gateway.metrics_url)
    tokens = _sum_by(families["maas_tokens"], "maas_tokens_total", "tenant", "model", "token_type")
    cost = _sum_by(families["maas_cost_nanos"], "maas_cost_nanos_total", "tenant", "model")
    requests = _sum_by(families["maas_requests"], "maas_requests_total", "tenant", "model")
    assert tokens == ledger["tokens"]
    assert cost == ledger["cost"]
    assert requests == ledger["requests"]

    # Through Prometheus, once it has scraped the final values.
    prometheus = live.prometheus
    seen = await prometheus.scrape_count(live.target)
    await prometheus.wait_for_scrapes(live.target, seen + 2)
    stored_tokens = await prometheus.query(
        "sum by (tenant, model, token_type) (maas_tokens_total) > 0"
    )
    stored_cost = await prometheus.query("sum by (tenant, model) (maas_cost_nanos_total) > 0")
    assert {
        (item["metric"]["tenant"], item["metric"]["model"], item["metric"]["token_type"]): _exact(
            item["value"][1]
        )
        for item in stored_tokens.series
    } == ledger["tokens"]
    assert {
        (item["metric"]["tenant"], item["metric"]["model"]): _exact(item["value"][1])
        for item in stored_cost.series
    } == ledger["cost"]

    # Revenue and compute cost by tenant and deployment, as the margin panels sum them.
    money = await _money_by_deployment(live)
    # the busy upstream refuses everything (no tokens, no cost); embeddings have no cost set
    assert {deployment for _, deployment in money["compute"]} == {"sim/sim-mini", "sim-flaky/sim-4"}
    revenue = _sum_by(families["maas_cost_nanos"], "maas_cost_nanos_total", "tenant", "deployment")
    compute = _sum_by(
        families["maas_compute_cost_nanos"], "maas_compute_cost_nanos_total", "tenant", "deployment"
    )
    assert revenue == money["revenue"]
    assert compute == money["compute"]
    stored_compute = await prometheus.query(
        "sum by (tenant, deployment) (maas_compute_cost_nanos_total) > 0"
    )
    assert {
        (item["metric"]["tenant"], item["metric"]["deployment"]): _exact(item["value"][1])
        for item in stored_compute.series
    } == money["compute"]

    # Quota refusals: exactly the gateway's own 429s, by the limit that refused them.
    refusals = families["maas_quota_refusals"]
    by_tenant = _sum_by(refusals, "maas_quota_refusals_total", "tenant")
    assert by_tenant == {(t,): n for t, n in live.traffic.refusals.items()}
    assert live.traffic.upstream_429s > 0  # which must not count as refusals
    reasons = set(_sum_by(refusals, "maas_quota_refusals_total", "tenant", "reason"))
    assert {("acme", "rpm"), ("initech", "rpm"), ("umbrella", "balance")} <= reasons
