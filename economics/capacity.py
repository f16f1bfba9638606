"""Capacity that binds: a deployment's queue on the simulated clock, an hour at a time.

A simulated month is a sample of a fleet's traffic (`fleet_share`), so its capacity is a
fluid one. In each hour (the traffic plan's own resolution: a sample hour stands for the
fleet's whole hour) a deployment can serve ``capacity x fleet_share x 1 h`` of slot time,
in its latency model's slot-milliseconds (the figure compute cost is priced on). Each
request offers its at-capacity slot time, ``prompt x prefill_ms_per_token + output x
itl_ms x slowdown_at_capacity``. Work beyond an hour's capacity is not lost: it waits, and
the backlog carries into the next hour, which serves it first. Within an hour the queue
grows (or drains) linearly, so a request that starts a fraction ``f`` into hour ``h``
waits

    max(0, backlog_h + f x (offered_h - capacity_h)) / (capacity x fleet_share)   ms

before its first token. An hour is *saturated* when it ends with work still waiting; a
deployment's utilisation in an hour is the work it served there over its capacity, never
more than 100%.

What happens to the excess is the scenario's `capacity.on_saturation`: `queue` (the
default) serves every request, later; `refuse` answers a request with 429 when the queue
it would join is longer than `capacity.max_wait_s`: the backlog at the start of its hour
plus the work admitted in the hour so far, less what the hour has served by the request's
moment, over the slots. The refusal is decided by the simulated backend, through the whole
gateway, so it is in the ledger as an upstream 429 with no tokens and no charge. So that
the decisions do not depend on timing, the runner then sends requests one at a time, in
order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from billing.compute_cost import ComputeCosts, LatencyModel

__all__ = [
    "BUCKET_MS",
    "BUCKET_SECONDS",
    "CapacityConfig",
    "DeploymentQueue",
    "FleetGate",
    "QueueBucket",
    "fleet_queues",
]

BUCKET_SECONDS = 3600
"""The queue's interval: one hour."""
BUCKET_MS = BUCKET_SECONDS * 1000


class CapacityConfig(BaseModel):
    """The scenario's `capacity:` section: what a saturated deployment does."""

    model_config = ConfigDict(extra="forbid")

    on_saturation: Literal["queue", "refuse"] = Field(
        default="queue", description="queue: serve every request, later; refuse: answer 429"
    )
    max_wait_s: float = Field(
        default=30.0, ge=0, description="refuse: the longest queue a request may join"
    )


@dataclass(slots=True)
class QueueBucket:
    """One hour of one deployment (slot-milliseconds)."""

    bucket: int  # epoch seconds of its start
    backlog_ms: float  # work waiting when the bucket began
    offered_ms: float  # work its requests brought
    capacity_ms: float

    @property
    def served_ms(self) -> float:
        return min(self.capacity_ms, self.backlog_ms + self.offered_ms)

    @property
    def carried_ms(self) -> float:
        """Work still waiting when the bucket ends."""
        return self.backlog_ms + self.offered_ms - self.served_ms

    @property
    def utilisation(self) -> float:
        return self.served_ms / self.capacity_ms if self.capacity_ms else 0.0

    @property
    def saturated(self) -> bool:
        return self.carried_ms > 0


@dataclass(slots=True)
class DeploymentQueue:
    """A deployment's fluid queue: its latency model, its capacity and its buckets."""

    deployment: str
    model: LatencyModel
    fleet_share: float
    buckets: dict[int, QueueBucket] = field(default_factory=dict)

    @property
    def slots(self) -> float:
        """Slots of the sampled fleet (capacity x fleet_share): slot-ms served per ms."""
        return self.model.capacity * self.fleet_share

    @property
    def capacity_ms(self) -> float:
        return self.slots * BUCKET_MS

    def work_ms(self, tokens_in: int, tokens_out: int) -> float:
        """A request's slot time at capacity."""
        m = self.model
        return tokens_in * m.prefill_ms_per_token + tokens_out * float(m.output_slot_ms)

    def build(self, offered: dict[int, float]) -> None:
        """Run the queue through `offered` work per bucket (epoch seconds -> slot-ms)."""
        self.buckets = {}
        backlog, previous = 0.0, None
        for bucket in sorted(offered):
            if previous is not None:  # empty buckets in between drain the backlog
                gap = (bucket - previous) // BUCKET_SECONDS - 1
                backlog = max(0.0, backlog - gap * self.capacity_ms)
            entry = QueueBucket(bucket, backlog, offered[bucket], self.capacity_ms)
            self.buckets[bucket] = entry
            backlog, previous = entry.carried_ms, bucket

    def wait_ms(self, bucket: int, fraction: float) -> float:
        """The queueing delay of a request `fraction` of the way into `bucket`."""
        entry = self.buckets.get(bucket)
        if entry is None or not self.slots:
            return 0.0
        queued = entry.backlog_ms + fraction * (entry.offered_ms - entry.capacity_ms)
        return max(0.0, queued) / self.slots


