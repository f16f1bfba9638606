"""gateway.metrics: what a scrape of GET /metrics shows after known requests."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from billing.compute_cost import ComputeCostConfig, ComputeCosts, LatencyModel
from billing.record import UsageRecord
from billing.usage import Usage
from gateway.metrics import (
    DURATION_BUCKETS,
    TIME_PER_OUTPUT_TOKEN_BUCKETS,
    TOKEN_USAGE_BUCKETS,
    TTFT_BUCKETS,
    VLLM_TTFT_BUCKETS,
    Metrics,
    MetricsConfig,
    reset_multiprocess_dir,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def record(**overrides: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "request_id": "req-7f3a9c",
        "started_at": datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        "tenant_id": "acme",
        "key_id": "key-5d1e8b",
        "model": "gpt-4o-mini",
        "endpoint": "chat.completions",
        "provider": "sim",
        "deployment": "sim/gpt-4o-mini",
        "usage": Usage(uncached_input=100, cached_input=20, output=50, reasoning=5),
        "cost_nanos": 45_000,
        "compute_cost_nanos": 20_000,
        "status_code": 200,
        "stream": False,
        "duration_ms": 800.0,
    }
    fields.update(overrides)
    return UsageRecord(**fields)


def scrape(metrics: Metrics) -> dict[str, list[Sample]]:
    """The rendered exposition, parsed: samples by family name."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        family.name: family.samples
        for family in text_string_to_metric_families(body.decode())
        if family.samples
    }


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample named `name` whose labels include `labels`; summed if several."""
    family = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count")
    family = family.removesuffix("_sum")
    matching = [
        s.value
        for s in samples.get(family, [])
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert matching, f"no sample {name} {labels}"
    return sum(matching)


def label_names(samples: dict[str, list[Sample]], family: str) -> set[str]:
    return {key for s in samples[family] for key in s.labels if key != "le"}


def bucket_bounds(samples: dict[str, list[Sample]], family: str) -> list[float]:
    bounds = {float(s.labels["le"]) for s in samples[family] if s.name.endswith("_bucket")}
    return sorted(b for b in bounds if not math.isinf(b))


# ------------------------------------------------------------------ names, labels, units


def test_business_counters_count_requests_tokens_and_cost() -> None:
    metrics = Metrics()
    metrics.observe_request(record(), overhead_s=0.0004, upstream_s=0.7)
    metrics.observe_request(record(), overhead_s=0.0004, upstream_s=0.7)
    samples = scrape(metrics)
    who = {"tenant": "acme", "model": "gpt-4o-mini", "provider": "sim"}
    assert value(samples, "maas_requests_total", **who, status="200") == 2
    assert value(samples, "maas_tokens_total", **who, token_type="uncached_input") == 200
    assert value(samples, "maas_tokens_total", **who, token_type="cached_input") == 40
    assert value(samples, "maas_tokens_total", **who, token_type="output") == 100
    assert value(samples, "maas_cost_nanos_total", **who, currency="USD") == 90_000
    assert value(samples, "maas_compute_cost_nanos_total", **who, currency="USD") == 40_000
    assert label_names(samples, "maas_requests") == {"tenant", "model", "provider", "status"}
    money_labels = {"tenant", "model", "provider", "deployment", "currency"}
    assert label_names(samples, "maas_cost_nanos") == money_labels
    assert label_names(samples, "maas_compute_cost_nanos") == money_labels


def test_revenue_and_compute_cost_split_by_tenant_model_and_deployment() -> None:
    metrics = Metrics(MetricsConfig(max_tenant_labels=2))
    served = [
        ("acme", "gpt-4o-mini", "sim/mini-a", 45_000, 20_000),
        ("acme", "gpt-4o-mini", "sim/mini-b", 45_000, 7_000),  # a second deployment
        ("globex", "gpt-4o-mini", "sim/mini-a", 10_000, 20_000),  # sold below cost
        ("initech", "gpt-4o-mini", "sim/mini-a", 1_000, 300),  # beyond the cap
        ("umbrella", "gpt-4o-mini", "", 0, 0),  # refused before a deployment was chosen
    ]
    for tenant, model, deployment, cost, compute in served:
        rec = record(
            tenant_id=tenant,
            model=model,
            deployment=deployment,
            cost_nanos=cost,
            compute_cost_nanos=compute,
        )
        metrics.observe_request(rec, overhead_s=0.0003, upstream_s=0.5)
    samples = scrape(metrics)

    def by(name: str, *labels: str) -> dict[tuple[str, ...], float]:
        totals: dict[tuple[str, ...], float] = {}
        for s in samples[name.removesuffix("_total")]:
            key = tuple(s.labels[label] for label in labels)
            totals[key] = totals.get(key, 0) + s.value
        return totals

    assert by("maas_compute_cost_nanos_total", "tenant", "deployment") == {
        ("acme", "sim/mini-a"): 20_000,
        ("acme", "sim/mini-b"): 7_000,
        ("globex", "sim/mini-a"): 20_000,
        ("other", "sim/mini-a"): 300,  # the same tenant cap as revenue
        ("other", "none"): 0,
    }
    assert by("maas_cost_nanos_total", "tenant", "deployment") == {
        ("acme", "sim/mini-a"): 45_000,
        ("acme", "sim/mini-b"): 45_000,
        ("globex", "sim/mini-a"): 10_000,
        ("other", "sim/mini-a"): 1_000,
        ("other", "none"): 0,
    }


def test_token_usage_follows_the_opentelemetry_convention() -> None:
    metrics = Metrics()
    metrics.observe_request(record(), overhead_s=0.0004, upstream_s=0.7)
    samples = scrape(metrics)
    assert label_names(samples, "gen_ai_client_token_usage") == {
        "gen_ai_operation_name",
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "gen_ai_token_type",
    }
    chat = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "gpt-4o-mini"}
    assert value(samples, "gen_ai_client_token_usage_sum", **chat, gen_ai_token_type="input") == 120
    assert value(samples, "gen_ai_client_token_usage_sum", **chat, gen_ai_token_type="output") == 50
    assert bucket_bounds(samples, "gen_ai_client_token_usage") == list(TOKEN_USAGE_BUCKETS)
    assert TOKEN_USAGE_BUCKETS[:3] == (1, 4, 16) and TOKEN_USAGE_BUCKETS[-1] == 67108864


def test_embeddings_record_input_tokens_only() -> None:
    metrics = Metrics()
    embedding = record(endpoint="embeddings", usage=Usage(uncached_input=64), model="emb")
    metrics.observe_request(embedding, overhead_s=0.0002, upstream_s=0.05)
    samples = scrape(metrics)
    types = {s.labels["gen_ai_token_type"] for s in samples["gen_ai_client_token_usage"]}
    assert types == {"input"}
    assert value(samples, "gen_ai_client_token_usage_count", gen_ai_operation_name="embeddings")
    assert value(samples, "maas_tokens_total", model="emb", token_type="output") == 0


def test_latency_histograms_use_seconds_and_the_recommended_buckets() -> None:
    metrics = Metrics()
    streamed = record(stream=True, ttft_ms=200.0, duration_ms=1200.0, usage=Usage(100, 0, 11))
    metrics.observe_request(streamed, overhead_s=0.0004, upstream_s=1.1)
    metrics.observe_request(record(stream=False), overhead_s=0.0004, upstream_s=0.7)
    samples = scrape(metrics)
    e2e = "gen_ai_server_request_duration_seconds"
    assert value(samples, f"{e2e}_count") == 2
    assert value(samples, f"{e2e}_sum") == pytest.approx(2.0)
    assert value(samples, "gen_ai_client_operation_duration_seconds_sum") == pytest.approx(1.8)
    assert bucket_bounds(samples, e2e) == list(DURATION_BUCKETS)
    ttft = "gen_ai_server_time_to_first_token_seconds"
    assert value(samples, f"{ttft}_count") == 1  # only the stream has a first token
    assert value(samples, f"{ttft}_sum") == pytest.approx(0.2)
    assert value(samples, f"{ttft}_bucket", le="0.1") == 0
    assert value(samples, f"{ttft}_bucket", le="0.25") == 1
    assert bucket_bounds(samples, ttft) == list(TTFT_BUCKETS)
    tpot = "gen_ai_server_time_per_output_token_seconds"
    assert value(samples, f"{tpot}_sum") == pytest.approx(0.1)  # (1.2 - 0.2) s / 10 tokens
    assert bucket_bounds(samples, tpot) == list(TIME_PER_OUTPUT_TOKEN_BUCKETS)
    assert label_names(samples, ttft) == {
        "gen_ai_operation_name",
        "gen_ai_provider_name",
        "gen_ai_request_model",
    }


def test_gateway_overhead_buckets_resolve_sub_millisecond_values() -> None:
    metrics = Metrics()
    for overhead in (0.00007, 0.0004, 0.0005, 0.0009, 0.004):  # 0.0005 is on a bound
        metrics.observe_request(record(), overhead_s=overhead, upstream_s=None)
    samples = scrape(metrics)
    overhead_name = "maas_gateway_overhead_seconds"
    bounds = bucket_bounds(samples, overhead_name)
    assert bounds[0] <= 0.0001
    assert len([b for b in bounds if b < 0.001]) >= 4
    assert value(samples, f"{overhead_name}_bucket", le="0.0001") == 1
    assert value(samples, f"{overhead_name}_bucket", le="0.0005") == 3  # upper bound inclusive
    assert value(samples, f"{overhead_name}_bucket", le="0.001") == 4
    assert value(samples, f"{overhead_name}_bucket", le="0.005") == 5
    assert value(samples, f"{overhead_name}_sum") == pytest.approx(0.00587)
    assert label_names(samples, "maas_gateway_overhead_seconds") == {"endpoint", "stream"}
    # no upstream time was given, so none is observed
    assert value(samples, "gen_ai_client_operation_duration_seconds_count") == 0


def test_failures_are_labelled_by_status_and_error_type() -> None:
    metrics = Metrics()
    metrics.observe_request(record(), overhead_s=0.0003, upstream_s=0.5)
    failed = record(status_code=502, error_type=None, usage=Usage(100), stream=True, ttft_ms=90.0)
    metrics.observe_request(failed, overhead_s=0.0003, upstream_s=0.5)
    bad = record(status_code=400, error_type="invalid_request_error", usage=Usage())
    metrics.observe_request(bad, overhead_s=0.0003, upstream_s=None)
    samples = scrape(metrics)
    assert value(samples, "maas_requests_total", status="502") == 1
    assert value(samples, "maas_requests_total", status="400") == 1
    e2e = "gen_ai_server_request_duration_seconds_count"
    assert value(samples, e2e, error_type="502") == 1
    assert value(samples, e2e, error_type="invalid_request_error") == 1
    successes = [
        s for s in samples["gen_ai_server_request_duration_seconds"] if "error_type" in s.labels
    ]
    assert {s.labels["error_type"] for s in successes} >= {"", "502"}
    # a failed stream reports no time to first token
    assert "gen_ai_server_time_to_first_token_seconds" not in samples


def test_retries_refusals_budgets_ledger_and_deployments() -> None:
    metrics = Metrics()
    metrics.observe_request(record(attempts=3), overhead_s=0.0003, upstream_s=0.5)
    metrics.observe_refusal("acme", "gpt-4o-mini", "tpm")
    metrics.observe_refusal("acme", "gpt-4o-mini", "tpm")
    metrics.observe_refusal("acme", "gpt-4o-mini", "balance")
    metrics.set_tenant_budget(
        "acme",
        remaining_tokens={"day": 900, "month": None},
        limit_tokens={"day": 1000, "month": None},
        balance_nanos=12_500_000_000,
        currency="usd",
    )
    metrics.set_ledger(queue_depth=17, lag_s=2.5)
    metrics.set_deployment_health("sim/a", "gpt-4o-mini", "healthy", in_flight=3)
    metrics.set_deployment_health("sim/a", "gpt-4o-mini", "open", in_flight=0)
    samples = scrape(metrics)
    assert value(samples, "maas_upstream_retries_total", provider="sim") == 2
    assert value(samples, "maas_quota_refusals_total", reason="tpm", tenant="acme") == 2
    assert value(samples, "maas_quota_refusals_total", reason="balance") == 1
    budget = "maas_tenant_budget_remaining_tokens"
    assert value(samples, budget, tenant="acme", window="day") == 900
    assert not [s for s in samples[budget] if s.labels["window"] == "month"]  # unlimited
    assert value(samples, "maas_tenant_budget_limit_tokens", window="day") == 1000
    assert value(samples, "maas_tenant_balance_nanos", currency="USD") == 12_500_000_000
    assert value(samples, "maas_ledger_queue_depth") == 17
    assert value(samples, "maas_ledger_lag_seconds") == 2.5
    assert value(samples, "maas_deployment_state", deployment="sim/a", state="open") == 1
    assert value(samples, "maas_deployment_state", deployment="sim/a", state="healthy") == 0
    assert value(samples, "maas_deployment_in_flight", deployment="sim/a") == 0

    metrics.set_tenant_budget(
        "acme", remaining_tokens={"day": None}, balance_nanos=None, currency="USD"
    )
    samples = scrape(metrics)
    assert math.isnan(value(samples, budget, tenant="acme", window="day"))  # now unlimited


def test_vllm_style_backend_metrics() -> None:
    metrics = Metrics()
    metrics.backend.set_load("sim-small", running=3, waiting=2)
    metrics.backend.observe_finished(
        "sim-small", prompt_tokens=40, generation_tokens=12, ttft_s=0.03, finished_reason="length"
    )
    samples = scrape(metrics)
    assert value(samples, "vllm:num_requests_running", model_name="sim-small") == 3
    assert value(samples, "vllm:num_requests_waiting", model_name="sim-small") == 2
    assert value(samples, "vllm:prompt_tokens_total", model_name="sim-small") == 40
    assert value(samples, "vllm:generation_tokens_total", model_name="sim-small") == 12
    assert value(samples, "vllm:request_success_total", finished_reason="length") == 1
    assert value(samples, "vllm:time_to_first_token_seconds_count", model_name="sim-small") == 1


def test_backend_metrics_appear_only_once_used() -> None:
    metrics = Metrics()
    assert b"vllm:" not in metrics.render()[0]
    # so a collector of the same vLLM names can serve them through this registry instead
    collector_names = ("vllm:num_requests_running",)

    class SimulatorStats:
        def collect(self) -> Any:
            family = GaugeMetricFamily(collector_names[0], "Running.", labels=["model_name"])
            family.add_metric(["sim-small"], 4)
            yield family

    metrics.registry.register(SimulatorStats())  # type: ignore[arg-type]
    samples = scrape(metrics)
    assert value(samples, "vllm:num_requests_running", model_name="sim-small") == 4


# ------------------------------------------------------------------ provisioned capacity


def hardware_costs() -> ComputeCosts:
    """Two cards at 2.50 an hour on one simulated deployment, a wholesale price on another;
    from 12:00 the hardware deployment moves to three cards."""
    hardware = {"accelerator": "L4", "price_per_hour": "2.50", "count": 2}
    config = ComputeCostConfig.model_validate(
        {
            "deployments": {
                "sim/sim-mini": [
                    {"effective_from": "2026-03-01T00:00:00Z", "hardware": hardware},
                    {
                        "effective_from": "2026-03-01T12:00:00Z",
                        "hardware": {**hardware, "count": 3},
                    },
                ],
                "api/gpt-4": [
                    {
                        "effective_from": "2026-03-01",
                        "wholesale": {"input": "1", "output": "2"},
                    }
                ],
            }
        }
    )
    latency = LatencyModel(capacity=8, prefill_ms_per_token=0.02, itl_ms=15, slowdown_at_capacity=2)
    return ComputeCosts(config, {"sim/sim-mini": latency, "api/gpt-4": None, "sim/idle": latency})


@dataclass
class FakeClock:
    now: datetime = field(default_factory=lambda: datetime(2026, 3, 1, 11, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now


def test_provisioned_cost_grows_with_the_clock_at_the_hardware_price() -> None:
    metrics = Metrics()
    clock = FakeClock()
    metrics.track_provisioned(hardware_costs(), "usd", clock)
    provisioned = "maas_provisioned_cost_nanos_total"
    assert value(scrape(metrics), provisioned, deployment="sim/sim-mini", currency="USD") == 0
    clock.now += timedelta(minutes=30)  # 2 cards x 2.50 for half an hour
    assert value(scrape(metrics), provisioned, deployment="sim/sim-mini") == 2_500_000_000
    clock.now += timedelta(hours=1)  # another half hour at two cards, then half at three
    assert value(scrape(metrics), provisioned, deployment="sim/sim-mini") == 8_750_000_000
    # a wholesale upstream provisions nothing, so it has no series at all
    deployments = {s.labels["deployment"] for s in scrape(metrics)["maas_provisioned_cost_nanos"]}
    assert deployments == {"sim/sim-mini"}
    # served requests do not move it: idle capacity is provisioned minus compute cost
    metrics.observe_request(record(deployment="sim/sim-mini"), overhead_s=0.0003, upstream_s=0.5)
    assert value(scrape(metrics), provisioned) == 8_750_000_000


def test_no_provisioned_cost_without_a_hardware_profile() -> None:
    metrics = Metrics()
    metrics.track_provisioned(ComputeCosts(ComputeCostConfig(), {}), "USD", FakeClock())
    assert b"maas_provisioned" not in metrics.render()[0]


def test_reset_multiprocess_dir_removes_only_value_files(tmp_path: Path) -> None:
    for name in ("counter_11.db", "gauge_livesum_11.db", "histogram_12.db", "notes.db", "a.txt"):
        (tmp_path / name).write_text("x")
    reset_multiprocess_dir(tmp_path, now=1_700_000_000.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "counters-since", "notes.db"]
    assert float((tmp_path / "counters-since").read_text()) == 1_700_000_000.5
    assert reset_multiprocess_dir(tmp_path / "new" / "dir").is_dir()


# ------------------------------------------------------------------ simulated backends


@dataclass
class Stats:
    """A simulated backend's running totals (the shape of `SimulatorStats`)."""

    running: int = 0
    waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    finished_total: dict[str, int] = field(default_factory=dict)
    ttft_histogram: tuple[tuple[float, int], ...] = ()
    ttft_sum_seconds: float = 0.0


