"""Routing: public model names to deployments, with retries, failover and timeouts.

A model (or one of its aliases) is served by one or more deployments, each a provider
plus an upstream model name, with a weight and a priority tier (lower is preferred).
`Router.forward` picks a deployment and calls it:

1. a tenant's override for the model (a pinned, possibly dedicated, deployment) first;
2. then the best priority tier that has a healthy deployment, choosing within the tier by
   the model's strategy (`weighted` random, `least_inflight` or `lowest_latency`);
3. when the whole model is down (no deployment healthy), its `fallbacks` models in order;
   and when every deployment of the model has failed a request before its first byte,
   that same request goes on to the fallbacks (within `max_attempts` and the retry
   budget) before any deployment is tried twice. It is billed once, to the deployment
   that served it.

A deployment is healthy when its circuit breaker lets traffic through (see
`gateway.breaker`) and it is not cooling down after an upstream 429.

Retryable failures (connect errors, 429, 5xx, time to first token exceeded) are retried
only before the first chunk is returned to the caller, never after: on another deployment
when one is available, else on the same one after backoff with jitter, within
`max_attempts` and a process-wide retry budget.

Timeouts are per deployment. For a stream, the call and its first chunk must arrive
within `ttft_s`; then each chunk within `idle_s`; the whole request within `total_s`
(counted from the start of `forward`, so retries do not extend it). A non-streaming call
is bounded by `total_s`. A timed-out upstream call is cancelled and its stream closed.

With `health_check_interval_s` set, `start_health_checks` probes every deployment in the
background with a one-token request (`probe_request`); a probe counts toward the breaker
like a request, so a dead deployment opens without traffic, and the probe sent once it is
half-open closes it again when the deployment is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.breaker import BreakerConfig, CircuitBreaker, RetryBudget
from providers.base import (
    Chunks,
    Endpoint,
    Provider,
    ProviderRequest,
    ProviderResponse,
    UpstreamError,
)

__all__ = [
    "BreakerConfig",
    "Deployment",
    "DeploymentConfig",
    "ForwardFailed",
    "Forwarded",
    "ModelConfig",
    "RetryConfig",
    "Router",
    "RoutingConfig",
    "Timeouts",
    "UnknownModel",
    "probe_request",
]

logger = logging.getLogger(__name__)

LATENCY_EWMA_ALPHA = 0.3
"""Weight of the newest sample in a deployment's moving average of latency."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Timeouts(_Strict):
    """Per-deployment time limits, in seconds.

    `connect_s` is for the provider's HTTP client (the router cannot see a connection
    being made; unset, the provider's own connect timeout applies); the router enforces
    the other three.
    """

    connect_s: float | None = Field(default=None, gt=0)
    ttft_s: float = Field(default=60, gt=0, description="Until the first chunk of a stream")
    idle_s: float = Field(default=30, gt=0, description="Between two chunks of a stream")
    total_s: float = Field(default=600, gt=0, description="The whole request, retries included")


class DeploymentConfig(_Strict):
    """One way to serve a model: a provider and the upstream model name it knows."""

    name: str | None = Field(default=None, description='Defaults to "<provider>/<model>"')
    provider: str
    model: str = Field(description="The upstream model name")
    weight: float = Field(default=1, ge=0)
    priority: int = Field(default=0, description="Tier; lower is preferred")
    timeouts: Timeouts = Field(default_factory=lambda: Timeouts())
    dedicated: bool = Field(
        default=False, description="Serve only tenants pinned to it by routing.tenant_overrides"
    )

    @property
    def resolved_name(self) -> str:
        return self.name or f"{self.provider}/{self.model}"


class ModelConfig(_Strict):
    """A public model name, its aliases, and the deployments that serve it."""

    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    kind: Literal["chat", "completion", "embedding"] = Field(
        default="chat", description="Chat models also serve /v1/completions"
    )
    deployments: list[DeploymentConfig] = Field(min_length=1)
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Models to use, in order, when this one is down or has failed the request",
    )
    strategy: Literal["weighted", "least_inflight", "lowest_latency"] = "weighted"
    encoding: str | None = Field(default=None, description="Tokenizer override")


