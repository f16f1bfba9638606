"""The margin report: revenue, compute cost, idle capacity and gross margin of a month.

Money comes from the ledger's rollups (the same rows invoices are built from): revenue is
the sum of request costs (what tenants were charged, before tax), compute cost the sum of
request compute costs. Each tenant is counted over its own calendar month (its invoice's
period); the report's window is the union of those months, and deployments' provisioned
accelerator cost is counted over that window. Idle capacity is provisioned cost minus the
compute cost of the tokens served: cost with no revenue. Gross margin is revenue minus
compute cost minus idle capacity (by tenant and model, revenue minus compute cost; idle
capacity is a row of its own).

Idle capacity is never negative: a deployment offered more work than it can serve is 100%
utilised, and the excess waits in its queue (`economics.capacity`).

Latency is *modelled*: the simulated backends run with `time_scale: 0`, so each successful
request's time to first token and total time are computed from its deployment's latency
model and its queue: TTFT is the wait in the queue plus `ttft_overhead_ms +
prefill_ms_per_token x prompt`, and decoding slows with the utilisation of its hour.
Refusals are requests the gateway answered with 429; those a deployment refused for want
of capacity (a 429 with a deployment) are counted per deployment too.

Unit economics (`UnitEconomics`) are per million input and per million output tokens, per
model and deployment: list price, realised price, compute cost and gross margin (realised
price minus compute cost), all from the rollups (see `unit_economics`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from billing.compute_cost import ComputeCosts, build_compute_costs
from billing.invoice import month_buckets
from billing.ledger import Ledger
from billing.store.usage import Sums, entries, rollup_sums
from economics.capacity import BUCKET_SECONDS as QUEUE_SECONDS
from economics.capacity import fleet_queues, offered_work
from economics.unit import UnitEconomics, unit_economics, unit_table
from gateway.config import Settings

__all__ = [
    "IDLE",
    "DailyPoint",
    "DeploymentCost",
    "LatencySummary",
    "MarginReport",
    "MarginRow",
    "Saturation",
    "build_margin_report",
]

IDLE = "(idle capacity)"


@dataclass(slots=True)
class MarginRow:
    """Revenue and compute cost of one group of requests (a tenant, model, deployment...)."""

    key: str
    requests: int = 0
    error_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    revenue_nanos: int = 0
    compute_nanos: int = 0

    @property
    def margin_nanos(self) -> int:
        return self.revenue_nanos - self.compute_nanos

    @property
    def margin_pct(self) -> float | None:
        return 100 * self.margin_nanos / self.revenue_nanos if self.revenue_nanos else None

    def add(self, sums: Sums) -> None:
        self.requests += sums.requests
        self.error_requests += sums.error_requests
        self.input_tokens += sums.input_tokens
        self.output_tokens += sums.output
        self.revenue_nanos += sums.cost_nanos
        self.compute_nanos += sums.compute_cost_nanos

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["margin_nanos"] = self.margin_nanos
        data["margin_pct"] = self.margin_pct
        return data


@dataclass(slots=True)
class DeploymentCost:
    """A deployment's costs over the report's window."""

    deployment: str
    kind: str  # "hardware", "wholesale" or "none"
    accelerator: str = ""
    count: int = 0
    revenue_nanos: int = 0
    compute_nanos: int = 0
    provisioned_nanos: int = 0
    input_per_million_at_capacity: Decimal = Decimal(0)
    output_per_million_at_capacity: Decimal = Decimal(0)
    saturation: Saturation | None = None  # simulated deployments only

    @property
    def idle_nanos(self) -> int:
        """Provisioned cost not covered by served tokens; 0 when saturated, never negative."""
        if self.kind != "hardware":
            return 0
        return max(0, self.provisioned_nanos - self.compute_nanos)

    @property
    def utilisation(self) -> float | None:
        """Served tokens' share of the provisioned capacity (hardware only), at most 1."""
        if self.kind != "hardware" or not self.provisioned_nanos:
            return None
        return min(1.0, self.compute_nanos / self.provisioned_nanos)

    @property
    def offered_load(self) -> float | None:
        """The tokens' slot time over the capacity provisioned (may exceed 1)."""
        if self.kind != "hardware" or not self.provisioned_nanos:
            return None
        return self.compute_nanos / self.provisioned_nanos

    def per_million_at_utilisation(self) -> tuple[Decimal, Decimal] | None:
        """Cost per million (input, output) tokens at the measured utilisation."""
        u = self.utilisation
        if not u:
            return None
        share = Decimal(str(u))
        return (
            self.input_per_million_at_capacity / share,
            self.output_per_million_at_capacity / share,
        )

    def to_dict(self) -> dict[str, Any]:
        at_u = self.per_million_at_utilisation()
        return {
            "deployment": self.deployment,
            "kind": self.kind,
            "accelerator": self.accelerator,
            "count": self.count,
            "revenue_nanos": self.revenue_nanos,
            "compute_nanos": self.compute_nanos,
            "provisioned_nanos": self.provisioned_nanos,
            "idle_nanos": self.idle_nanos,
            "utilisation": self.utilisation,
            "offered_load": self.offered_load,
            "saturation": asdict(self.saturation) if self.saturation is not None else None,
            "input_per_million_at_capacity": str(round(self.input_per_million_at_capacity, 4)),
            "output_per_million_at_capacity": str(round(self.output_per_million_at_capacity, 4)),
            "input_per_million_at_utilisation": str(round(at_u[0], 4)) if at_u else None,
            "output_per_million_at_utilisation": str(round(at_u[1], 4)) if at_u else None,
        }