def ttft_histogram(*observations: float) -> tuple[tuple[float, int], ...]:
    """Cumulative counts at the simulator's bounds (vLLM's up to 80 s), then +Inf."""
    bounds = (*[b for b in VLLM_TTFT_BUCKETS if b <= 80], math.inf)
    return tuple((b, sum(1 for o in observations if o <= b)) for b in bounds)


def test_published_backend_totals_advance_by_what_is_new() -> None:
    metrics = Metrics()
    backend = metrics.backend
    backend.publish(
        "sim",
        Stats(2, 1, 100, 40, {"stop": 3}, ttft_histogram(0.03, 0.03, 0.7), 0.76),
    )
    backend.publish(
        "sim",
        Stats(0, 0, 150, 90, {"stop": 3, "length": 1}, ttft_histogram(0.03, 0.03, 0.7, 90), 90.76),
    )
    samples = scrape(metrics)
    assert value(samples, "vllm:num_requests_running", model_name="sim") == 0
    assert value(samples, "vllm:prompt_tokens_total", model_name="sim") == 150
    assert value(samples, "vllm:generation_tokens_total", model_name="sim") == 90
    assert value(samples, "vllm:request_success_total", finished_reason="stop") == 3
    assert value(samples, "vllm:request_success_total", finished_reason="length") == 1
    ttft = "vllm:time_to_first_token_seconds"
    assert value(samples, f"{ttft}_bucket", le="0.04") == 2
    assert value(samples, f"{ttft}_bucket", le="0.75") == 3
    assert value(samples, f"{ttft}_bucket", le="2560.0") == 3  # over 80 s: only +Inf is sure
    assert value(samples, f"{ttft}_count") == 4
    assert value(samples, f"{ttft}_sum") == pytest.approx(90.76)