class RetryConfig(_Strict):
    """How often, how patiently, and how much in aggregate to retry."""

    max_attempts: int = Field(
        default=3, ge=1, description="Attempts per request, the first included"
    )
    backoff_base_s: float = Field(default=0.05, ge=0)
    backoff_max_s: float = Field(default=1.0, ge=0)
    budget_ratio: float = Field(
        default=0.2, ge=0, description="Retries allowed per request, on average"
    )
    budget_min_per_s: float = Field(
        default=5, ge=0, description="Retries allowed whatever the traffic"
    )
    budget_window_s: float = Field(default=10, gt=0)


class RoutingConfig(_Strict):
    """Routing settings shared by all models."""

    retry: RetryConfig = Field(default_factory=lambda: RetryConfig())
    breaker: BreakerConfig = Field(default_factory=lambda: BreakerConfig())
    tenant_overrides: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="tenant -> model (or alias) -> deployment name"
    )
    health_check_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="Probe every deployment this often with a one-token request (never"
        " billed); None turns it off",
    )


class UnknownModel(LookupError):
    """The requested model name is neither a model nor an alias."""


@dataclass(eq=False, slots=True)
class Deployment:
    """A deployment at run time: its settings and its live health."""

    name: str
    provider_name: str
    provider: Provider
    model: str  # the upstream model name
    model_name: str  # the public model it serves
    kind: str
    weight: float
    priority: int
    timeouts: Timeouts
    breaker: CircuitBreaker
    dedicated: bool = False
    in_flight: int = 0
    ewma_latency_s: float | None = None
    cooldown_until: float = 0.0

    def available(self, now: float) -> bool:
        """Whether a request may be sent here now."""
        return now >= self.cooldown_until and self.breaker.allows(now)

    def observe_latency(self, seconds: float) -> None:
        """Fold one time-to-first-byte into the moving average `lowest_latency` reads."""
        previous = self.ewma_latency_s
        self.ewma_latency_s = (
            seconds if previous is None else previous + LATENCY_EWMA_ALPHA * (seconds - previous)
        )

    def end_attempt(self, ticket: int | None, outcome: str, now: float) -> None:
        """Close the books on one attempt: its in-flight slot and its breaker outcome
        (`success`, `failure`, or `neutral` for one that says nothing of health)."""
        self.in_flight -= 1
        if outcome == "success":
            self.breaker.success(now, ticket)
        elif outcome == "failure":
            self.breaker.failure(now, ticket)
        else:
            self.breaker.release(ticket)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """`Router.forward`'s answer: the response, the deployment that served it, after how
    many attempts, and its time to first byte (a stream's first chunk)."""

    response: ProviderResponse
    deployment: Deployment
    attempts: int
    upstream_ttft_s: float | None
    tried: list[str] = field(default_factory=list)  # deployment names, one per attempt


class ForwardFailed(UpstreamError):
    """`Router.forward` gave up: the last upstream error, with the deployment tried last
    (None when none was healthy) and the number of attempts made."""

    def __init__(self, error: UpstreamError, deployment: Deployment | None, attempts: int) -> None:
        super().__init__(
            error.status_code,
            error.message,
            type=error.type,
            code=error.code,
            param=error.param,
            retryable=error.retryable,
            retry_after=error.retry_after,
        )
        self.deployment = deployment
        self.attempts = attempts


@dataclass(slots=True)
class _Route:
    """A model's deployments, grouped by tier (best first); dedicated ones are left out."""

    config: ModelConfig
    deployments: list[Deployment]
    tiers: list[list[Deployment]]


