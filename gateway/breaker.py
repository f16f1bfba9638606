"""Per-deployment health: a circuit breaker over a sliding window, and a retry budget.

The breaker is closed (traffic flows) until a deployment fails `consecutive_failures`
times in a row, or fails at least `failure_rate` of at least `min_requests` requests in
the last `window_s` seconds. It then opens (no traffic) for `open_s` seconds, after which
it is half-open: up to `half_open_probes` requests are let through as probes. A probe that
succeeds closes the breaker; one that fails opens it again.

Everything here is synchronous bookkeeping on an injectable clock; nothing awaits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]


class BreakerConfig(BaseModel):
    """When a deployment's circuit opens, how long it stays open, and how it is probed."""

    model_config = ConfigDict(extra="forbid")

    failure_rate: float = Field(
        default=0.5, gt=0, le=1, description="Open at this share of failures"
    )
    min_requests: int = Field(
        default=10, ge=1, description="...among at least this many in the window"
    )
    window_s: float = Field(default=30, gt=0, description="The sliding window for the failure rate")
    consecutive_failures: int = Field(default=5, ge=1, description="Open after this many in a row")
    open_s: float = Field(default=15, gt=0, description="How long an open circuit rejects traffic")
    half_open_probes: int = Field(default=1, ge=1, description="Concurrent probes when half-open")
    cooldown_default_s: float = Field(
        default=1.0, ge=0, description="Cooldown after an upstream 429 that gave no retry-after"
    )
    cooldown_max_s: float = Field(
        default=300, ge=0, description="Upper bound on a 429's retry-after"
    )


class WindowCounter:
    """A count of events over the last `window_s` seconds, kept in a ring of buckets.

    Constant memory and O(1) amortised per event; the window's edge is as coarse as one
    bucket (`window_s / buckets`).
    """

    __slots__ = ("_counts", "_head", "_total", "_width")

    def __init__(self, window_s: float, buckets: int = 10) -> None:
        self._width = window_s / buckets
        self._counts = [0.0] * buckets
        self._head: int | None = None
        self._total = 0.0

    def add(self, now: float, amount: float = 1.0) -> None:
        self._advance(now)
        assert self._head is not None
        self._counts[self._head % len(self._counts)] += amount
        self._total += amount

    def total(self, now: float) -> float:
        self._advance(now)
        return self._total

    def clear(self) -> None:
        self._counts = [0.0] * len(self._counts)
        self._total = 0.0

    def _advance(self, now: float) -> None:
        index = int(now // self._width)
        head = self._head
        if head is None:
            self._head = index
            return
        if index <= head:
            return
        size = len(self._counts)
        if index - head >= size:
            self.clear()
        else:
            for i in range(head + 1, index + 1):
                slot = i % size
                self._total -= self._counts[slot]
                self._counts[slot] = 0.0
        self._head = index


class CircuitBreaker:
    """One deployment's circuit breaker.

    Call `allows(now)` to ask whether a request may go, `acquire(now)` when one is sent
    (it returns a probe ticket when the request is a half-open probe, else None), and
    exactly one of `success`, `failure` or `release` with that ticket when it ends.
    Outcomes of ordinary requests that end while the circuit is not closed are ignored.
    """

    __slots__ = (
        "_config",
        "_consecutive",
        "_failures",
        "_generation",
        "_name",
        "_open_until",
        "_probes",
        "_requests",
        "state",
    )

    def __init__(self, name: str, config: BreakerConfig) -> None:
        self._name = name
        self._config = config
        self.state: BreakerState = "closed"
        self._open_until = 0.0
        self._consecutive = 0
        self._requests = WindowCounter(config.window_s)
        self._failures = WindowCounter(config.window_s)
        self._probes = 0
        self._generation = 0

    def allows(self, now: float) -> bool:
        """Whether a request may be sent now (an open circuit past `open_s` turns half-open)."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            if now < self._open_until:
                return False
            self._transition("half_open", now)
        return self._probes < self._config.half_open_probes

    def acquire(self, now: float) -> int | None:
        """Note a request being sent; returns its probe ticket if it is a half-open probe."""
        if self.state == "closed":
            return None
        self._probes += 1
        return self._generation

    def success(self, now: float, ticket: int | None) -> None:
        """The request ended well (the deployment answered)."""
        if self._end_probe(ticket):
            self._transition("closed", now)
            return
        if self.state == "closed":
            self._consecutive = 0
            self._requests.add(now)

    def failure(self, now: float, ticket: int | None) -> None:
        """The request failed in a way that speaks of the deployment's health."""
        if self._end_probe(ticket):
            self._transition("open", now)
            return
        if self.state != "closed":
            return
        self._consecutive += 1
        self._requests.add(now)
        self._failures.add(now)
        config = self._config
        if self._consecutive >= config.consecutive_failures:
            self._transition("open", now, f"{self._consecutive} consecutive failures")
            return
        requests = self._requests.total(now)
        if requests >= config.min_requests:
            failures = self._failures.total(now)
            if failures >= config.failure_rate * requests:
                self._transition("open", now, f"{failures:.0f} of {requests:.0f} requests failed")

    def release(self, ticket: int | None) -> None:
        """The request ended without saying anything about health (e.g. the client left)."""
        self._end_probe(ticket)

    def failure_rate(self, now: float) -> float:
        """The share of failed requests in the current window (0 when there were none)."""
        requests = self._requests.total(now)
        return self._failures.total(now) / requests if requests else 0.0

    def requests(self, now: float) -> int:
        return int(self._requests.total(now))

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def open_remaining(self, now: float) -> float:
        """Seconds until an open circuit lets a probe through (0 unless open)."""
        return max(0.0, self._open_until - now) if self.state == "open" else 0.0

    def _end_probe(self, ticket: int | None) -> bool:
        """Return the probe slot; True when this was a probe of the current half-open spell."""
        if ticket is None or ticket != self._generation:
            return False
        self._probes = max(0, self._probes - 1)
        return self.state == "half_open"

    def _transition(self, state: BreakerState, now: float, reason: str = "") -> None:
        previous = self.state
        self.state = state
        self._generation += 1
        self._probes = 0
        if state == "open":
            self._open_until = now + self._config.open_s
        elif state == "closed":
            self._consecutive = 0
            self._requests.clear()
            self._failures.clear()
        if state == "open" or previous == "half_open":
            logger.warning(
                "deployment %s circuit %s -> %s%s",
                self._name,
                previous,
                state,
                f" ({reason})" if reason else "",
            )


class RetryBudget:
    """Caps retries at a share of requests so that retries cannot multiply an outage.

    Over any `window_s` seconds, retries stay at or below
    `ratio * requests + min_per_s * window_s`.
    """

    __slots__ = ("_clock", "_ratio", "_requests", "_reserve", "_retries")

    def __init__(
        self, ratio: float, min_per_s: float, window_s: float, clock: Callable[[], float]
    ) -> None:
        self._ratio = ratio
        self._reserve = min_per_s * window_s
        self._requests = WindowCounter(window_s)
        self._retries = WindowCounter(window_s)
        self._clock = clock

    def record_request(self) -> None:
        self._requests.add(self._clock())

    def try_retry(self) -> bool:
        """Spend one retry if the budget has room; False means do not retry."""
        now = self._clock()
        allowed = self._reserve + self._ratio * self._requests.total(now)
        if self._retries.total(now) + 1 > allowed:
            return False
        self._retries.add(now)
        return True