# ------------------------------------------------------------------ cardinality


def test_tenants_beyond_the_cap_are_counted_as_other() -> None:
    metrics = Metrics(MetricsConfig(max_tenant_labels=2))
    for tenant in ("acme", "globex", "initech", "umbrella", "acme"):
        metrics.observe_request(record(tenant_id=tenant), overhead_s=0.0003, upstream_s=0.5)
        metrics.set_tenant_budget(
            tenant, remaining_tokens={"day": 5}, balance_nanos=7, currency="USD"
        )
    metrics.observe_refusal("hooli", "gpt-4o-mini", "rpm")
    samples = scrape(metrics)
    tenants = {s.labels["tenant"] for s in samples["maas_requests"]}
    assert tenants == {"acme", "globex", "other"}
    assert value(samples, "maas_requests_total", tenant="acme") == 2
    assert value(samples, "maas_requests_total", tenant="other") == 2
    assert value(samples, "maas_tokens_total", tenant="other", token_type="output") == 100
    assert value(samples, "maas_quota_refusals_total", tenant="other") == 1
    # a budget summed over unrelated tenants would mean nothing, so "other" has none
    assert {s.labels["tenant"] for s in samples["maas_tenant_balance_nanos"]} == {"acme", "globex"}


def test_models_beyond_the_cap_are_counted_as_other() -> None:
    metrics = Metrics(MetricsConfig(max_model_labels=1))
    for model in ("gpt-4o-mini", "made-up-model-1", "made-up-model-2"):
        metrics.observe_request(record(model=model), overhead_s=0.0003, upstream_s=0.5)
    samples = scrape(metrics)
    assert {s.labels["model"] for s in samples["maas_requests"]} == {"gpt-4o-mini", "other"}