def fleet_queues(costs: ComputeCosts) -> dict[str, DeploymentQueue]:
    """An empty queue for every simulated deployment (fleet share of its latest version)."""
    queues = {}
    for name, model in costs.latency.items():
        if model is None:
            continue
        rate = costs.rate(name, datetime.max.replace(tzinfo=UTC))
        share = float(rate.fleet_share) if rate is not None else 1.0
        queues[name] = DeploymentQueue(name, model, share)
    return queues


def offered_work(
    queues: dict[str, DeploymentQueue], samples: Iterable[tuple[str, int, int, int]]
) -> dict[str, dict[int, float]]:
    """Offered slot-ms per deployment and bucket from (deployment, bucket, in, out)."""
    work: dict[str, dict[int, float]] = {}
    for deployment, bucket, tokens_in, tokens_out in samples:
        queue = queues.get(deployment)
        if queue is not None:
            per = work.setdefault(deployment, {})
            per[bucket] = per.get(bucket, 0.0) + queue.work_ms(tokens_in, tokens_out)
    return work


class FleetGate:
    """Admission on the simulated clock for `on_saturation: refuse` (see the module doc).

    `admit` is installed as a simulated backend's `admission` hook; it records each admitted
    request's work and raises the backend's own 429 when the queue is too long.
    """

    def __init__(
        self,
        queues: dict[str, DeploymentQueue],
        deployments: dict[tuple[str, str], str],
        config: CapacityConfig,
        clock: Any,
    ) -> None:
        self._queues = queues
        self._deployments = deployments  # (provider, upstream model) -> deployment name
        self._config = config
        self._clock = clock
        self._offered: dict[str, dict[int, float]] = {name: {} for name in queues}
        self._backlog: dict[str, tuple[int, float]] = {}  # deployment -> (bucket, backlog at start)
        self.refused: dict[str, int] = {}

    def _backlog_at(self, name: str, bucket: int) -> float:
        """Backlog at the start of `bucket`, from the work admitted in earlier buckets."""
        queue = self._queues[name]
        offered = self._offered[name]
        start, backlog = self._backlog.get(name, (None, 0.0))
        earlier = sorted(b for b in offered if b < bucket and (start is None or b >= start))
        cursor = start
        for b in earlier:
            if cursor is not None and b > cursor:
                gap = (b - cursor) // BUCKET_SECONDS
                backlog = max(0.0, backlog - gap * queue.capacity_ms)
            backlog = max(0.0, backlog + offered[b] - queue.capacity_ms)
            cursor = b + BUCKET_SECONDS
        if cursor is not None and bucket > cursor:
            backlog = max(0.0, backlog - (bucket - cursor) // BUCKET_SECONDS * queue.capacity_ms)
        self._backlog[name] = (bucket, backlog)
        for b in earlier:  # folded into the backlog
            del offered[b]
        return backlog

    def admit(self, provider: str, model: str, tokens_in: int, tokens_out: int) -> bool:
        """Record the request's work and say whether it is admitted."""
        name = self._deployments.get((provider, model))
        queue = self._queues.get(name) if name is not None else None
        if name is None or queue is None:
            return True
        moment: datetime = self._clock()
        epoch = int(moment.timestamp())
        bucket = epoch - epoch % BUCKET_SECONDS
        fraction = (moment.timestamp() - bucket) / BUCKET_SECONDS
        offered = self._offered[name]
        queued = self._backlog_at(name, bucket) + offered.get(bucket, 0.0)
        waiting_ms = max(0.0, queued - fraction * queue.capacity_ms) / queue.slots
        if self._config.on_saturation == "refuse" and waiting_ms > self._config.max_wait_s * 1000:
            self.refused[name] = self.refused.get(name, 0) + 1
            return False
        offered[bucket] = offered.get(bucket, 0.0) + queue.work_ms(tokens_in, tokens_out)
        return True