class Router:
    """Picks deployments for requests, and calls them with retries, failover and timeouts.

    State (health, in-flight counts, latency, the retry budget) lives in this object, per
    process. `clock` times health and latency; timeouts use the event loop's clock.
    """

    def __init__(
        self,
        models: list[ModelConfig],
        providers: Mapping[str, Provider],
        config: RoutingConfig,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._retry = config.retry
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self._budget = RetryBudget(
            config.retry.budget_ratio,
            config.retry.budget_min_per_s,
            config.retry.budget_window_s,
            clock,
        )
        self._health_task: asyncio.Task[None] | None = None
        self._routes: dict[str, _Route] = {}
        self._names: dict[str, str] = {}  # name or alias -> model name
        self._deployments: dict[str, Deployment] = {}
        for i, model in enumerate(models):
            self._add_model(i, model, providers)
        for i, model in enumerate(models):
            for fallback in model.fallbacks:
                target = self._names.get(fallback)
                if target is None:
                    raise ValueError(f"models[{i}].fallbacks: unknown model {fallback!r}")
                if target == model.name:
                    raise ValueError(f"models[{i}].fallbacks: {fallback!r} is the model itself")
                if self._routes[target].config.kind != model.kind:
                    raise ValueError(
                        f"models[{i}].fallbacks: {fallback!r} is a "
                        f"{self._routes[target].config.kind} model, not {model.kind}"
                    )
        self._fallbacks = {
            model.name: [self._routes[self._names[f]] for f in model.fallbacks] for model in models
        }
        self._overrides: dict[str, dict[str, Deployment]] = {}
        for tenant, pins in config.tenant_overrides.items():
            resolved: dict[str, Deployment] = {}
            for requested, deployment_name in pins.items():
                where = f"routing.tenant_overrides.{tenant}.{requested}"
                model_name = self._names.get(requested)
                if model_name is None:
                    raise ValueError(f"{where}: unknown model {requested!r}")
                deployment = self._deployments.get(deployment_name)
                if deployment is None:
                    raise ValueError(f"{where}: unknown deployment {deployment_name!r}")
                if deployment.kind != self._routes[model_name].config.kind:
                    raise ValueError(f"{where}: {deployment_name!r} serves another kind of model")
                resolved[model_name] = deployment
            self._overrides[tenant] = resolved

    def _add_model(self, i: int, model: ModelConfig, providers: Mapping[str, Provider]) -> None:
        for j, name in enumerate([model.name, *model.aliases]):
            if name in self._names:
                field_name = "name" if j == 0 else "aliases"
                raise ValueError(f"models[{i}].{field_name}: duplicate model name {name!r}")
            self._names[name] = model.name
        deployments: list[Deployment] = []
        for j, spec in enumerate(model.deployments):
            where = f"models[{i}].deployments[{j}]"
            provider = providers.get(spec.provider)
            if provider is None:
                raise ValueError(f"{where}.provider: unknown provider {spec.provider!r}")
            name = spec.resolved_name
            if name in self._deployments:
                raise ValueError(
                    f"{where}.name: duplicate deployment name {name!r} (give each its own name)"
                )
            deployment = Deployment(
                name=name,
                provider_name=spec.provider,
                provider=provider,
                model=spec.model,
                model_name=model.name,
                kind=model.kind,
                weight=spec.weight,
                priority=spec.priority,
                timeouts=spec.timeouts,
                breaker=CircuitBreaker(name, self._config.breaker),
                dedicated=spec.dedicated,
            )
            self._deployments[name] = deployment
            deployments.append(deployment)
        shared = [d for d in deployments if not d.dedicated]
        tiers = [
            [d for d in shared if d.priority == p] for p in sorted({d.priority for d in shared})
        ]
        self._routes[model.name] = _Route(model, deployments, tiers)

    # -- lookup -------------------------------------------------------------------------

    def resolve(self, requested: str) -> ModelConfig:
        """The model a public name or alias stands for; raises `UnknownModel`."""
        name = self._names.get(requested)
        if name is None:
            raise UnknownModel(requested)
        return self._routes[name].config

    def models(self) -> list[ModelConfig]:
        """Every configured model, in configuration order."""
        return [route.config for route in self._routes.values()]

    def deployments(self) -> list[Deployment]:
        """Every deployment, in configuration order."""
        return list(self._deployments.values())

    # -- selection ----------------------------------------------------------------------

    def _pick(
        self,
        model_name: str,
        tenant_id: str,
        tried: tuple[Deployment, ...] | list[Deployment],
        now: float,
    ) -> Deployment | None:
        """The model's untried deployments first, then its fallbacks' untried ones, in order;
        only then a tried one still healthy (the model's own first), for a retry."""
        routes = [self._routes[model_name], *self._fallbacks[model_name]]
        for untried_only in (True, False) if tried else (False,):
            for route in routes:
                chosen = self._pick_in(route, tenant_id, tried, now, untried_only)
                if chosen is not None:
                    return chosen
        return None

    def _pick_in(
        self,
        route: _Route,
        tenant_id: str,
        tried: tuple[Deployment, ...] | list[Deployment],
        now: float,
        untried_only: bool = False,
    ) -> Deployment | None:
        """A deployment of one model: untried ones first, else (unless `untried_only`) a
        tried one still healthy."""
        pinned = self._overrides.get(tenant_id, {}).get(route.config.name) if tenant_id else None
        pinned_ok = pinned is not None and pinned.available(now)
        if pinned_ok and pinned not in tried:
            return pinned
        if untried_only:
            pinned_ok = False
        fallback_tier: list[Deployment] | None = None
        for tier in route.tiers:
            healthy = [d for d in tier if d.available(now)]
            if not healthy:
                continue
            untried = [d for d in healthy if d not in tried] if tried else healthy
            if untried:
                return self._choose(route.config.strategy, untried)
            if fallback_tier is None and not untried_only:
                fallback_tier = healthy
        if pinned_ok:
            return pinned
        if fallback_tier is not None:
            return self._choose(route.config.strategy, fallback_tier)
        return None

    def _choose(self, strategy: str, candidates: list[Deployment]) -> Deployment:
        if len(candidates) == 1:
            return candidates[0]
        if strategy == "least_inflight":
            least = min(d.in_flight for d in candidates)
            return self._rng.choice([d for d in candidates if d.in_flight == least])
        if strategy == "lowest_latency":
            # A deployment with no measurement yet counts as fastest, so it gets measured.
            lowest = min(d.ewma_latency_s or 0.0 for d in candidates)
            return self._rng.choice([d for d in candidates if (d.ewma_latency_s or 0.0) == lowest])
        total = sum(d.weight for d in candidates)
        if total <= 0:
            return self._rng.choice(candidates)
        point = self._rng.random() * total
        for deployment in candidates:
            point -= deployment.weight
            if point < 0:
                return deployment
        return candidates[-1]

    # -- forwarding ---------------------------------------------------------------------

    async def forward(
        self,
        model: ModelConfig,
        tenant_id: str,
        make_request: Callable[[Deployment], ProviderRequest],
    ) -> Forwarded:
        """Send a request for `model` to a healthy deployment, retrying before the first chunk.

        `make_request` builds the provider request for the chosen deployment (it is called
        once per attempt). Returns once a body or a stream's first chunk has arrived; the
        returned stream replays that chunk, enforces the idle and total timeouts, and must
        be consumed to its end or closed with `aclose()`. Raises `UpstreamError`: the
        upstream's own non-retryable error at once, the last error when attempts or the
        retry budget run out, and 503 when no deployment of the model (or its fallbacks)
        is healthy; always as a `ForwardFailed`, which names the deployment tried last.
        """
        tried: list[Deployment] = []
        # One coroutine (no inner one): every upstream wake-up passes through each frame.
        last_error: UpstreamError | None = None
        try:
            started = asyncio.get_running_loop().time()
            self._budget.record_request()
            retry = self._retry
            for attempt in range(1, retry.max_attempts + 1):
                deployment = self._pick(model.name, tenant_id, tried, self._clock())
                if deployment is None:
                    raise last_error or self._no_healthy(model)
                if last_error is not None:
                    if not self._budget.try_retry():
                        raise last_error
                    if deployment in tried:
                        await self._sleep(self._backoff(attempt - 1))
                        deployment = self._pick(model.name, tenant_id, tried, self._clock())
                        if deployment is None:
                            raise last_error
                tried.append(deployment)
                try:
                    response, ttft = await self._attempt(deployment, make_request, started)
                except UpstreamError as error:
                    if not error.retryable:
                        raise
                    last_error = error
                    continue
                return Forwarded(response, deployment, attempt, ttft, [d.name for d in tried])
            assert last_error is not None
            raise last_error
        except ForwardFailed:
            raise
        except UpstreamError as error:
            raise ForwardFailed(error, tried[-1] if tried else None, len(tried)) from error

    def _backoff(self, retry_number: int) -> float:
        """Equal jitter: half the exponential step fixed, half random."""
        retry = self._retry
        step = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (retry_number - 1))
        return step / 2 + self._rng.random() * step / 2

    def _no_healthy(self, model: ModelConfig) -> UpstreamError:
        now = self._clock()
        routes = [self._routes[model.name], *self._fallbacks[model.name]]
        waits = [
            max(d.cooldown_until - now, d.breaker.open_remaining(now))
            for route in routes
            for d in route.deployments
        ]
        return UpstreamError(
            503,
            f"no healthy deployment for model {model.name}",
            type="service_unavailable",
            retryable=False,
            retry_after=round(min(waits), 3) if waits else None,
        )

    async def _attempt(
        self,
        deployment: Deployment,
        make_request: Callable[[Deployment], ProviderRequest],
        started: float,
        *,
        total_deadline: float | None = None,
    ) -> tuple[ProviderResponse, float]:
        """One call to one deployment, up to its body or first chunk."""
        request = make_request(deployment)
        timeouts = deployment.timeouts
        loop = asyncio.get_running_loop()
        if total_deadline is None:
            total_deadline = started + timeouts.total_s
        deadline = (
            min(loop.time() + timeouts.ttft_s, total_deadline) if request.stream else total_deadline
        )
        clock = self._clock
        begun = clock()
        ticket = deployment.breaker.acquire(begun)
        deployment.in_flight += 1
        upstream: AsyncIterator[Chunks] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                response = await deployment.provider.send(request)
                upstream = response.stream
                if upstream is not None:
                    try:
                        first: Chunks | None = await anext(upstream)
                    except StopAsyncIteration:
                        first = None
        except TimeoutError:
            if upstream is not None:
                await _close(upstream)
            self._end(deployment, ticket, "failure")
            if deadline >= total_deadline:
                raise UpstreamError(
                    504,
                    f"deployment {deployment.name} exceeded the total timeout "
                    f"of {timeouts.total_s:g}s",
                    type="timeout",
                    retryable=False,
                ) from None
            raise UpstreamError(
                504,
                f"deployment {deployment.name} sent no first token within {timeouts.ttft_s:g}s",
                type="timeout",
                retryable=True,
            ) from None
        except UpstreamError as error:
            if upstream is not None:
                await _close(upstream)
            if error.status_code == 429:
                self._cool_down(deployment, error.retry_after)
                self._end(deployment, ticket, "neutral")
            else:
                self._end(deployment, ticket, _outcome(error))
            raise
        except Exception as error:  # a provider breaking its contract: a failed attempt
            if upstream is not None:
                await _close(upstream)
            self._end(deployment, ticket, "failure")
            logger.warning("deployment %s raised %r", deployment.name, error, exc_info=error)
            raise UpstreamError(
                502, f"deployment {deployment.name} failed", retryable=True
            ) from error
        except BaseException:  # cancelled: the client has gone
            if upstream is not None:
                await _close(upstream)
            self._end(deployment, ticket, "neutral")
            raise
        ttft = clock() - begun
        deployment.observe_latency(ttft)
        if upstream is None:
            self._end(deployment, ticket, "success")
            return response, ttft
        stream = GuardedStream(
            clock, deployment, ticket, upstream, first, timeouts.idle_s, total_deadline
        )
        return ProviderResponse(stream=stream, headers=response.headers), ttft

    def _cool_down(self, deployment: Deployment, retry_after: float | None) -> None:
        breaker_config = self._config.breaker
        seconds = breaker_config.cooldown_default_s if retry_after is None else retry_after
        seconds = min(max(seconds, 0.0), breaker_config.cooldown_max_s)
        deployment.cooldown_until = max(deployment.cooldown_until, self._clock() + seconds)

    def _end(self, deployment: Deployment, ticket: int | None, outcome: str) -> None:
        deployment.end_attempt(ticket, outcome, self._clock())

    # -- health -------------------------------------------------------------------------

    def health(self) -> list[dict[str, Any]]:
        """Per deployment: its state, cooldown, load, latency and recent failure rate."""
        now = self._clock()
        report = []
        for d in self._deployments.values():
            d.breaker.allows(now)  # an open circuit past its time reports as half-open
            report.append(
                {
                    "name": d.name,
                    "model": d.model_name,
                    "provider": d.provider_name,
                    "upstream_model": d.model,
                    "priority": d.priority,
                    "weight": d.weight,
                    "dedicated": d.dedicated,
                    "state": d.breaker.state,
                    "healthy": d.available(now),
                    "open_remaining_s": round(d.breaker.open_remaining(now), 3),
                    "cooldown_until": d.cooldown_until if d.cooldown_until > now else None,
                    "cooldown_remaining_s": round(max(0.0, d.cooldown_until - now), 3),
                    "in_flight": d.in_flight,
                    "ewma_latency_s": d.ewma_latency_s,
                    "recent_requests": d.breaker.requests(now),
                    "recent_failure_rate": round(d.breaker.failure_rate(now), 4),
                    "consecutive_failures": d.breaker.consecutive_failures,
                }
            )
        return report

    async def check_health(
        self, make_request: Callable[[Deployment], ProviderRequest]
    ) -> dict[str, bool]:
        """Actively probe every deployment that may take traffic now; the outcomes count
        toward its breaker like any request's. Returns deployment name -> answered well.

        `make_request` should build a small non-streaming request for the deployment (its
        `kind` tells which endpoint). Deployments that are open or cooling down are skipped.
        """
        now = self._clock()
        targets = [d for d in self._deployments.values() if d.available(now)]

        async def probe(deployment: Deployment) -> bool:
            now = asyncio.get_running_loop().time()
            deadline = now + deployment.timeouts.ttft_s
            try:
                response, _ = await self._attempt(
                    deployment, make_request, now, total_deadline=deadline
                )
                if response.stream is not None:
                    async for _chunk in response.stream:
                        pass
            except UpstreamError:
                return False
            return True

        results = await asyncio.gather(*(probe(d) for d in targets))
        return {d.name: ok for d, ok in zip(targets, results, strict=True)}

    async def run_health_checks(
        self, make_request: Callable[[Deployment], ProviderRequest], interval_s: float
    ) -> None:
        """Probe all deployments every `interval_s` seconds until cancelled."""
        while True:
            try:
                await self.check_health(make_request)
            except Exception:  # a bug in building probes must not end the checks for good
                logger.exception("active health check failed")
            await asyncio.sleep(interval_s)

    def start_health_checks(
        self, make_request: Callable[[Deployment], ProviderRequest] | None = None
    ) -> None:
        """Run `run_health_checks` in the background every `health_check_interval_s`
        (nothing when it is unset); `aclose()` stops it. Needs a running event loop."""
        interval = self._config.health_check_interval_s
        if interval is None or self._health_task is not None:
            return
        self._health_task = asyncio.create_task(
            self.run_health_checks(make_request or probe_request, interval),
            name="health-checks",
        )

    async def aclose(self) -> None:
        """Stop the background health checks (probes in flight are cancelled)."""
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