def test_no_key_or_request_ids_anywhere_in_the_exposition() -> None:
    metrics = Metrics()
    for n in range(5):
        rec = record(request_id=f"req-unique-{n}", key_id=f"key-secret-{n}", stream=True)
        metrics.observe_request(rec, overhead_s=0.0003, upstream_s=0.5)
    body, _ = metrics.render()
    assert b"req-unique" not in body and b"key-secret" not in body
    samples = scrape(metrics)
    names = {key for family in samples.values() for s in family for key in s.labels}
    assert not {name for name in names if "key" in name or "request_id" in name}


# ------------------------------------------------------------------ exactness


def test_cost_counter_is_an_exact_integer_of_nano_units() -> None:
    metrics = Metrics()
    costs = [2**52] + [123_456_789] * 999 + [1]
    for n, cost in enumerate(costs):
        metrics.observe_request(record(cost_nanos=cost), overhead_s=0.0003, upstream_s=0.5)
        if n % 300 == 0:
            metrics.flush()  # totals cross several flushes
    body, _ = metrics.render()
    expected = sum(costs)
    assert expected > 2**52  # past the point where float64 spacing reaches 1
    line = next(
        line for line in body.decode().splitlines() if line.startswith("maas_cost_nanos_total{")
    )
    assert Decimal(line.rsplit(" ", 1)[1]) == expected