@dataclass(slots=True)
class DailyPoint:
    """One UTC day of the window: revenue, compute cost, and hardware provisioned."""

    day: date
    revenue_nanos: int = 0
    compute_nanos: int = 0
    hardware_compute_nanos: int = 0
    provisioned_nanos: int = 0

    @property
    def idle_nanos(self) -> int:
        return max(0, self.provisioned_nanos - self.hardware_compute_nanos)


@dataclass(slots=True)
class Saturation:
    """How a simulated deployment's queue fared over the window (see `capacity`)."""

    requests: int = 0  # served
    saturated_buckets: int = 0  # hours that ended with work still waiting
    saturated_hours: float = 0.0
    first_saturated: str | None = None  # ISO time of the first such bucket
    peak_offered_load: float = 0.0  # the busiest bucket's offered work over its capacity
    backlog_at_end_s: float = 0.0  # queue left when the window ended, in seconds of wait
    refused: int = 0  # requests the deployment answered with 429
    ttft_p50_ms: float = 0.0
    ttft_p95_ms: float = 0.0
    ttft_p50_unsaturated_ms: float | None = None  # in buckets that did not saturate
    ttft_p95_saturated_ms: float | None = None  # in buckets that did
    wait_max_s: float = 0.0


@dataclass(slots=True)
class LatencySummary:
    """Modelled latency of successful requests, in milliseconds."""

    requests: int = 0
    ttft_p50_ms: float = 0.0
    ttft_p95_ms: float = 0.0
    e2e_p50_ms: float = 0.0
    e2e_p95_ms: float = 0.0
    saturated_share: float = 0.0  # share of requests in buckets loaded beyond capacity