_PROBE_ENDPOINTS: dict[str, Endpoint] = {
    "chat": "chat.completions",
    "completion": "completions",
    "embedding": "embeddings",
}


def probe_request(deployment: Deployment) -> ProviderRequest:
    """The smallest request a deployment's kind serves: one input word, one output token."""
    body: dict[str, Any] = {"model": deployment.model}
    if deployment.kind == "embedding":
        body["input"] = "ping"
    elif deployment.kind == "completion":
        body.update(prompt="ping", max_tokens=1)
    else:
        body.update(messages=[{"role": "user", "content": "ping"}], max_tokens=1)
    return ProviderRequest(
        endpoint=_PROBE_ENDPOINTS[deployment.kind],
        model=deployment.model,
        body=body,
        request_id="health-check",
        connect_timeout_s=deployment.timeouts.connect_s,
    )


def _outcome(error: UpstreamError) -> str:
    """What an upstream error says about the deployment's health."""
    if error.status_code == 429:
        return "neutral"
    if error.retryable or error.status_code >= 500:
        return "failure"
    return "success"  # it answered; the request itself was refused


async def _close(upstream: AsyncIterator[Chunks]) -> None:
    """Close an upstream stream, cancelling its work; errors while closing are dropped."""
    aclose = getattr(upstream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        pass  # closing is best effort


_NO_CHUNK: Any = object()
_TIMER_SLACK = 0.001
"""A timer that fires this close to its deadline counts as on time (loop clock granularity)."""


class GuardedStream:
    """The stream `forward` returns: replays the first read, then relays the upstream's
    reads under the idle and total timeouts, and reports the outcome to the breaker.

    A timeout closes the upstream and raises `UpstreamError(504, retryable=False)`; an
    upstream error part-way is re-raised marked not retryable (chunks have been sent).
    `aclose()`, or cancelling the task that reads it, closes the upstream at once.

    The idle timeout counts only time spent waiting for the upstream. It is kept by one
    watchdog timer per stream, re-armed lazily, not by a timer per chunk.
    """

    __slots__ = (
        "_cancelling",
        "_clock",
        "_deployment",
        "_done",
        "_expired",
        "_first",
        "_idle_s",
        "_loop",
        "_ticket",
        "_timer",
        "_total_deadline",
        "_upstream",
        "_waiter",
        "_waiting_since",
    )

    def __init__(
        self,
        clock: Callable[[], float],
        deployment: Deployment,
        ticket: int | None,
        upstream: AsyncIterator[Chunks],
        first: Chunks | None,
        idle_s: float,
        total_deadline: float,
    ) -> None:
        self._clock = clock
        self._deployment = deployment
        self._ticket = ticket
        self._upstream = upstream
        self._first = _NO_CHUNK if first is None else first
        self._idle_s = idle_s
        self._total_deadline = total_deadline
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Task[Any] | None = None
        self._waiting_since = 0.0
        self._expired: str | None = None
        self._cancelling = 0
        self._done = False
        if first is None:
            self._finish("success")

    def __aiter__(self) -> GuardedStream:
        return self

    async def __anext__(self) -> Chunks:
        first = self._first
        if first is not _NO_CHUNK:
            self._first = _NO_CHUNK
            return first  # type: ignore[no-any-return]
        if self._done:
            raise StopAsyncIteration
        now = self._loop.time()
        self._waiting_since = now
        if self._timer is None:
            self._arm(now)
        waiter = self._waiter = asyncio.current_task()
        try:
            return await anext(self._upstream)
        except StopAsyncIteration:
            self._finish("success")
            raise
        except asyncio.CancelledError:
            if self._expired is None or waiter is None or waiter.uncancel() > self._cancelling:
                self._finish("neutral")  # cancelled from outside: the client has gone
                await _close(self._upstream)
                raise
            self._finish("failure")
            await _close(self._upstream)
            raise self._timeout_error() from None
        except UpstreamError as error:
            self._finish(_outcome(error))
            error.retryable = False
            await _close(self._upstream)
            raise
        except Exception as error:  # a provider breaking its contract
            self._finish("failure")
            await _close(self._upstream)
            logger.warning("deployment %s stream raised %r", self._deployment.name, error)
            raise UpstreamError(
                502, f"deployment {self._deployment.name} failed mid-stream", retryable=False
            ) from error
        except BaseException:
            self._finish("neutral")
            await _close(self._upstream)
            raise
        finally:
            self._waiter = None

    async def aclose(self) -> None:
        """Stop reading: the upstream is closed (its work cancelled) at once."""
        self._first = _NO_CHUNK
        if self._done:
            return
        self._finish("neutral")
        await _close(self._upstream)

    def _arm(self, now: float) -> None:
        deadline = min(now + self._idle_s, self._total_deadline)
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or self._done:
            return  # not waiting on the upstream now; the next read re-arms the timer
        now = self._loop.time()
        idle_deadline = self._waiting_since + self._idle_s
        deadline = min(idle_deadline, self._total_deadline)
        if now + _TIMER_SLACK < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._expired = "total" if self._total_deadline < idle_deadline else "idle"
        self._cancelling = waiter.cancelling()
        waiter.cancel()

    def _timeout_error(self) -> UpstreamError:
        deployment = self._deployment
        if self._expired == "total":
            message = (
                f"deployment {deployment.name} exceeded the total timeout "
                f"of {deployment.timeouts.total_s:g}s"
            )
        else:
            message = f"deployment {deployment.name} sent nothing for {self._idle_s:g}s mid-stream"
        return UpstreamError(504, message, type="timeout", retryable=False)

    def _finish(self, outcome: str) -> None:
        if not self._done:
            self._done = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._deployment.end_attempt(self._ticket, outcome, self._clock())

    def __del__(self) -> None:
        # Dropped without being read to the end or closed: still return the slot.
        if not self._done:
            self._finish("neutral")