def test_disabled_metrics_record_nothing() -> None:
    metrics = Metrics(MetricsConfig(enabled=False))
    metrics.observe_request(record(), overhead_s=0.0003, upstream_s=0.5)
    metrics.observe_refusal("acme", "gpt-4o-mini", "rpm")
    metrics.set_ledger(queue_depth=1, lag_s=1.0)
    body, _ = metrics.render()
    assert b"maas_" not in body and b"gen_ai" not in body


def test_registry_can_be_supplied() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    metrics.observe_request(record(), overhead_s=0.0003, upstream_s=0.5)
    metrics.flush()
    assert (
        registry.get_sample_value(
            "maas_requests_total",
            {"tenant": "acme", "model": "gpt-4o-mini", "provider": "sim", "status": "200"},
        )
        == 1
    )


async def test_observations_reach_the_registry_within_the_flush_interval() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(MetricsConfig(flush_interval_s=0.05), registry=registry)
    labels = {"tenant": "acme", "model": "gpt-4o-mini", "provider": "sim", "status": "200"}
    metrics.observe_request(record(), overhead_s=0.0003, upstream_s=0.5)
    assert registry.get_sample_value("maas_requests_total", labels) == 0
    await asyncio.sleep(0.2)
    assert registry.get_sample_value("maas_requests_total", labels) == 1