@dataclass(slots=True)
class MarginReport:
    """A month's economics; money in integer nano-units of `currency`."""

    scenario: str
    month: str
    currency: str
    window_start: datetime
    window_end: datetime
    by_tenant: list[MarginRow] = field(default_factory=list)
    by_model: list[MarginRow] = field(default_factory=list)
    by_deployment: list[MarginRow] = field(default_factory=list)
    by_tenant_model: list[MarginRow] = field(default_factory=list)
    deployments: list[DeploymentCost] = field(default_factory=list)
    daily: list[DailyPoint] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # tenant -> 429 answers
    failures: int = 0  # other error answers
    latency: LatencySummary = field(default_factory=LatencySummary)
    unit: list[UnitEconomics] = field(default_factory=list)  # per million tokens

    @property
    def saturated(self) -> list[DeploymentCost]:
        """Deployments whose queue saturated (or that refused requests) in the window."""
        return [
            d
            for d in self.deployments
            if d.saturation is not None and (d.saturation.saturated_buckets or d.saturation.refused)
        ]

    @property
    def revenue_nanos(self) -> int:
        return sum(r.revenue_nanos for r in self.by_tenant)

    @property
    def compute_nanos(self) -> int:
        return sum(r.compute_nanos for r in self.by_tenant)

    @property
    def idle_nanos(self) -> int:
        return sum(d.idle_nanos for d in self.deployments)

    @property
    def gross_margin_nanos(self) -> int:
        return self.revenue_nanos - self.compute_nanos - self.idle_nanos

    @property
    def gross_margin_pct(self) -> float | None:
        revenue = self.revenue_nanos
        return 100 * self.gross_margin_nanos / revenue if revenue else None

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.by_tenant)

    @property
    def refused(self) -> int:
        return sum(self.refusals.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "month": self.month,
            "currency": self.currency,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "totals": {
                "requests": self.requests,
                "refused": self.refused,
                "failed": self.failures,
                "revenue_nanos": self.revenue_nanos,
                "compute_nanos": self.compute_nanos,
                "idle_nanos": self.idle_nanos,
                "gross_margin_nanos": self.gross_margin_nanos,
                "gross_margin_pct": self.gross_margin_pct,
            },
            "by_tenant": [r.to_dict() for r in self.by_tenant],
            "by_model": [r.to_dict() for r in self.by_model],
            "by_deployment": [r.to_dict() for r in self.by_deployment],
            "by_tenant_model": [r.to_dict() for r in self.by_tenant_model],
            "deployments": [d.to_dict() for d in self.deployments],
            "daily": [
                {
                    "day": p.day.isoformat(),
                    "revenue_nanos": p.revenue_nanos,
                    "compute_nanos": p.compute_nanos,
                    "idle_nanos": p.idle_nanos,
                }
                for p in self.daily
            ],
            "refusals": self.refusals,
            "latency": asdict(self.latency),
            "saturated": [d.deployment for d in self.saturated],
            "unit_economics": [u.to_dict() for u in self.unit],
        }

    def to_text(self) -> str:
        """The report as a plain-text table (amounts in currency units, 2 places)."""
        c = self.currency
        lines = [
            f"Margin report: {self.scenario}, {self.month}"
            f" ({self.window_start:%Y-%m-%d %H:%M}Z to {self.window_end:%Y-%m-%d %H:%M}Z), {c}",
            "",
            f"  revenue        {_money(self.revenue_nanos):>14}",
            f"  compute cost   {_money(self.compute_nanos):>14}  (tokens served)",
            f"  idle capacity  {_money(self.idle_nanos):>14}  (provisioned, not used)",
            f"  gross margin   {_money(self.gross_margin_nanos):>14}"
            f"  {_pct(self.gross_margin_pct)}",
            f"  requests {self.requests}, refused (429) {self.refused}, failed {self.failures}",
            f"  modelled latency: TTFT p50 {self.latency.ttft_p50_ms:.0f} ms,"
            f" p95 {self.latency.ttft_p95_ms:.0f} ms; total p50 {self.latency.e2e_p50_ms:.0f}"
            f" ms, p95 {self.latency.e2e_p95_ms:.0f} ms",
        ]
        for title, rows in (
            ("By tenant", self.by_tenant),
            ("By model", self.by_model),
            ("By deployment", self.by_deployment),
        ):
            lines += ["", title, _row_header()]
            lines += [_row_line(r) for r in rows]
            if title == "By deployment" and self.idle_nanos:
                idle = MarginRow(IDLE, compute_nanos=self.idle_nanos)
                lines.append(_row_line(idle))
        lines += [
            "",
            "Deployments",
            f"  {'deployment':<28} {'kind':<9} {'provisioned':>12} {'idle':>12} {'util':>6}"
            f" {'out/M@cap':>10} {'out/M@util':>10}",
        ]
        for d in self.deployments:
            at_u = d.per_million_at_utilisation()
            util = f"{100 * d.utilisation:.0f}%" if d.utilisation is not None else "-"
            lines.append(
                f"  {d.deployment:<28} {d.kind:<9} {_money(d.provisioned_nanos):>12}"
                f" {_money(d.idle_nanos):>12} {util:>6}"
                f" {d.output_per_million_at_capacity:>10.3f}"
                f" {(f'{at_u[1]:.3f}' if at_u else '-'):>10}"
            )
        lines += ["", *self._capacity_lines()]
        lines += ["", f"Per million tokens ({c}; margin = realised - compute)"]
        lines += unit_table(self.unit)
        return "\n".join(lines) + "\n"

    def _capacity_lines(self) -> list[str]:
        simulated = [d for d in self.deployments if d.saturation is not None]
        if not simulated:
            return ["Capacity: no simulated deployments"]
        if not self.saturated:
            peak = max(d.saturation.peak_offered_load for d in simulated if d.saturation)
            return [
                f"Capacity: no deployment saturated (busiest hour at {100 * peak:.0f}% of capacity)"
            ]
        lines = [
            "Capacity: saturated deployments (offered more work than they can serve)",
            f"  {'deployment':<28} {'hours':>7} {'first':>17} {'peak':>6} {'refused':>8}"
            f" {'TTFT p50 calm':>14} {'TTFT p95 sat.':>14} {'max wait':>9}",
        ]
        for d in self.saturated:
            sat = d.saturation
            assert sat is not None
            first = (sat.first_saturated or "-")[:16]
            p50, p95 = sat.ttft_p50_unsaturated_ms, sat.ttft_p95_saturated_ms
            calm = "-" if p50 is None else f"{p50:.0f} ms"
            busy = "-" if p95 is None else f"{p95:.0f} ms"
            lines.append(
                f"  {d.deployment:<28} {sat.saturated_hours:>7.2f} {first:>17}"
                f" {100 * sat.peak_offered_load:>5.0f}% {sat.refused:>8}"
                f" {calm:>14} {busy:>14} {sat.wait_max_s:>7.0f} s"
            )
        return lines


