"""Prometheus metrics: tokens and money like a utility meter, with latency and errors beside them.

One `Metrics` object per process records every finished request (`observe_request`), quota
refusals, tenant budgets and balances, the ledger's backlog and deployment health, and renders
the exposition for `GET /metrics`.

Names follow the OpenTelemetry GenAI semantic conventions where one exists, converted to
Prometheus the standard way (dots become underscores, a unit in braces is dropped, seconds
get a `_seconds` suffix), with the conventions' recommended bucket boundaries:

| metric | what the gateway measures |
|---|---|
| `gen_ai_client_token_usage` | tokens per request, `gen_ai_token_type` = input / output |
| `gen_ai_server_request_duration_seconds` | end-to-end duration as the caller sees it |
| `gen_ai_client_operation_duration_seconds` | time spent waiting on the upstream (all attempts) |
| `gen_ai_server_time_to_first_token_seconds` | time to the first token delivered (successes) |
| `gen_ai_server_time_per_output_token_seconds` | (duration - TTFT) / (output tokens - 1) |

Their labels are the conventions' attributes: `gen_ai_operation_name` (chat, text_completion,
embeddings), `gen_ai_provider_name`, `gen_ai_request_model`, `error_type` (on failures). They
carry no tenant, so histogram cardinality stays small.

Everything else is `maas_*`, in base units with `_total` counters:

- `maas_requests_total{tenant,model,provider,status}` (status = HTTP status code)
- `maas_tokens_total{tenant,model,provider,token_type}`, token_type = uncached_input,
  cached_input or output (the ledger's columns; reasoning tokens are part of output)
- `maas_cost_nanos_total{tenant,model,provider,deployment,currency}`: revenue, the charged
  cost in integer nano-units; `maas_compute_cost_nanos_total{...same labels}`: what serving
  the request cost the operator (`billing.compute_cost`), so that gross margin by tenant,
  model or deployment is one subtraction
- `maas_provisioned_cost_nanos_total{deployment,currency}`: what the accelerators of a
  deployment with a hardware profile cost since the counters started, busy or idle, growing
  with the clock at the profile's hourly cost (computed at scrape time). Idle capacity, cost
  with no revenue, is this minus the deployment's compute cost
- `maas_upstream_retries_total{model,provider}`: attempts beyond the first
- `maas_quota_refusals_total{tenant,model,reason}`
- `maas_gateway_overhead_seconds{endpoint,stream}`: the time the gateway itself adds, with
  buckets from 50 µs
- `maas_tenant_budget_remaining_tokens{tenant,window}`, `maas_tenant_budget_limit_tokens`,
  `maas_tenant_balance_nanos{tenant,currency}`
- `maas_ledger_queue_depth`, `maas_ledger_lag_seconds`
- `maas_deployment_state{deployment,model,state}` (1 for the current state, 0 for others),
  `maas_deployment_in_flight{deployment,model}`

Backends in the vLLM style (`VllmStyleMetrics`) expose `vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
`vllm:request_success_total` and `vllm:time_to_first_token_seconds`, labelled `model_name`.
With several workers, each worker's in-process simulated backends `publish` their running
totals into these, so the sums cover every worker.

Exactness: a counter sample is a float64, which holds every integer up to 2**53 exactly, and
only integers are ever added to the token and cost counters, so their totals equal the
ledger's sums exactly as long as one series stays below 2**53 (for cost, about nine million
currency units per series since the process started; the text exposition keeps all digits).

Cost on the request path: `observe_request` adds to plain per-label-set totals (a few
microseconds); they reach the prometheus_client metrics on every `render()` and within
`MetricsConfig.flush_interval_s` otherwise. Call `flush()` once at shutdown.

Cardinality: key ids and request ids are never labels. Tenants beyond
`MetricsConfig.max_tenant_labels` (first come, first labelled, per process) are counted under
`tenant="other"`; models and error types are capped the same way, and deployments, refusal
reasons and budget windows share one cap of 200.

Several worker processes: when `PROMETHEUS_MULTIPROC_DIR` is set (before `prometheus_client`
is first imported), values live in memory-mapped files in that directory and `render()` sums
every process's files exactly once; a worker's observations reach the files within
`flush_interval_s`. Empty the directory before the workers start (`reset_multiprocess_dir`,
which also stamps the time the counters start from) and call `mark_process_dead(pid)` when a
worker exits. Collectors registered on `registry` (provisioned cost, and in one process the
simulated backends' statistics) are rendered by the worker answering the scrape only, so
they must not depend on which worker that is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field

from billing.compute_cost import ComputeCosts
from billing.record import UsageRecord
from providers import vllm_metrics as vllm

log = logging.getLogger("maas.metrics")

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
#: In a multiprocess directory: when its counters started (Unix seconds), for every worker.
ORIGIN_FILE: Final = "counters-since"
#: prometheus_client's value files: `<type>_<pid>.db`, or `gauge_<mode>_<pid>.db`.
_VALUE_FILE_TYPES: Final = ("counter_", "gauge_", "histogram_", "summary_")
OTHER: Final = "other"
NONE: Final = "none"

#: OpenTelemetry GenAI recommended boundaries.
TOKEN_USAGE_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TIME_PER_OUTPUT_TOKEN_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
#: Gateway overhead is usually well under a millisecond, so the buckets start at 50 µs.
OVERHEAD_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
#: vLLM's own time-to-first-token boundaries.
VLLM_TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip

#: The gateway's endpoints as OpenTelemetry `gen_ai.operation.name` values.
OPERATION_NAMES: Final[dict[str, str]] = {
    "chat.completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}

_MAX_ERROR_TYPE_LABELS: Final = 50
_MAX_SMALL_LABELS: Final = 200  # deployments, refusal reasons, windows, model names
_MAX_CACHED_SERIES: Final = 20_000

#: tenant, model, provider, deployment, endpoint, status code, error type, currency, stream
_SeriesKey = tuple[str, str, str, str, str, int, str | None, str, bool]


class MetricsConfig(BaseModel):
    """The `metrics:` section of the gateway config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_tenant_labels: int = Field(default=100, ge=1)
    """Distinct tenants labelled per process; later ones are counted as tenant="other"."""
    max_model_labels: int = Field(default=200, ge=1)
    """Distinct model names labelled per process; later ones become model="other"."""
    flush_interval_s: float = Field(default=0.5, gt=0)
    """Longest time request observations wait before reaching the exposed metrics."""
    host: str = "127.0.0.1"
    """Address of the metrics listener (`GET /metrics`), apart from the public port."""
    port: int | None = Field(default=9464, ge=0, le=65535)
    """Port of the metrics listener (0: any free port; null: no listener)."""
    bearer_token_env: str | None = None
    """Environment variable holding a token every scrape must present as a bearer token."""


