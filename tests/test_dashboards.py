"""The Grafana dashboards and Prometheus rules in dashboards/: they parse, use the fixed
datasource, pass promtool, and every expression returns data from a real Prometheus scraping
a real metrics endpoint under realistic traffic."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvicorn
import yaml

from billing.compute_cost import ComputeCostConfig, ComputeCosts, LatencyModel
from billing.record import UsageRecord
from billing.usage import Usage
from gateway.metrics import Metrics, MetricsConfig
from tests.fixtures.prometheus_server import (
    PrometheusLauncher,
    PrometheusServer,
    check_dashboards_and_rules,
    iter_dashboard_exprs,
    iter_datasource_refs,
    iter_rule_exprs,
    split_threshold,
)

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
GRAFANA = DASHBOARDS / "grafana"
DASHBOARD_FILES = sorted(GRAFANA.glob("*.json"))
ALERTS = DASHBOARDS / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DASHBOARDS / "prometheus" / "prometheus.yml"
DATASOURCE_UID = "maas-prometheus"


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found; install the Debian package prometheus")
    return binary


# ------------------------------------------------------------------ static checks


def test_the_three_dashboards_exist() -> None:
    assert [path.stem for path in DASHBOARD_FILES] == ["overview", "provider", "tenant"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.stem)
def test_dashboard_parses_and_uses_only_the_fixed_datasource(path: Path) -> None:
    text = path.read_text()
    dashboard = json.loads(text)
    assert "${DS_" not in text and "__inputs" not in dashboard
    refs = list(iter_datasource_refs(dashboard))
    assert refs, "no datasource references"
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": DATASOURCE_UID}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    assert dashboard["uid"].startswith("maas-")


def test_dashboard_uids_are_distinct() -> None:
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids)


def test_dashboards_show_what_the_issue_asks_for() -> None:
    exprs = {
        path.stem: " ".join(
            item.expr for item in iter_dashboard_exprs(json.loads(path.read_text()))
        )
        for path in DASHBOARD_FILES
    }
    for needle in (
        "maas_requests_total",
        "maas_tokens_total",
        "maas_cost_nanos_total",
        "maas_quota_refusals_total",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_request_duration_seconds_bucket",
        "maas_gateway_overhead_seconds_bucket",
        "topk(",
    ):
        assert needle in exprs["overview"], needle
    for needle in ("maas_tenant_budget_remaining_tokens", "days_in_month()", "$tenant"):
        assert needle in exprs["tenant"], needle
    for needle in (
        "gen_ai_client_operation_duration_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
    ):
        assert needle in exprs["provider"], needle
    # margin: revenue, compute cost and idle capacity by tenant, model and deployment
    for name in ("overview", "provider"):
        assert "maas_compute_cost_nanos_total" in exprs[name], name
        assert "maas_provisioned_cost_nanos_total" in exprs[name], name
    for label in ("tenant", "model"):
        assert f"sum by ({label}, currency) (increase(maas_compute_cost" in exprs["overview"]
    assert "sum by (deployment, currency) (increase(maas_compute_cost" in exprs["provider"]


_METRIC = re.compile(r"\b(?:maas_|gen_ai_|vllm:)[\w:]+")


def test_no_panel_hides_a_missing_metric_behind_a_zero_fallback() -> None:
    """`X or Y * 0` shows zeros when X is missing; that is honest only when Y is the same
    metric (no 5xx series means no 5xx), not when X is another metric that may be absent."""
    hiding = []
    for path in DASHBOARD_FILES:
        for item in iter_dashboard_exprs(json.loads(path.read_text())):
            parts = re.split(r"\)\s+or\s+", item.expr)
            for left, right in itertools.pairwise(parts):
                if re.search(r"\*\s*0\b|\b0\s*\*", right):
                    if not set(_METRIC.findall(right)) <= set(_METRIC.findall(left)):
                        hiding.append(f"{path.stem} / {item.panel}: {item.expr}")
    assert hiding == [], "\n".join(hiding)


def test_provisioning_uses_the_same_datasource_uid() -> None:
    provisioning = GRAFANA / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "maas.yaml").read_text())
    assert [d["uid"] for d in datasources["datasources"]] == [DATASOURCE_UID]
    providers = yaml.safe_load((provisioning / "dashboards" / "maas.yaml").read_text())
    assert providers["providers"][0]["type"] == "file"


def test_promtool_check_rules_passes() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config_passes() -> None:
    result = subprocess.run(
        [_promtool(), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_scrape_config_targets_the_metrics_listener() -> None:
    """Not the public port: the gateway serves its metrics only on `metrics.port`."""
    import yaml

    from gateway.metrics import MetricsConfig

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "maas-gateway"]
    defaults = MetricsConfig()
    assert job["static_configs"][0]["targets"] == [f"{defaults.host}:{defaults.port}"]
    assert job["metrics_path"] == "/metrics"


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("groups: [{name: g, rules: [{alert: A, expr: 'sum(rate(x[5m]) > 1'}]}]\n")
    result = subprocess.run([_promtool(), "check", "rules", str(broken)], capture_output=True)
    assert result.returncode != 0


def test_every_alert_is_a_signal_compared_with_a_threshold() -> None:
    rules = list(iter_rule_exprs(yaml.safe_load(ALERTS.read_text())))
    alerts = {rule.name: rule for rule in rules if rule.kind == "alert"}
    assert {
        "MaasTenantBudgetNearlyExhausted",
        "MaasTenantBalanceLow",
        "MaasErrorRateHigh",
        "MaasTimeToFirstTokenObjectiveMissed",
        "MaasGatewayOverheadObjectiveMissed",
        "MaasLedgerLagging",
    } <= set(alerts)
    for rule in alerts.values():
        assert rule.signal is not None, f"{rule.name}: {rule.expr}"
    assert alerts["MaasLedgerLagging"].threshold == 60
    assert alerts["MaasTenantBalanceExhausted"].comparison == "<="


def test_split_threshold_takes_only_the_final_comparison() -> None:
    assert split_threshold("a / b < 0.1") == ("a / b", "<", 0.1)
    assert split_threshold('up{job=~"x"} == 0') == ('up{job=~"x"}', "==", 0.0)
    assert split_threshold("sum(x > 1) >= 2e3") == ("sum(x > 1)", ">=", 2000.0)
    assert split_threshold("x > y") is None


# ------------------------------------------------------------------ live evaluation

TENANTS = ["acme", "globex", "initech", "umbrella"]
MODELS = {  # public model -> (endpoint, unit prices in nanos per token: input, cached, output)
    "gpt-4o": ("chat.completions", 2500, 1250, 10000),
    "llama-3-8b": ("completions", 50, 25, 100),
    "text-embedding-3-small": ("embeddings", 20, 0, 0),
}
PROVIDERS = ["sim-a", "sim-b"]
#: Deployments with accelerators (and so idle capacity); the others are wholesale.
HARDWARE = {"sim-a/gpt-4o": 4, "sim-b/llama-3-8b": 1}
STATUSES = [200] * 14 + [400, 429, 502, 503]
REFUSAL_REASONS = ["rpm", "tpm", "budget", "balance"]
STATES = ["healthy", "degraded", "open"]


def realistic_record(rng: random.Random, n: int) -> tuple[UsageRecord, float, float | None]:
    """One finished request as the gateway would record it, with overhead and upstream time."""
    tenant = TENANTS[n % len(TENANTS)]
    model = rng.choice(list(MODELS))
    endpoint, price_in, price_cached, price_out = MODELS[model]
    status = rng.choice(STATUSES)
    provider = rng.choice(PROVIDERS)
    stream = endpoint != "embeddings" and rng.random() < 0.6
    prompt = rng.randint(5, 3000)
    cached = rng.choice([0, 0, prompt // 2])
    output = 0 if endpoint == "embeddings" or status >= 400 else rng.randint(1, 800)
    if status == 502 and stream:
        output = rng.randint(0, 50)  # cut part-way by the upstream
    usage = Usage(prompt - cached if status != 429 else 0, cached if status != 429 else 0, output)
    cost = usage.uncached_input * price_in + usage.cached_input * price_cached
    cost += usage.output * price_out
    upstream_s = None if status in (400, 429) else rng.uniform(0.05, 3.0)
    ttft_ms = rng.uniform(20, 900) if stream and status == 200 else None
    duration_ms = (upstream_s or 0.0) * 1000 + rng.uniform(0.2, 3.0)
    record = UsageRecord(
        request_id=f"req-{n}",
        started_at=datetime.now(UTC),
        tenant_id=tenant,
        key_id=f"key-{tenant}-{n % 3}",
        model=model,
        endpoint=endpoint,
        provider=provider,
        deployment=f"{provider}/{model}" if status != 429 else "",
        usage=usage,
        cost_nanos=cost,
        list_cost_nanos=cost,
        compute_cost_nanos=cost // 3,
        status_code=status,
        error_type=None if status < 400 else {400: "invalid_request_error"}.get(status),
        stream=stream,
        attempts=2 if rng.random() < 0.1 else 1,
        ttft_ms=ttft_ms,
        duration_ms=duration_ms,
    )
    overhead_s = rng.lognormvariate(-8.0, 0.6)  # around 300 µs
    return record, overhead_s, upstream_s


@dataclass
class FedTotals:
    """Exact totals of what `feed_traffic` observed, as a ledger would sum them."""

    requests: int = 0
    tokens: dict[str, int] = field(
        default_factory=lambda: {"uncached_input": 0, "cached_input": 0, "output": 0}
    )
    cost_nanos: int = 0
    revenue: dict[str, int] = field(default_factory=dict)  # by deployment
    compute: dict[tuple[str, str], int] = field(default_factory=dict)  # by tenant, deployment

    def add(self, rec: UsageRecord) -> None:
        self.requests += 1
        self.tokens["uncached_input"] += rec.usage.uncached_input
        self.tokens["cached_input"] += rec.usage.cached_input
        self.tokens["output"] += rec.usage.output
        self.cost_nanos += rec.cost_nanos
        deployment = rec.deployment or "none"
        self.revenue[deployment] = self.revenue.get(deployment, 0) + rec.cost_nanos
        key = (rec.tenant_id, deployment)
        self.compute[key] = self.compute.get(key, 0) + rec.compute_cost_nanos


async def feed_traffic(metrics: Metrics, stop: asyncio.Event, totals: FedTotals) -> None:
    """Observe a stream of realistic requests, refusals, budgets and backend load."""
    rng = random.Random(7)
    n = 0
    balances = {tenant: 50_000_000_000 for tenant in TENANTS}
    while not stop.is_set():
        for _ in range(20):
            record, overhead_s, upstream_s = realistic_record(rng, n)
            metrics.observe_request(record, overhead_s=overhead_s, upstream_s=upstream_s)
            totals.add(record)
            balances[record.tenant_id] -= record.cost_nanos
            if record.status_code == 429:
                reason = REFUSAL_REASONS[n % len(REFUSAL_REASONS)]
                metrics.observe_refusal(record.tenant_id, record.model, reason)
            n += 1
        for tenant in TENANTS:
            metrics.set_tenant_budget(
                tenant,
                remaining_tokens={"day": rng.randint(0, 100_000), "month": 2_000_000 - n},
                limit_tokens={"day": 100_000, "month": 2_000_000},
                balance_nanos=balances[tenant],
                currency="USD",
            )
        metrics.set_ledger(queue_depth=rng.randint(0, 40), lag_s=rng.uniform(0.0, 2.0))
        for deployment in ("sim-a/gpt-4o", "sim-b/llama-3-8b"):
            model = deployment.split("/")[1]
            metrics.set_deployment_health(deployment, model, rng.choice(STATES), rng.randint(0, 9))
        for model_name in ("sim-small", "sim-large"):
            running = rng.randint(1, 8)
            metrics.backend.set_load(model_name, running=running, waiting=rng.randint(0, 4))
            metrics.backend.observe_finished(
                model_name,
                prompt_tokens=rng.randint(10, 2000),
                generation_tokens=rng.randint(1, 500),
                ttft_s=rng.uniform(0.01, 0.5),
                finished_reason=rng.choice(["stop", "length"]),
            )
        await asyncio.sleep(0.05)


def fleet_costs() -> ComputeCosts:
    """Accelerators behind the hardware deployments, wholesale prices for the rest."""
    latency = LatencyModel(
        capacity=16, prefill_ms_per_token=0.02, itl_ms=15, slowdown_at_capacity=2
    )
    deployments = {f"{p}/{m}": latency for p in PROVIDERS for m in MODELS}
    versions = {
        name: [
            {
                "effective_from": "2020-01-01",
                "hardware": {"price_per_hour": "2000", "count": HARDWARE[name]},
            }
            if name in HARDWARE
            else {"effective_from": "2020-01-01", "wholesale": {"input": "1", "output": "2"}}
        ]
        for name in deployments
    }
    config = ComputeCostConfig.model_validate({"deployments": versions})
    return ComputeCosts(config, deployments)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics_endpoint(metrics: Metrics) -> Any:
    """A minimal ASGI app serving `metrics.render()` on every path."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, content_type = metrics.render()
        headers = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@dataclass