def _money(nanos: int) -> str:
    return f"{Decimal(nanos).scaleb(-9):,.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _row_header() -> str:
    return (
        f"  {'':<28} {'requests':>9} {'tokens in':>12} {'tokens out':>11}"
        f" {'revenue':>12} {'compute':>12} {'margin':>12} {'margin%':>8}"
    )


def _row_line(r: MarginRow) -> str:
    return (
        f"  {r.key:<28} {r.requests:>9} {r.input_tokens:>12} {r.output_tokens:>11}"
        f" {_money(r.revenue_nanos):>12} {_money(r.compute_nanos):>12}"
        f" {_money(r.margin_nanos):>12} {_pct(r.margin_pct):>8}"
    )


async def build_margin_report(
    ledger: Ledger, settings: Settings, month: str, scenario: str = ""
) -> MarginReport:
    """The month's margin report from the ledger's rollups (see the module doc)."""
    await ledger.flush()
    costs = build_compute_costs(settings)
    tenants = {t.id: t for t in settings.tenants}
    windows = {tid: month_buckets(month, t.timezone) for tid, t in tenants.items()}
    first = min(w[0] for w in windows.values())
    last = max(w[1] for w in windows.values())
    window_start = datetime.fromtimestamp(first, UTC)
    window_end = datetime.fromtimestamp(last, UTC)
    groups = await rollup_sums(
        ledger.engine, by=("tenant_id", "model", "deployment", "bucket"), first=first, end=last
    )
    by_tenant: dict[str, MarginRow] = {t: MarginRow(t) for t in tenants}
    by_model: dict[str, MarginRow] = {}
    by_deployment: dict[str, MarginRow] = {}
    by_tenant_model: dict[str, MarginRow] = {}
    day_of = _day_index(window_start, window_end)
    daily = {d: DailyPoint(d) for d in day_of.values()}
    hardware = {d for d in costs.deployments if _kind(costs, d, window_start) == "hardware"}
    for group in groups:
        tenant_id, model, deployment, bucket = group.key
        lo, hi = windows.get(tenant_id, (first, last))
        if not lo <= bucket < hi:
            continue  # another month of this tenant
        values = group.sums
        by_tenant.setdefault(tenant_id, MarginRow(tenant_id)).add(values)
        by_model.setdefault(model, MarginRow(model)).add(values)
        served_by = deployment or "(not served)"
        by_deployment.setdefault(served_by, MarginRow(served_by)).add(values)
        key = f"{tenant_id} / {model}"
        by_tenant_model.setdefault(key, MarginRow(key)).add(values)
        point = daily[day_of[bucket - bucket % 86400]]
        point.revenue_nanos += values.cost_nanos
        point.compute_nanos += values.compute_cost_nanos
        if deployment in hardware:
            point.hardware_compute_nanos += values.compute_cost_nanos
    for name in sorted(set(by_deployment) - {"(not served)"} | costs.deployments):
        by_deployment.setdefault(name, MarginRow(name))
    report = MarginReport(
        scenario=scenario,
        month=month,
        currency=settings.pricing.currency,
        window_start=window_start,
        window_end=window_end,
        by_tenant=sorted(by_tenant.values(), key=lambda r: r.key),
        by_model=sorted(by_model.values(), key=lambda r: r.key),
        by_deployment=sorted(by_deployment.values(), key=lambda r: r.key),
        by_tenant_model=sorted(by_tenant_model.values(), key=lambda r: r.key),
    )
    for name in sorted(costs.deployments | {r.key for r in report.by_deployment}):
        if name == "(not served)":
            continue
        report.deployments.append(_deployment_cost(costs, name, by_deployment, report))
    for point in daily.values():
        start = datetime.combine(point.day, datetime.min.time(), UTC)
        since, until = max(start, window_start), min(start + timedelta(days=1), window_end)
        point.provisioned_nanos = sum(costs.provisioned_nanos(d, since, until) for d in hardware)
    report.daily = [daily[d] for d in sorted(daily)]
    await _refusals_and_latency(ledger, settings, costs, windows, report)
    report.unit = await unit_economics(ledger, costs, windows, settings.pricing.off_peak)
    return report