def test_observe_request_is_cheap() -> None:
    metrics = Metrics()
    streamed = record(stream=True, ttft_ms=150.0, duration_ms=900.0)
    metrics.observe_request(streamed, overhead_s=0.0003, upstream_s=0.8)
    rounds, batches = 5_000, 3
    timings = []
    for _ in range(batches):  # the best of three, so a busy machine does not decide
        started = time.perf_counter()
        for _ in range(rounds):
            metrics.observe_request(streamed, overhead_s=0.0003, upstream_s=0.8)
        timings.append((time.perf_counter() - started) / rounds * 1e6)
    assert min(timings) < 25, f"{min(timings):.1f} µs per observe_request"
    samples = scrape(metrics)
    assert value(samples, "maas_requests_total") == rounds * batches + 1


# ------------------------------------------------------------------ multiprocess mode

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from datetime import UTC, datetime
    from billing.record import UsageRecord
    from billing.usage import Usage
    from gateway.metrics import Metrics, mark_process_dead

    spec = json.loads(sys.argv[1])
    for pid in spec.get("dead", []):
        mark_process_dead(pid)
    print(os.getpid())
    metrics = Metrics()
    if spec.get("clock"):
        from tests.test_metrics import hardware_costs

        now = datetime.fromisoformat(spec["clock"])
        metrics.track_provisioned(hardware_costs(), "USD", lambda: now)
    for n in range(spec["requests"]):
        rec = UsageRecord(
            request_id=f"req-{n}", started_at=datetime.now(UTC), tenant_id=spec["tenant"],
            key_id="key-1", model="gpt-4o-mini", endpoint="chat.completions", provider="sim",
            deployment="sim/sim-mini", usage=Usage(10, 5, 7), cost_nanos=spec["cost"],
            compute_cost_nanos=spec["cost"] // 3, status_code=200,
            stream=True, ttft_ms=100.0, duration_ms=500.0,
        )
        metrics.observe_request(rec, overhead_s=0.0003, upstream_s=0.4)
    if spec.get("queue") is not None:
        metrics.set_ledger(queue_depth=spec["queue"], lag_s=1.0)
    if spec.get("render"):
        sys.stdout.write(metrics.render()[0].decode())
    metrics.flush()
    """
)


def run_worker(multiproc_dir: Path, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def parse(stdout: str) -> tuple[int, dict[str, list[Sample]]]:
    """A worker's pid and, if it rendered, its exposition."""
    pid, _, body = stdout.partition("\n")
    families = text_string_to_metric_families(body)
    return int(pid), {f.name: f.samples for f in families if f.samples}