class LiveScrape:
    """A Prometheus scraping a metrics endpoint that `feeding` keeps busy until `stop`."""

    prometheus: PrometheusServer
    target: str
    stop: asyncio.Event
    feeding: asyncio.Task[None]
    totals: FedTotals


@pytest_asyncio.fixture(scope="module")
async def live(prometheus_launcher: PrometheusLauncher) -> AsyncIterator[LiveScrape]:
    """A Prometheus (with the alert rules loaded) scraping a metrics endpoint under traffic."""
    metrics = Metrics(MetricsConfig())
    metrics.track_provisioned(fleet_costs(), "USD", lambda: datetime.now(UTC))
    port = _free_port()
    config = uvicorn.Config(
        metrics_endpoint(metrics), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    http_server = uvicorn.Server(config)
    serving = asyncio.create_task(http_server.serve())
    stop = asyncio.Event()
    totals = FedTotals()
    feeding = asyncio.create_task(feed_traffic(metrics, stop, totals))
    try:
        for _ in range(1000):
            if http_server.started:
                break
            await asyncio.sleep(0.01)
        target = f"127.0.0.1:{port}"
        prometheus = await prometheus_launcher.astart([target], rule_files=[ALERTS])
        await prometheus.wait_for_scrapes(target, 4)
        yield LiveScrape(prometheus, target, stop, feeding, totals)
        await prometheus.aclose()
    finally:
        stop.set()
        await feeding
        http_server.should_exit = True
        await serving


async def test_every_panel_and_rule_expression_returns_data(live: LiveScrape) -> None:
    report = await check_dashboards_and_rules(live.prometheus, DASHBOARD_FILES, [ALERTS])
    assert report.problems == [], "\n".join(report.problems)
    panel_exprs = sum(
        len(list(iter_dashboard_exprs(json.loads(path.read_text())))) for path in DASHBOARD_FILES
    )
    assert len(report.evaluated) >= panel_exprs + 10


async def test_prometheus_evaluates_the_loaded_rules_without_errors(live: LiveScrape) -> None:
    rules = await live.prometheus.wait_for_rule_evaluations()
    expected = [rule.name for rule in iter_rule_exprs(yaml.safe_load(ALERTS.read_text()))]
    assert sorted(rule["name"] for rule in rules) == sorted(expected)
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule


async def test_the_check_reports_failing_and_empty_expressions(
    live: LiveScrape, tmp_path: Path
) -> None:
    dashboard = {
        "title": "broken",
        "panels": [
            {"title": "syntax", "targets": [{"refId": "A", "expr": "sum(rate(x[5m])"}]},
            {"title": "absent", "targets": [{"refId": "A", "expr": "maas_no_such_metric"}]},
            {"title": "fine", "targets": [{"refId": "A", "expr": "sum(maas_requests_total)"}]},
        ],
    }
    rules = {
        "groups": [
            {
                "name": "g",
                "rules": [
                    {"alert": "NoThreshold", "expr": "maas_requests_total > maas_tokens_total"},
                    {"alert": "NoSignal", "expr": "maas_no_such_metric > 1"},
                ],
            }
        ]
    }
    (tmp_path / "broken.json").write_text(json.dumps(dashboard))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    report = await check_dashboards_and_rules(
        live.prometheus, [tmp_path / "broken.json"], [tmp_path / "rules.yml"]
    )
    problems = "\n".join(report.problems)
    assert len(report.problems) == 4, problems
    assert "syntax" in problems and "error" in problems
    assert "absent" in problems and "NoThreshold" in problems and "NoSignal (signal)" in problems
    assert "fine" not in problems


async def test_scraped_totals_equal_the_exact_totals_of_the_run(live: LiveScrape) -> None:
    """Runs last: stops the traffic, then compares what Prometheus stored with the exact sums
    of every record observed, as the ledger would hold them."""
    live.stop.set()
    await live.feeding
    seen = await live.prometheus.scrape_count(live.target)
    await live.prometheus.wait_for_scrapes(live.target, seen + 2)
    prometheus = live.prometheus
    cost = await prometheus.query("sum(maas_cost_nanos_total)")
    tokens = await prometheus.query("sum by (token_type) (maas_tokens_total)")
    requests = await prometheus.query("sum(maas_requests_total)")
    assert live.totals.cost_nanos > 10**9
    assert Decimal(cost.series[0]["value"][1]) == live.totals.cost_nanos
    assert {labels[0]: Decimal(str(v)) for labels, v in tokens.by_labels("token_type").items()} == {
        kind: Decimal(total) for kind, total in live.totals.tokens.items()
    }
    assert Decimal(requests.series[0]["value"][1]) == live.totals.requests
    revenue = await prometheus.query("sum by (deployment) (maas_cost_nanos_total)")
    assert {k[0]: Decimal(str(v)) for k, v in revenue.by_labels("deployment").items()} == {
        deployment: Decimal(total) for deployment, total in live.totals.revenue.items()
    }
    compute = await prometheus.query("sum by (tenant, deployment) (maas_compute_cost_nanos_total)")
    assert {k: Decimal(str(v)) for k, v in compute.by_labels("tenant", "deployment").items()} == {
        key: Decimal(total) for key, total in live.totals.compute.items()
    }
    provisioned = (await prometheus.query("maas_provisioned_cost_nanos_total")).by_labels(
        "deployment"
    )
    assert set(provisioned) == {(name,) for name in HARDWARE}
    # four cards cost four times one card over the same time
    four, one = provisioned[("sim-a/gpt-4o",)], provisioned[("sim-b/llama-3-8b",)]
    assert one > 0 and four == pytest.approx(4 * one, rel=1e-6)