def _kind(costs: ComputeCosts, deployment: str, at: datetime) -> str:
    rate = costs.rate(deployment, at) or costs.rate(deployment, datetime.max.replace(tzinfo=UTC))
    return rate.kind if rate is not None else "none"


def _deployment_cost(
    costs: ComputeCosts, name: str, rows: dict[str, MarginRow], report: MarginReport
) -> DeploymentCost:
    row = rows.get(name, MarginRow(name))
    mid = report.window_start + (report.window_end - report.window_start) / 2
    rate = costs.rate(name, mid) or costs.rate(name, report.window_end - timedelta(seconds=1))
    cost = DeploymentCost(
        deployment=name,
        kind=rate.kind if rate is not None else "none",
        revenue_nanos=row.revenue_nanos,
        compute_nanos=row.compute_nanos,
        provisioned_nanos=costs.provisioned_nanos(name, report.window_start, report.window_end),
    )
    if rate is not None:
        cost.accelerator, cost.count = rate.accelerator, rate.count
        cost.input_per_million_at_capacity = rate.input_per_million
        cost.output_per_million_at_capacity = rate.output_per_million
    return cost


def _day_index(start: datetime, end: datetime) -> dict[int, date]:
    """UTC day start (epoch seconds) -> date, for every day the window touches."""
    days = {}
    day = datetime.combine(start.date(), datetime.min.time(), UTC)
    while day < end:
        days[int(day.timestamp())] = day.date()
        day += timedelta(days=1)
    return days


_Sample = tuple[str, int, float, int, int]  # deployment, bucket, fraction into it, in, out
_SAMPLED = ("started_at", "deployment", "status_code", "uncached_input", "cached_input", "output")


async def _refusals_and_latency(
    ledger: Ledger,
    settings: Settings,
    costs: ComputeCosts,
    windows: dict[str, tuple[int, int]],
    report: MarginReport,
) -> None:
    refusals: dict[str, int] = defaultdict(int)
    refused_by: dict[str, int] = defaultdict(int)
    failures = 0
    samples: list[_Sample] = []
    for tenant_id, (lo, hi) in windows.items():
        start = datetime.fromtimestamp(lo, UTC)
        end = datetime.fromtimestamp(hi, UTC)
        rows = entries(ledger.engine, _SAMPLED, tenant_id=tenant_id, start=start, end=end)
        async for chunk in rows:
            for row in chunk:
                started_at, deployment, status, uncached, cached, tokens_out = tuple(row)
                tokens_in = uncached + cached
                if status == 429:
                    refusals[tenant_id] += 1
                    if deployment:
                        refused_by[deployment] += 1
                elif status >= 400:
                    failures += 1
                elif deployment:
                    moment = started_at.replace(tzinfo=UTC).timestamp()
                    bucket = int(moment) - int(moment) % QUEUE_SECONDS
                    fraction = (moment - bucket) / QUEUE_SECONDS
                    samples.append((deployment, bucket, fraction, int(tokens_in), int(tokens_out)))
    report.refusals = {t: refusals.get(t, 0) for t in sorted(windows)}
    report.failures = failures
    report.latency, saturation = _modelled_latency(samples, costs, report.window_end)
    for cost in report.deployments:
        if cost.deployment in saturation:
            cost.saturation = saturation[cost.deployment]
            cost.saturation.refused = refused_by.get(cost.deployment, 0)