class LabelCap:
    """Admits the first `limit` distinct values of a label and maps the rest to "other"."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return NONE
        if value in self._seen:
            return value
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return value
        return OTHER


def multiprocess_enabled() -> bool:
    """Whether `PROMETHEUS_MULTIPROC_DIR` is set for this process."""
    return bool(os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()))


def reset_multiprocess_dir(path: str | os.PathLike[str], now: float | None = None) -> Path:
    """Prepare `path` for a fresh set of workers: created if missing, emptied of the value
    files of earlier runs (other files are left alone), and stamped with the time their
    counters start from (`now`, Unix seconds; default the current time)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for file in directory.glob("*.db"):
        if file.name.startswith(_VALUE_FILE_TYPES):
            file.unlink(missing_ok=True)
    stamp = time.time() if now is None else now
    (directory / ORIGIN_FILE).write_text(f"{stamp!r}\n", encoding="ascii")
    return directory


def multiprocess_origin() -> datetime | None:
    """When the counters of this process's multiprocess directory started, if stamped."""
    path = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    if not path:
        return None
    try:
        stamp = float((Path(path) / ORIGIN_FILE).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return datetime.fromtimestamp(stamp, UTC)


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Drop a dead worker's live gauges (in-flight, queue depth); its counters stay summed."""
    _mark_process_dead(pid, None if path is None else os.fspath(path))


# A request series accumulates into one flat list of numbers ("slots"): the counters first,
# then for each histogram one slot per bucket (the bounds, then +Inf) followed by its sum.
_REQUESTS, _TOK_UNCACHED, _TOK_CACHED, _TOK_OUTPUT, _COST, _COMPUTE_COST, _RETRIES = range(7)
_HISTOGRAM_BOUNDS: Final = (
    TOKEN_USAGE_BUCKETS,  # input tokens
    TOKEN_USAGE_BUCKETS,  # output tokens
    DURATION_BUCKETS,  # end to end
    DURATION_BUCKETS,  # upstream
    OVERHEAD_BUCKETS,
    TTFT_BUCKETS,
    TIME_PER_OUTPUT_TOKEN_BUCKETS,
)
_HISTOGRAM_STARTS: Final = tuple(
    7 + sum(len(bounds) + 2 for bounds in _HISTOGRAM_BOUNDS[:i])
    for i in range(len(_HISTOGRAM_BOUNDS))
)
_USAGE_IN, _USAGE_OUT, _E2E, _UPSTREAM, _OVERHEAD, _TTFT, _TPOT = _HISTOGRAM_STARTS
_USAGE_IN_SUM = _USAGE_IN + len(TOKEN_USAGE_BUCKETS) + 1
_USAGE_OUT_SUM = _USAGE_OUT + len(TOKEN_USAGE_BUCKETS) + 1
_E2E_SUM = _E2E + len(DURATION_BUCKETS) + 1
_UPSTREAM_SUM = _UPSTREAM + len(DURATION_BUCKETS) + 1
_OVERHEAD_SUM = _OVERHEAD + len(OVERHEAD_BUCKETS) + 1
_TTFT_SUM = _TTFT + len(TTFT_BUCKETS) + 1
_TPOT_SUM = _TPOT + len(TIME_PER_OUTPUT_TOKEN_BUCKETS) + 1
_SLOTS: Final = _TPOT_SUM + 1

_Inc = Callable[[float], None]


class _RequestSeries:
    """One kind of request (same labels): its pending increments and where they go.

    `observe_request` adds to `pending` (plain list arithmetic, no per-metric locks);
    `Metrics.flush` hands the totals to the prometheus_client children in `targets`.
    """

    __slots__ = ("dirty", "has_output", "pending", "targets", "timed")

    def __init__(self, m: Metrics, key: _SeriesKey) -> None:
        (
            tenant_raw,
            model_raw,
            provider_raw,
            deployment_raw,
            endpoint,
            status,
            error_raw,
            currency,
            stream,
        ) = key
        tenant = m._tenant_cap(tenant_raw)
        model = m._model_cap(model_raw)
        provider = m._small_cap(provider_raw)
        deployment = m._small_cap(deployment_raw)
        error_type = m._error_cap(error_raw or str(status)) if status >= 400 else ""
        operation = OPERATION_NAMES.get(endpoint) or m._small_cap(endpoint)
        currency = currency.upper() or NONE
        self.pending: list[float] = [0] * _SLOTS
        self.dirty = False
        self.has_output = operation != "embeddings"
        self.timed = status < 400 and stream  # TTFT and time per output token
        targets: list[_Inc | None] = [None] * _SLOTS
        targets[_REQUESTS] = m.requests.labels(tenant, model, provider, str(status)).inc
        for slot, token_type in (
            (_TOK_UNCACHED, "uncached_input"),
            (_TOK_CACHED, "cached_input"),
            (_TOK_OUTPUT, "output"),
        ):
            targets[slot] = m.tokens.labels(tenant, model, provider, token_type).inc
        money = (tenant, model, provider, deployment, currency)
        targets[_COST] = m.cost.labels(*money).inc
        targets[_COMPUTE_COST] = m.compute_cost.labels(*money).inc
        targets[_RETRIES] = m.retries.labels(model, provider).inc
        gen_ai = (operation, provider, model)
        histograms: list[tuple[int, Histogram]] = [
            (_USAGE_IN, m.token_usage.labels(*gen_ai, "input")),
            (_E2E, m.request_duration.labels(*gen_ai, error_type)),
            (_UPSTREAM, m.upstream_duration.labels(*gen_ai, error_type)),
            (_OVERHEAD, m.overhead.labels(m._small_cap(endpoint), "true" if stream else "false")),
        ]
        if self.has_output:
            histograms.append((_USAGE_OUT, m.token_usage.labels(*gen_ai, "output")))
        if self.timed:
            histograms.append((_TTFT, m.time_to_first_token.labels(*gen_ai)))
            histograms.append((_TPOT, m.time_per_output_token.labels(*gen_ai)))
        for start, child in histograms:
            # prometheus_client keeps a histogram child's buckets (non-cumulative, +Inf last)
            # and sum as value objects; adding to them is what `observe` does.
            buckets = child._buckets
            bounds = _HISTOGRAM_BOUNDS[_HISTOGRAM_STARTS.index(start)]
            if len(buckets) != len(bounds) + 1:
                raise RuntimeError("unexpected prometheus_client histogram layout")
            for i, bucket in enumerate(buckets):
                targets[start + i] = bucket.inc
            targets[start + len(buckets)] = child._sum.inc
        self.targets = targets


class BackendStats(Protocol):
    """Running totals of a model backend since it started (`providers.simulated.SimulatorStats`)."""

    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def prompt_tokens_total(self) -> int: ...
    @property
    def generation_tokens_total(self) -> int: ...
    @property
    def finished_total(self) -> Mapping[str, int]: ...
    @property
    def ttft_histogram(self) -> Sequence[tuple[float, int]]: ...
    @property
    def ttft_sum_seconds(self) -> float: ...


class VllmStyleMetrics:
    """Capacity metrics of a model backend, named as vLLM names them (label `model_name`).

    Used by the simulated backends; `set_load` reports the current queue, `observe_finished`
    one finished request, `publish` a backend's running totals.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._published: dict[str, BackendStats] = {}

        def spec(family: vllm.Family) -> tuple[str, str, tuple[str, ...]]:
            return family.name, family.documentation, family.labels

        self.num_requests_running = Gauge(
            *spec(vllm.NUM_REQUESTS_RUNNING), registry=registry, multiprocess_mode="livesum"
        )
        self.num_requests_waiting = Gauge(
            *spec(vllm.NUM_REQUESTS_WAITING), registry=registry, multiprocess_mode="livesum"
        )
        self.prompt_tokens = Counter(*spec(vllm.PROMPT_TOKENS), registry=registry)
        self.generation_tokens = Counter(*spec(vllm.GENERATION_TOKENS), registry=registry)
        self.request_success = Counter(*spec(vllm.REQUEST_SUCCESS), registry=registry)
        self.time_to_first_token = Histogram(
            *spec(vllm.TIME_TO_FIRST_TOKEN), registry=registry, buckets=VLLM_TTFT_BUCKETS
        )

    def set_load(self, model_name: str, *, running: int, waiting: int) -> None:
        """The backend's current number of running and queued requests."""
        self.num_requests_running.labels(model_name).set(running)
        self.num_requests_waiting.labels(model_name).set(waiting)

    def observe_finished(
        self,
        model_name: str,
        *,
        prompt_tokens: int,
        generation_tokens: int,
        ttft_s: float | None,
        finished_reason: str = "stop",
    ) -> None:
        """One request the backend finished."""
        self.prompt_tokens.labels(model_name).inc(prompt_tokens)
        self.generation_tokens.labels(model_name).inc(generation_tokens)
        self.request_success.labels(model_name, finished_reason).inc()
        if ttft_s is not None:
            self.time_to_first_token.labels(model_name).observe(ttft_s)

    def publish(self, model_name: str, stats: BackendStats) -> None:
        """Bring one backend's series up to its running totals: the load is set, counters
        and the time-to-first-token histogram advance by what is new since the last call.

        The histogram keeps its own boundaries: each of the backend's buckets is added to the
        smallest boundary at or above its own, the backend's +Inf bucket to +Inf.
        """
        self.set_load(model_name, running=stats.running, waiting=stats.waiting)
        last = self._published.get(model_name)
        self._published[model_name] = stats
        prompt = stats.prompt_tokens_total - (last.prompt_tokens_total if last else 0)
        generation = stats.generation_tokens_total - (last.generation_tokens_total if last else 0)
        if prompt > 0:
            self.prompt_tokens.labels(model_name).inc(prompt)
        if generation > 0:
            self.generation_tokens.labels(model_name).inc(generation)
        for reason, count in stats.finished_total.items():
            new = count - (last.finished_total.get(reason, 0) if last else 0)
            if new > 0:
                self.request_success.labels(model_name, reason).inc(new)
        child = self.time_to_first_token.labels(model_name)
        previous = last.ttft_histogram if last else ()
        below = below_before = 0  # the cumulative counts of the bucket before, now and then
        for i, (bound, cumulative) in enumerate(stats.ttft_histogram):
            before = previous[i][1] if i < len(previous) else 0
            new = (cumulative - below) - (before - below_before)
            below, below_before = cumulative, before
            if new > 0:
                index = (
                    len(VLLM_TTFT_BUCKETS)
                    if math.isinf(bound)
                    else bisect_left(VLLM_TTFT_BUCKETS, bound)
                )
                child._buckets[index].inc(new)
        seconds = stats.ttft_sum_seconds - (last.ttft_sum_seconds if last else 0.0)
        if seconds > 0:
            child._sum.inc(seconds)


class ProvisionedCost(Collector):
    """`maas_provisioned_cost_nanos_total`: what each hardware deployment's accelerators have
    cost since `since`, busy or idle, read from `ComputeCosts.provisioned_nanos` at scrape
    time (so it grows with the clock, not with requests)."""

    def __init__(
        self,
        costs: ComputeCosts,
        deployments: Mapping[str, Iterable[str]],
        currency: str,
        since: datetime,
        clock: Callable[[], datetime],
    ) -> None:
        self._costs = costs
        self._deployments = {label: tuple(names) for label, names in deployments.items()}
        self._currency = currency
        self._since = since
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "maas_provisioned_cost_nanos",
            "Provisioned accelerator cost of a deployment since the counters started, busy or"
            " idle, in integer nano-units (1e-9) of the currency.",
            labels=["deployment", "currency"],
        )
        now = self._clock()
        provisioned = self._costs.provisioned_nanos
        for label, names in self._deployments.items():
            total = sum(provisioned(name, self._since, now) for name in names)
            family.add_metric([label, self._currency], total)
        yield family


