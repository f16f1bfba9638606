"""Compute cost: hardware profiles and wholesale prices, versioned, charged on every request."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from billing.compute_cost import (
    ComputeCostConfig,
    ComputeCostError,
    ComputeCosts,
    LatencyModel,
)
from billing.usage import Usage
from tests.harness import ACME_KEY, running_gateway

LATENCY = LatencyModel(capacity=64, prefill_ms_per_token=0.5, itl_ms=15, slowdown_at_capacity=2.0)
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_15 = datetime(2026, 11, 15, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)


def costs(deployments: dict[str, object], latency: LatencyModel | None = LATENCY) -> ComputeCosts:
    config = ComputeCostConfig.model_validate({"deployments": deployments})
    return ComputeCosts(config, {"sim/a": latency, "real/b": None})


def test_hardware_profile_prices_tokens_by_slot_time_at_capacity() -> None:
    # $2/h over 64 slots: a slot-ms costs 2 / 3_600_000 / 64. An output token holds a slot
    # 15 ms x 2.0 = 30 ms -> $0.2604166/M -> 260 nanos; an input token 0.5 ms -> 4 nanos.
    c = costs({"sim/a": [{"effective_from": "2026-01-01", "hardware": {"price_per_hour": "2.00"}}]})
    rate = c.rate("sim/a", NOV_1)
    assert rate is not None
    assert (rate.input_nanos, rate.output_nanos, rate.cached_nanos) == (4, 260, 0)
    assert round(rate.output_per_million, 6) == Decimal("0.260417")
    usage = Usage(uncached_input=1000, cached_input=0, output=500)
    assert c.cost_nanos("sim/a", usage, NOV_1) == 1000 * 4 + 500 * 260


def test_versions_apply_by_request_start_and_wholesale_prices_real_upstreams() -> None:
    c = costs(
        {
            "sim/a": [
                {"effective_from": "2026-01-01", "hardware": {"price_per_hour": "2.00"}},
                {"effective_from": "2026-11-15", "hardware": {"price_per_hour": "0.50"}},
            ],
            "real/b": [
                {"effective_from": "2026-01-01", "wholesale": {"input": "1", "output": "2"}}
            ],
        }
    )
    usage = Usage(uncached_input=0, output=1000)
    assert c.cost_nanos("sim/a", usage, datetime(2026, 11, 14, 23, 59, tzinfo=UTC)) == 260_000
    assert c.cost_nanos("sim/a", usage, NOV_15) == 65_000  # $0.0651/M -> 65 nanos
    assert c.cost_nanos("real/b", Usage(uncached_input=10, output=5), NOV_1) == 10_000 + 10_000
    assert c.cost_nanos("real/b", usage, datetime(2025, 12, 31, tzinfo=UTC)) == 0  # none yet
    assert c.cost_nanos("unconfigured", usage, NOV_1) == 0


def test_provisioned_cost_counts_every_hour_of_every_hardware_version() -> None:
    c = costs(
        {
            "sim/a": [
                {
                    "effective_from": "2026-01-01",
                    "hardware": {"price_per_hour": "2.00", "count": 3, "fleet_share": "0.5"},
                },
                {
                    "effective_from": "2026-11-15",
                    "hardware": {"price_per_hour": "1.00", "count": 3, "fleet_share": "0.5"},
                },
            ],
            "real/b": [
                {"effective_from": "2026-01-01", "wholesale": {"input": "1", "output": "2"}}
            ],
        }
    )
    # 14 days at $3/h, then 16 days at $1.50/h.
    expected = (14 * 24 * 3 + 16 * 24 * Decimal("1.5")) * 10**9
    assert c.provisioned_nanos("sim/a", NOV_1, DEC_1) == expected
    assert c.provisioned_nanos("real/b", NOV_1, DEC_1) == 0


def test_configuration_errors_name_the_deployment() -> None:
    with pytest.raises(ComputeCostError, match="unknown deployment"):
        costs(
            {"nope/x": [{"effective_from": "2026-01-01", "wholesale": {"input": 1, "output": 1}}]}
        )
    with pytest.raises(ComputeCostError, match=r"real/b\[0\].hardware"):
        costs({"real/b": [{"effective_from": "2026-01-01", "hardware": {"price_per_hour": 1}}]})
    with pytest.raises(ValueError, match="exactly one"):
        ComputeCostConfig.model_validate(
            {"deployments": {"sim/a": [{"effective_from": "2026-01-01"}]}}
        )


async def test_every_request_records_its_compute_cost_in_ledger_and_rollups(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    compute_costs = {
        "deployments": {
            "sim/sim-mini": [
                {"effective_from": "2026-01-01", "wholesale": {"input": "0.1", "output": "0.4"}}
            ],
            "sim/sim-4": [{"effective_from": "2026-01-01", "hardware": {"price_per_hour": "2.00"}}],
        }
    }
    async with running_gateway(tmp_path, tokenizer_dir, compute_costs=compute_costs) as gw:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            for model in ("gpt-4o-mini", "gpt-4"):
                answer = await client.post(
                    "/v1/chat/completions",
                    headers={"authorization": f"Bearer {ACME_KEY}"},
                    json={"model": model, "messages": [{"role": "user", "content": "Hi there"}]},
                )
                assert answer.status_code == 200
            metrics = (await client.get(gw.metrics_url)).text
    database = sqlite3.connect(tmp_path / "ledger.db")
    rows = database.execute(
        "SELECT deployment, uncached_input, output, compute_cost_nanos FROM ledger_entries"
    ).fetchall()
    by_deployment = {row[0]: row for row in rows}
    _, tokens_in, tokens_out, compute = by_deployment["sim/sim-mini"]
    assert compute == tokens_in * 100 + tokens_out * 400
    _, tokens_in, tokens_out, compute = by_deployment["sim/sim-4"]
    # The default simulated backend: 64 slots, 15 ms/token, slowdown 2, prefill 0.02 ms.
    assert compute == tokens_in * 0 + tokens_out * 260
    rolled = dict(
        database.execute(
            "SELECT deployment, sum(compute_cost_nanos) FROM usage_rollups GROUP BY deployment"
        ).fetchall()
    )
    assert rolled == {name: row[3] for name, row in by_deployment.items()}
    assert (
        'maas_compute_cost_nanos_total{currency="USD",deployment="sim/sim-mini",model="gpt-4o-mini"'
        in metrics
    )