def _modelled_latency(
    samples: list[_Sample], costs: ComputeCosts, window_end: datetime
) -> tuple[LatencySummary, dict[str, Saturation]]:
    """Each request's latency from its deployment's latency model and queue.

    The queue (`economics.capacity`) gives each request's wait before its first
    token; the decode slowdown grows from 1 to `slowdown_at_capacity` with its bucket's
    utilisation (at most 1). A request in a bucket that ends with work waiting is counted
    as saturated.
    """
    queues = fleet_queues(costs)
    work = offered_work(queues, ((d, b, i, o) for d, b, _, i, o in samples))
    for name, offered in work.items():
        queues[name].build(offered)
    ttfts: list[float] = []
    totals: list[float] = []
    per: dict[str, tuple[list[float], list[float], list[float]]] = {}
    waits: dict[str, float] = defaultdict(float)
    saturated = 0
    for deployment, bucket, fraction, tokens_in, tokens_out in samples:
        queue = queues.get(deployment)
        if queue is None:
            continue
        m = queue.model
        entry = queue.buckets[bucket]
        wait = queue.wait_ms(bucket, fraction)
        slowdown = 1 + (m.slowdown_at_capacity - 1) * entry.utilisation
        ttft = wait + m.ttft_overhead_ms + m.prefill_ms_per_token * tokens_in
        ttfts.append(ttft)
        totals.append(ttft + tokens_out * m.itl_ms * slowdown)
        lists = per.setdefault(deployment, ([], [], []))
        lists[0].append(ttft)
        lists[2 if entry.saturated else 1].append(ttft)
        waits[deployment] = max(waits[deployment], wait)
        saturated += entry.saturated
    details: dict[str, Saturation] = {}
    for name, queue in queues.items():
        every, calm, busy = per.get(name, ([], [], []))
        buckets = [queue.buckets[b] for b in sorted(queue.buckets)]
        hot = [b for b in buckets if b.saturated]
        last = buckets[-1] if buckets else None
        backlog = 0.0
        if last is not None and queue.slots:
            left = (window_end.timestamp() - last.bucket) // QUEUE_SECONDS - 1
            backlog = max(0.0, last.carried_ms - left * queue.capacity_ms) / queue.slots
        details[name] = Saturation(
            requests=len(every),
            saturated_buckets=len(hot),
            saturated_hours=len(hot) * QUEUE_SECONDS / 3600,
            first_saturated=(
                datetime.fromtimestamp(hot[0].bucket, UTC).isoformat() if hot else None
            ),
            peak_offered_load=max(
                ((b.backlog_ms + b.offered_ms) / b.capacity_ms for b in buckets), default=0.0
            ),
            backlog_at_end_s=backlog / 1000,
            ttft_p50_ms=_quantile(sorted(every), 0.5) if every else 0.0,
            ttft_p95_ms=_quantile(sorted(every), 0.95) if every else 0.0,
            ttft_p50_unsaturated_ms=_quantile(sorted(calm), 0.5) if calm else None,
            ttft_p95_saturated_ms=_quantile(sorted(busy), 0.95) if busy else None,
            wait_max_s=waits.get(name, 0.0) / 1000,
        )
    if not ttfts:
        return LatencySummary(), details
    ttfts.sort()
    totals.sort()
    summary = LatencySummary(
        requests=len(ttfts),
        ttft_p50_ms=_quantile(ttfts, 0.5),
        ttft_p95_ms=_quantile(ttfts, 0.95),
        e2e_p50_ms=_quantile(totals, 0.5),
        e2e_p95_ms=_quantile(totals, 0.95),
        saturated_share=saturated / len(ttfts),
    )
    return summary, details


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