class UnitEconomicsGauge(Collector):
    """`maas_unit_economics_per_million_tokens{model,deployment,kind,measure,currency}`: list
    price, realised price, compute cost and gross margin per million input or output tokens
    over a reporting period, in currency units (the economics simulator writes them, with
    `generate_latest` on a registry of their own, as `unit-economics.prom`)."""

    def __init__(self, currency: str) -> None:
        self._currency = currency
        self._values: dict[tuple[str, str, str, str], float] = {}

    def set(self, model: str, deployment: str, kind: str, measure: str, value: float) -> None:
        self._values[(model, deployment, kind, measure)] = value

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "maas_unit_economics_per_million_tokens",
            "Price, compute cost or gross margin per million input or output tokens of a"
            " model on a deployment ('*': all its deployments) over a reporting period.",
            labels=["model", "deployment", "kind", "measure", "currency"],
        )
        for (model, deployment, kind, measure), value in sorted(self._values.items()):
            family.add_metric([model, deployment, kind, measure, self._currency], value)
        yield family


class Metrics:
    """The gateway's metrics. Create one per process; all methods are cheap and never block.

    `registry` is where the metrics are registered and what `render()` exposes (a fresh one
    unless given). In multiprocess mode the metrics write to the shared directory instead and
    `registry` holds a collector that reads every process's values.
    """

    def __init__(
        self, config: MetricsConfig | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        self.config = config or MetricsConfig()
        self.enabled = self.config.enabled
        self.multiprocess = multiprocess_enabled()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.errors = 0
        """Observations that raised in this process (see `observation_failed`)."""
        self._errors_counter: Counter | None = None
        self._metrics_target: CollectorRegistry | None = None
        self._backend: VllmStyleMetrics | None = None
        self._provisioned: ProvisionedCost | None = None
        if not self.enabled:
            return
        # Every counter and histogram would otherwise carry a `_created` series: a third of
        # the exposition, rendered on every scrape and stored by Prometheus, used by nobody.
        disable_created_metrics()
        if self.multiprocess:
            if not getattr(values.ValueClass, "_multiprocess", False):
                raise RuntimeError(
                    f"{MULTIPROC_ENV} was set after prometheus_client was imported; "
                    "set it in the environment before the process starts"
                )
            MultiProcessCollector(self.registry)
            target: CollectorRegistry | None = None
        else:
            target = self.registry
        self._tenant_cap = LabelCap(self.config.max_tenant_labels)
        self._model_cap = LabelCap(self.config.max_model_labels)
        self._error_cap = LabelCap(_MAX_ERROR_TYPE_LABELS)
        self._small_cap = LabelCap(_MAX_SMALL_LABELS)
        self._lock = threading.Lock()
        self._series: dict[_SeriesKey, _RequestSeries] = {}
        self._dirty: list[_RequestSeries] = []
        self._flush_pending = False
        self._last_flush = time.monotonic()
        self._refusals: dict[tuple[str, str, str], Counter] = {}
        self._budget_keys: set[tuple[str, str]] = set()
        self._deployment_states: dict[tuple[str, str], set[str]] = {}

        self._errors_counter = Counter(
            "maas_metrics_errors",
            "Observations that failed (the request they describe was served and recorded).",
            registry=target,
        )
        tenant_model_provider = ["tenant", "model", "provider"]
        self.requests = Counter(
            "maas_requests",
            "Finished requests by tenant, model, provider and HTTP status.",
            [*tenant_model_provider, "status"],
            registry=target,
        )
        self.tokens = Counter(
            "maas_tokens",
            "Metered tokens by kind: uncached_input, cached_input, output.",
            [*tenant_model_provider, "token_type"],
            registry=target,
        )
        self.cost = Counter(
            "maas_cost_nanos",
            "Revenue: charged cost in integer nano-units (1e-9) of the currency.",
            [*tenant_model_provider, "deployment", "currency"],
            registry=target,
        )
        self.compute_cost = Counter(
            "maas_compute_cost_nanos",
            "Compute cost of the tokens served, in integer nano-units (1e-9) of the currency.",
            [*tenant_model_provider, "deployment", "currency"],
            registry=target,
        )
        self.retries = Counter(
            "maas_upstream_retries",
            "Upstream attempts beyond the first (retries and failovers).",
            ["model", "provider"],
            registry=target,
        )
        self.refusals = Counter(
            "maas_quota_refusals",
            "Requests refused by a limit, budget or balance, by reason.",
            ["tenant", "model", "reason"],
            registry=target,
        )
        gen_ai = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used per request.",
            [*gen_ai, "gen_ai_token_type"],
            registry=target,
            buckets=TOKEN_USAGE_BUCKETS,
        )
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "End-to-end request duration as the caller sees it.",
            [*gen_ai, "error_type"],
            registry=target,
            buckets=DURATION_BUCKETS,
        )
        self.upstream_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Time spent waiting on the upstream model backend, all attempts together.",
            [*gen_ai, "error_type"],
            registry=target,
            buckets=DURATION_BUCKETS,
        )
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first token delivered, for successful streamed responses.",
            gen_ai,
            registry=target,
            buckets=TTFT_BUCKETS,
        )
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, for successful streamed responses.",
            gen_ai,
            registry=target,
            buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
        )
        self.overhead = Histogram(
            "maas_gateway_overhead_seconds",
            "Time the gateway itself adds to a request (everything but the upstream).",
            ["endpoint", "stream"],
            registry=target,
            buckets=OVERHEAD_BUCKETS,
        )
        self.budget_remaining = Gauge(
            "maas_tenant_budget_remaining_tokens",
            "Tokens left in a tenant's budget window.",
            ["tenant", "window"],
            registry=target,
            multiprocess_mode="mostrecent",
        )
        self.budget_limit = Gauge(
            "maas_tenant_budget_limit_tokens",
            "Size of a tenant's token budget window.",
            ["tenant", "window"],
            registry=target,
            multiprocess_mode="mostrecent",
        )
        self.balance = Gauge(
            "maas_tenant_balance_nanos",
            "A tenant's prepaid balance in nano-units (1e-9) of the currency.",
            ["tenant", "currency"],
            registry=target,
            multiprocess_mode="mostrecent",
        )
        self.ledger_queue_depth = Gauge(
            "maas_ledger_queue_depth",
            "Usage records waiting to be written to the ledger database.",
            registry=target,
            multiprocess_mode="livesum",
        )
        self.ledger_lag = Gauge(
            "maas_ledger_lag_seconds",
            "Age of the oldest usage record not yet written to the ledger database.",
            registry=target,
            multiprocess_mode="livemax",
        )
        self.deployment_state = Gauge(
            "maas_deployment_state",
            "1 for a deployment's current health state, 0 for states it has left.",
            ["deployment", "model", "state"],
            registry=target,
            multiprocess_mode="livemostrecent",
        )
        self.deployment_in_flight = Gauge(
            "maas_deployment_in_flight",
            "Requests in flight to a deployment.",
            ["deployment", "model"],
            registry=target,
            multiprocess_mode="livesum",
        )
        self._metrics_target = target

    @property
    def backend(self) -> VllmStyleMetrics:
        """vLLM-style capacity metrics of in-process simulated backends, created (and
        registered) on first use. Unlike a collector added to `registry`, these are summed
        across workers in multiprocess mode."""
        if self._backend is None:
            self._backend = VllmStyleMetrics(self._metrics_target)
        return self._backend

    def track_provisioned(
        self,
        costs: ComputeCosts,
        currency: str,
        clock: Callable[[], datetime],
        since: datetime | None = None,
    ) -> None:
        """Expose `maas_provisioned_cost_nanos_total` for every deployment with a hardware
        profile (none without one), counted from `since`: by default when the counters
        started (the stamp of the multiprocess directory, so every worker answers alike),
        else `clock()` now. Replaces an earlier call's series."""
        if not self.enabled:
            return
        if self._provisioned is not None:
            self.registry.unregister(self._provisioned)
            self._provisioned = None
        labels: dict[str, list[str]] = {}
        for name in sorted(costs.hardware_deployments):
            labels.setdefault(self._small_cap(name), []).append(name)
        if not labels:
            return
        start = since or (multiprocess_origin() if self.multiprocess else None) or clock()
        self._provisioned = ProvisionedCost(costs, labels, currency.upper(), start, clock)
        self.registry.register(self._provisioned)

    def observe_request(
        self, rec: UsageRecord, *, overhead_s: float, upstream_s: float | None
    ) -> None:
        """Count one finished request (successful or not) and its latencies.

        Costs a few microseconds: the values are added to a per-series list and handed
        to the Prometheus metrics by `flush()` (on every render, and on a timer).
        """
        if not self.enabled:
            return
        key: _SeriesKey = (
            rec.tenant_id,
            rec.model,
            rec.provider,
            rec.deployment,
            rec.endpoint,
            rec.status_code,
            rec.error_type,
            rec.currency,
            rec.stream,
        )
        usage = rec.usage
        duration_s = rec.duration_ms / 1000.0
        with self._lock:
            series = self._series.get(key)
            if series is None:
                if len(self._series) >= _MAX_CACHED_SERIES:
                    self._series.clear()
                series = self._series[key] = _RequestSeries(self, key)
            acc = series.pending
            acc[_REQUESTS] += 1
            acc[_TOK_UNCACHED] += usage.uncached_input
            acc[_TOK_CACHED] += usage.cached_input
            acc[_TOK_OUTPUT] += usage.output
            if rec.cost_nanos > 0:
                acc[_COST] += rec.cost_nanos
            if rec.compute_cost_nanos > 0:
                acc[_COMPUTE_COST] += rec.compute_cost_nanos
            if rec.attempts > 1:
                acc[_RETRIES] += rec.attempts - 1
            if usage.uncached_input or usage.cached_input or usage.output:
                tokens_in = usage.uncached_input + usage.cached_input
                acc[_USAGE_IN + bisect_left(TOKEN_USAGE_BUCKETS, tokens_in)] += 1
                acc[_USAGE_IN_SUM] += tokens_in
                if series.has_output:
                    acc[_USAGE_OUT + bisect_left(TOKEN_USAGE_BUCKETS, usage.output)] += 1
                    acc[_USAGE_OUT_SUM] += usage.output
            acc[_E2E + bisect_left(DURATION_BUCKETS, duration_s)] += 1
            acc[_E2E_SUM] += duration_s
            if upstream_s is not None:
                acc[_UPSTREAM + bisect_left(DURATION_BUCKETS, upstream_s)] += 1
                acc[_UPSTREAM_SUM] += upstream_s
            acc[_OVERHEAD + bisect_left(OVERHEAD_BUCKETS, overhead_s)] += 1
            acc[_OVERHEAD_SUM] += overhead_s
            if series.timed and rec.ttft_ms is not None:
                ttft_s = rec.ttft_ms / 1000.0
                acc[_TTFT + bisect_left(TTFT_BUCKETS, ttft_s)] += 1
                acc[_TTFT_SUM] += ttft_s
                if usage.output > 1 and duration_s >= ttft_s:
                    per_token = (duration_s - ttft_s) / (usage.output - 1)
                    acc[_TPOT + bisect_left(TIME_PER_OUTPUT_TOKEN_BUCKETS, per_token)] += 1
                    acc[_TPOT_SUM] += per_token
            if not series.dirty:
                series.dirty = True
                self._dirty.append(series)
                if not self._flush_pending:
                    self._flush_pending = self._schedule_flush()
            # Without an event loop (or if a timer was lost with its loop), flush by time.
            flush_now = (
                not self._flush_pending
                and time.monotonic() - self._last_flush >= self.config.flush_interval_s
            )
        if flush_now:
            self.flush()

    def observation_failed(self, exc: BaseException) -> None:
        """Count an observation that raised (`maas_metrics_errors_total`); the first one of
        the process is logged with its traceback, later ones only counted."""
        self.errors += 1
        if self.errors == 1:
            log.error("observing a request in the metrics failed (logged once)", exc_info=exc)
        try:
            if self._errors_counter is not None:
                self._errors_counter.inc()
        except Exception:  # the metrics themselves are broken: `errors` still counts
            pass

    def _schedule_flush(self) -> bool:
        """Arrange a flush on the running event loop; False when there is none."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_later(self.config.flush_interval_s, self.flush)
        return True

    def flush(self) -> None:
        """Hand pending request observations to the Prometheus metrics.

        Runs on every `render()` and within `flush_interval_s` of an observation; call it
        once more at shutdown so that, in multiprocess mode, nothing observed is lost.
        """
        if not self.enabled:
            return
        with self._lock:
            self._flush_pending = False
            self._last_flush = time.monotonic()
            batches = [(series.targets, series.pending) for series in self._dirty]
            for series in self._dirty:
                series.pending = [0] * _SLOTS
                series.dirty = False
            self._dirty = []
        try:
            for targets, pending in batches:
                for slot, amount in enumerate(pending):
                    if amount:
                        inc = targets[slot]
                        if inc is not None:
                            inc(amount)
        except Exception as exc:  # on a timer or a scrape: never in a request's way
            self.observation_failed(exc)

    def observe_refusal(self, tenant: str, model: str, reason: str) -> None:
        """Count one request refused by quota (`reason` e.g. "rpm", "budget", "balance")."""
        if not self.enabled:
            return
        key = (tenant, model, reason)
        child = self._refusals.get(key)
        if child is None:
            if len(self._refusals) >= _MAX_CACHED_SERIES:
                self._refusals.clear()
            child = self.refusals.labels(
                self._tenant_cap(tenant), self._model_cap(model), self._error_cap(reason)
            )
            self._refusals[key] = child
        child.inc()

    def set_tenant_budget(
        self,
        tenant: str,
        *,
        remaining_tokens: Mapping[str, int | None],
        balance_nanos: int | None,
        currency: str,
        limit_tokens: Mapping[str, int | None] | None = None,
    ) -> None:
        """A tenant's remaining token budget per window (e.g. "day", "month"; None means
        unlimited), optionally each window's size, and its prepaid balance (None: postpaid).

        Tenants counted as "other" get no budget series: a sum over many tenants' budgets
        would mean nothing.
        """
        if not self.enabled:
            return
        label = self._tenant_cap(tenant)
        if label == OTHER:
            return
        self._set_windows(self.budget_remaining, label, remaining_tokens)
        if limit_tokens is not None:
            self._set_windows(self.budget_limit, label, limit_tokens, prefix="limit:")
        if balance_nanos is not None:
            self.balance.labels(label, currency.upper()).set(balance_nanos)

    def _set_windows(
        self, gauge: Gauge, tenant: str, windows: Mapping[str, int | None], prefix: str = ""
    ) -> None:
        for window, tokens in windows.items():
            window_label = self._small_cap(window)
            key = (tenant, prefix + window_label)
            if tokens is not None:
                gauge.labels(tenant, window_label).set(tokens)
                self._budget_keys.add(key)
            elif key in self._budget_keys:  # became unlimited: no value to compare against
                gauge.labels(tenant, window_label).set(math.nan)

    def set_ledger(self, *, queue_depth: int, lag_s: float) -> None:
        """The ledger writer's backlog: records queued and the age of the oldest."""
        if not self.enabled:
            return
        self.ledger_queue_depth.set(queue_depth)
        self.ledger_lag.set(lag_s)

    def set_deployment_health(
        self, deployment: str, model: str, state: str, in_flight: int
    ) -> None:
        """A deployment's health state (e.g. "healthy", "degraded", "open") and load."""
        if not self.enabled:
            return
        deployment_label = self._small_cap(deployment)
        model_label = self._model_cap(model)
        state_label = self._small_cap(state)
        seen = self._deployment_states.setdefault((deployment_label, model_label), set())
        seen.add(state_label)
        for known in seen:
            value = 1 if known == state_label else 0
            self.deployment_state.labels(deployment_label, model_label, known).set(value)
        self.deployment_in_flight.labels(deployment_label, model_label).set(in_flight)

    def render(self) -> tuple[bytes, str]:
        """The exposition for GET /metrics: (body, content type).

        CPU-bound (about a millisecond per thousand series); a handler may run it in a thread.
        """
        self.flush()
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