def test_multiprocess_mode_sums_workers_without_double_counting(tmp_path: Path) -> None:
    multiproc_dir = tmp_path / "prometheus-multiproc"
    multiproc_dir.mkdir()
    first = run_worker(
        multiproc_dir, {"requests": 3, "tenant": "acme", "cost": 1_000_000_007, "queue": 5}
    )
    # the second worker both observes and serves the scrape
    second = run_worker(
        multiproc_dir,
        {"requests": 2, "tenant": "acme", "cost": 1_000_000_007, "queue": 7, "render": True},
    )
    _, samples = parse(second.stdout)
    assert value(samples, "maas_requests_total", tenant="acme") == 5
    assert value(samples, "maas_tokens_total", token_type="uncached_input") == 50
    assert value(samples, "maas_tokens_total", token_type="output") == 35
    assert value(samples, "maas_cost_nanos_total", tenant="acme") == 5_000_000_035
    compute = value(samples, "maas_compute_cost_nanos_total", deployment="sim/sim-mini")
    assert compute == 5 * (1_000_000_007 // 3)
    assert value(samples, "gen_ai_server_time_to_first_token_seconds_count") == 5
    assert value(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == 5
    assert value(samples, "maas_ledger_queue_depth") == 12  # livesum over both workers

    # once the first worker is marked dead its live gauge drops out; counters stay
    first_pid, nothing_rendered = parse(first.stdout)
    assert nothing_rendered == {}
    third = run_worker(
        multiproc_dir,
        {"requests": 0, "tenant": "acme", "cost": 0, "render": True, "dead": [first_pid]},
    )
    _, samples = parse(third.stdout)
    assert value(samples, "maas_requests_total", tenant="acme") == 5
    assert value(samples, "maas_ledger_queue_depth") == 7


def test_every_worker_counts_provisioned_cost_from_the_directory_stamp(tmp_path: Path) -> None:
    multiproc_dir = reset_multiprocess_dir(
        tmp_path / "prometheus-multiproc", now=datetime(2026, 3, 1, 10, 0, tzinfo=UTC).timestamp()
    )
    late = run_worker(
        multiproc_dir,
        {"requests": 1, "tenant": "acme", "cost": 9, "render": True, "clock": "2026-03-01T11:00Z"},
    )
    _, samples = parse(late.stdout)
    # a worker started at 11:00 counts from 10:00 (2 cards x 2.50 an hour) like every other
    assert value(samples, "maas_provisioned_cost_nanos_total") == 5_000_000_000
    assert value(samples, "maas_requests_total") == 1


def test_multiprocess_directory_set_after_import_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics()
