"""Routing: deployment selection, retries before the first chunk, circuit breakers,
cooldowns, the retry budget and timeouts, against small scripted providers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.routing import (
    Deployment,
    Forwarded,
    ForwardFailed,
    ModelConfig,
    Router,
    RoutingConfig,
    UnknownModel,
)
from providers.base import Chunk, Provider, ProviderRequest, ProviderResponse, UpstreamError

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    """A clock the test moves by hand (health, cooldowns, latency, the retry budget)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Script:
    """What one call to a scripted provider does."""

    error: Exception | None = None  # raised by send
    hang: bool = False  # send never returns
    chunks: int | None = None  # a stream of this many chunks (if one was asked for)
    then: str = "end"  # after the chunks: "end", "fail", "hang" or "drip" (a chunk forever)
    chunk_delay: float = 0.0  # real seconds between chunks
    latency: float = 0.0  # fake-clock seconds the call takes


def server_error() -> UpstreamError:
    return UpstreamError(503, "upstream overloaded", retryable=True)


OK = Script()


class ScriptedProvider(Provider):
    """A provider that follows a script per call, and notes what was done to it."""

    def __init__(
        self,
        name: str,
        script: Script | Callable[[int], Script] = OK,
        clock: FakeClock | None = None,
    ) -> None:
        self.name = name
        self._script = script
        self._clock = clock
        self.calls = 0
        self.failures = 0
        self.cancelled = 0
        self.closed = 0

    def next_script(self) -> Script:
        script = self._script
        return script(self.calls) if callable(script) else script

    async def send(self, request: ProviderRequest) -> ProviderResponse:
        script = self.next_script()
        self.calls += 1
        if self._clock is not None and script.latency:
            self._clock.advance(script.latency)
        try:
            await asyncio.sleep(0)
            if script.hang:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if script.error is not None:
            self.failures += 1
            raise script.error
        if script.chunks is None or not request.stream:
            return ProviderResponse(body={"served_by": self.name, "model": request.model})
        return ProviderResponse(stream=self._stream(script))

    async def _stream(self, script: Script) -> AsyncIterator[Chunk]:
        try:
            for index in range(script.chunks or 0):
                if index and script.chunk_delay:
                    await asyncio.sleep(script.chunk_delay)
                yield {"served_by": self.name, "index": index}
            if script.then == "fail":
                self.failures += 1
                raise UpstreamError(502, "stream broke", retryable=True)
            if script.then == "hang":
                await asyncio.Event().wait()
            while script.then == "drip":
                await asyncio.sleep(script.chunk_delay)
                yield {"served_by": self.name, "index": -1}
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except GeneratorExit:
            self.closed += 1
            raise


def model(name: str, *deployments: dict[str, Any], **extra: Any) -> ModelConfig:
    return ModelConfig.model_validate({"name": name, "deployments": list(deployments), **extra})


def dep(provider: str, **extra: Any) -> dict[str, Any]:
    return {"provider": provider, "model": f"up-{provider}", "name": provider, **extra}


def build(
    models: list[ModelConfig],
    providers: list[ScriptedProvider],
    clock: FakeClock,
    seed: int = 1,
    **routing: Any,
) -> Router:
    config = RoutingConfig.model_validate(routing)

    async def no_sleep(_seconds: float) -> None:
        await asyncio.sleep(0)

    return Router(
        models,
        {p.name: p for p in providers},
        config,
        rng=random.Random(seed),
        clock=clock,
        sleep=no_sleep,
    )


def make_request(stream: bool = False) -> Callable[[Deployment], ProviderRequest]:
    def make(deployment: Deployment) -> ProviderRequest:
        body: dict[str, Any] = {
            "model": deployment.model,
            "messages": [{"role": "user", "content": "hi"}],
        }
        if stream:
            body["stream"] = True
        return ProviderRequest("chat.completions", deployment.model, body)

    return make


async def call(
    router: Router, model_name: str = "m", tenant: str = "t", stream: bool = False
) -> tuple[Forwarded, list[Chunk]]:
    """Forward one request and read all of it (a body counts as one chunk)."""
    forwarded = await router.forward(router.resolve(model_name), tenant, make_request(stream))
    response = forwarded.response
    if response.stream is None:
        assert response.body is not None
        return forwarded, [response.body]
    return forwarded, [chunk async for chunk in response.stream]


def state_of(router: Router, name: str) -> dict[str, Any]:
    return next(h for h in router.health() if h["name"] == name)


# -- configuration ----------------------------------------------------------------------


def test_resolve_names_and_aliases() -> None:
    clock = FakeClock()
    router = build(
        [model("big", dep("a"), aliases=["gpt-4o"]), model("small", dep("b"))],
        [ScriptedProvider("a"), ScriptedProvider("b")],
        clock,
    )
    assert router.resolve("gpt-4o").name == "big"
    assert router.resolve("small").name == "small"
    assert [m.name for m in router.models()] == ["big", "small"]
    with pytest.raises(UnknownModel):
        router.resolve("nope")


@pytest.mark.parametrize(
    ("models", "overrides", "field"),
    [
        ([model("m", dep("missing"))], {}, "models[0].deployments[0].provider"),
        ([model("m", dep("a")), model("n", dep("b"), aliases=["m"])], {}, "models[1].aliases"),
        ([model("m", dep("a")), model("m", dep("b"))], {}, "models[1].name"),
        ([model("m", dep("a"), dep("a"))], {}, "models[0].deployments[1].name"),
        ([model("m", dep("a"), fallbacks=["gone"])], {}, "models[0].fallbacks"),
        ([model("m", dep("a"))], {"acme": {"m": "gone"}}, "routing.tenant_overrides.acme.m"),
        ([model("m", dep("a"))], {"acme": {"gone": "a"}}, "routing.tenant_overrides.acme.gone"),
    ],
)
def test_configuration_errors_name_the_field(
    models: list[ModelConfig], overrides: dict[str, dict[str, str]], field: str
) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        build(
            models,
            [ScriptedProvider("a"), ScriptedProvider("b")],
            FakeClock(),
            tenant_overrides=overrides,
        )


# -- selection --------------------------------------------------------------------------


async def test_weighted_routing_follows_the_weights_over_10000_picks() -> None:
    clock = FakeClock()
    providers = [ScriptedProvider(n) for n in ("a", "b", "c")]
    weights = {"a": 1.0, "b": 2.0, "c": 7.0}
    router = build(
        [model("m", *(dep(n, weight=w) for n, w in weights.items()))], providers, clock, seed=42
    )
    picks = 10_000
    for _ in range(picks):
        await router.forward(router.resolve("m"), "t", make_request())
    total = sum(weights.values())
    chi_square = 0.0
    for provider in providers:
        expected = picks * weights[provider.name] / total
        chi_square += (provider.calls - expected) ** 2 / expected
        # and each share within 1.5 percentage points of its weight
        assert abs(provider.calls / picks - weights[provider.name] / total) < 0.015
    assert chi_square < 13.82  # chi-square, 2 degrees of freedom, p = 0.001


async def test_a_failed_forward_names_the_deployment_tried_last_and_the_attempts() -> None:
    clock = FakeClock()
    providers = [ScriptedProvider(n, Script(error=server_error())) for n in ("a", "b")]
    router = build([model("m", dep("a", priority=0), dep("b", priority=1))], providers, clock)
    with pytest.raises(ForwardFailed) as caught:
        await router.forward(router.resolve("m"), "t", make_request())
    failed = caught.value  # tried a, then b, then a again (after backoff)
    assert failed.deployment is not None and failed.deployment.name == "a"
    assert (failed.attempts, failed.status_code, failed.message) == (
        3,
        503,
        "upstream overloaded",
    )
    assert isinstance(failed, UpstreamError)

    for provider in providers:
        provider._script = Script(error=UpstreamError(400, "bad request"))
    with pytest.raises(ForwardFailed) as caught:  # not retryable: the first attempt's error
        await router.forward(router.resolve("m"), "t", make_request())
    assert caught.value.attempts == 1 and caught.value.status_code == 400


async def test_best_tier_takes_all_traffic_and_fails_over_to_the_next() -> None:
    clock = FakeClock()
    primary = ScriptedProvider("primary")
    backup = ScriptedProvider("backup")
    router = build(
        [model("m", dep("primary", priority=0), dep("backup", priority=1))],
        [primary, backup],
        clock,
        breaker={"consecutive_failures": 2},
    )
    for _ in range(20):
        forwarded, _ = await call(router)
        assert forwarded.deployment.name == "primary"
    assert backup.calls == 0

    primary._script = Script(error=server_error())
    forwarded, body = await call(router)
    assert (forwarded.deployment.name, forwarded.attempts) == ("backup", 2)
    assert forwarded.tried == ["primary", "backup"]
    assert body == [{"served_by": "backup", "model": "up-backup"}]

    await call(router)  # the second failure in a row opens primary's circuit
    assert state_of(router, "primary")["state"] == "open"
    calls = primary.calls
    forwarded, _ = await call(router)
    assert (forwarded.deployment.name, forwarded.attempts) == ("backup", 1)
    assert primary.calls == calls


async def test_least_inflight_sends_to_the_least_busy_deployment() -> None:
    clock = FakeClock()
    providers = [ScriptedProvider(n, Script(chunks=3)) for n in ("a", "b", "c")]
    router = build(
        [model("m", dep("a"), dep("b"), dep("c"), strategy="least_inflight")], providers, clock
    )
    open_streams: dict[str, Forwarded] = {}
    for _ in range(3):
        forwarded = await router.forward(router.resolve("m"), "t", make_request(stream=True))
        open_streams[forwarded.deployment.name] = forwarded
    assert sorted(open_streams) == ["a", "b", "c"]  # one each, never two on one

    second = await router.forward(router.resolve("m"), "t", make_request(stream=True))
    stream = open_streams["b"].response.stream
    assert stream is not None
    async for _ in stream:
        pass  # b is idle again; a and c are still busy, the others have 1 or 2
    busy = {d.name: d.in_flight for d in router.deployments()}
    least = min(busy.values())
    for _ in range(5):
        forwarded = await router.forward(router.resolve("m"), "t", make_request())
        assert busy[forwarded.deployment.name] == least
    for forwarded in (*open_streams.values(), second):
        assert forwarded.response.stream is not None
        await forwarded.response.stream.aclose()  # type: ignore[attr-defined]
    assert all(d.in_flight == 0 for d in router.deployments())


async def test_lowest_latency_prefers_the_fastest_and_adapts() -> None:
    clock = FakeClock()
    slow = ScriptedProvider("slow", Script(latency=0.5), clock)
    fast = ScriptedProvider("fast", Script(latency=0.1), clock)
    router = build(
        [model("m", dep("slow"), dep("fast"), strategy="lowest_latency")], [slow, fast], clock
    )
    for _ in range(2):  # each unmeasured deployment is tried once
        await call(router)
    assert (slow.calls, fast.calls) == (1, 1)
    for _ in range(20):
        forwarded, _ = await call(router)
        assert forwarded.deployment.name == "fast"
    assert forwarded.upstream_ttft_s == pytest.approx(0.1)

    fast._script = Script(latency=2.0)  # the fast one degrades
    names = [(await call(router))[0].deployment.name for _ in range(10)]
    assert names[0] == "fast"
    assert names[-1] == "slow"
    assert state_of(router, "slow")["ewma_latency_s"] == pytest.approx(0.5)


async def test_tenant_override_pins_a_dedicated_deployment() -> None:
    clock = FakeClock()
    shared = ScriptedProvider("shared")
    dedicated = ScriptedProvider("acme-box")
    router = build(
        [model("m", dep("shared"), dep("acme-box", dedicated=True), aliases=["m-alias"])],
        [shared, dedicated],
        clock,
        tenant_overrides={"acme": {"m-alias": "acme-box"}},
    )
    for _ in range(20):
        assert (await call(router, tenant="acme"))[0].deployment.name == "acme-box"
        assert (await call(router, tenant="other"))[0].deployment.name == "shared"
    assert (shared.calls, dedicated.calls) == (20, 20)

    dedicated._script = Script(error=server_error())  # the pinned one fails: shared serves
    forwarded, _ = await call(router, tenant="acme")
    assert forwarded.tried == ["acme-box", "shared"]


async def test_fallback_model_serves_when_the_whole_model_is_down() -> None:
    clock = FakeClock()
    primary = ScriptedProvider("p1", Script(error=server_error()))
    primary2 = ScriptedProvider("p2", Script(error=server_error()))
    backup = ScriptedProvider("b")
    router = build(
        [model("main", dep("p1"), dep("p2"), fallbacks=["spare"]), model("spare", dep("b"))],
        [primary, primary2, backup],
        clock,
        breaker={"consecutive_failures": 1},
        retry={"max_attempts": 2},
    )
    with pytest.raises(UpstreamError) as caught:
        await call(router, "main")  # both of main's deployments fail once and open
    assert caught.value.status_code == 503 and caught.value.retryable
    assert backup.calls == 0

    forwarded, body = await call(router, "main")
    assert forwarded.deployment.name == "b"
    assert forwarded.deployment.model_name == "spare"
    assert body == [{"served_by": "b", "model": "up-b"}]
    assert (primary.calls, primary2.calls) == (1, 1)


async def test_no_healthy_deployment_is_503_at_once() -> None:
    clock = FakeClock()
    provider = ScriptedProvider("a", Script(error=server_error()))
    router = build(
        [model("m", dep("a"))],
        [provider],
        clock,
        breaker={"consecutive_failures": 1, "open_s": 15},
    )
    with pytest.raises(UpstreamError):
        await call(router)
    clock.advance(5)
    with pytest.raises(UpstreamError) as caught:
        await asyncio.wait_for(call(router), 1)
    error = caught.value
    assert (error.status_code, error.type, error.retryable) == (503, "service_unavailable", False)
    assert "no healthy deployment for model m" in error.message
    assert error.retry_after == pytest.approx(10)
    assert provider.calls == 1


# -- retries ----------------------------------------------------------------------------


async def test_non_retryable_error_is_raised_at_once() -> None:
    clock = FakeClock()
    a = ScriptedProvider("a", Script(error=UpstreamError(400, "bad request")))
    b = ScriptedProvider("b", Script(error=UpstreamError(400, "bad request")))
    router = build([model("m", dep("a"), dep("b"))], [a, b], clock)
    with pytest.raises(UpstreamError) as caught:
        await call(router)
    assert caught.value.status_code == 400
    assert a.calls + b.calls == 1
    assert {h["state"] for h in router.health()} == {"closed"}


async def test_same_deployment_is_retried_after_backoff_with_jitter() -> None:
    clock = FakeClock()
    failing_first = {0, 1}  # the first request fails twice, later ones once each
    flaky = ScriptedProvider(
        "a",
        lambda n: Script(error=server_error()) if n in failing_first or (n > 2 and n % 2) else OK,
    )
    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    router = Router(
        [model("m", dep("a"))],
        {"a": flaky},
        RoutingConfig.model_validate(
            {
                "retry": {"backoff_base_s": 0.1, "backoff_max_s": 0.15, "budget_min_per_s": 100},
                "breaker": {"failure_rate": 1},
            }
        ),
        rng=random.Random(3),
        clock=clock,
        sleep=record_sleep,
    )
    forwarded, _ = await call(router)
    assert (forwarded.attempts, forwarded.tried) == (3, ["a", "a", "a"])
    assert len(delays) == 2
    assert 0.075 <= delays[1] <= 0.15  # the second step, 0.2, is capped at backoff_max_s

    for _ in range(20):
        forwarded, _ = await call(router)
        assert forwarded.attempts == 2
    first_steps = [delays[0], *delays[2:]]
    assert len(first_steps) == 21
    assert all(0.05 <= d <= 0.1 for d in first_steps)  # the first step, 0.1, half jittered
    assert len({round(d, 6) for d in first_steps}) > 15  # jittered, not a fixed delay


async def test_provider_raising_something_else_is_a_retryable_failure() -> None:
    clock = FakeClock()
    buggy = ScriptedProvider("buggy", Script(error=KeyError("choices")))
    good = ScriptedProvider("good")
    router = build([model("m", dep("buggy"), dep("good", priority=1))], [buggy, good], clock)
    forwarded, _ = await call(router)
    assert forwarded.tried == ["buggy", "good"]
    assert state_of(router, "buggy")["consecutive_failures"] == 1


async def test_stream_failing_before_the_first_chunk_is_retried() -> None:
    clock = FakeClock()
    broken = ScriptedProvider("a", Script(chunks=0, then="fail"))
    good = ScriptedProvider("b", Script(chunks=3))
    router = build([model("m", dep("a", priority=0), dep("b", priority=1))], [broken, good], clock)
    forwarded, chunks = await call(router, stream=True)
    assert forwarded.tried == ["a", "b"]
    assert [c["served_by"] for c in chunks] == ["b", "b", "b"]


async def test_stream_failing_after_the_first_chunk_is_not_retried() -> None:
    clock = FakeClock()
    broken = ScriptedProvider("a", Script(chunks=2, then="fail"))
    good = ScriptedProvider("b", Script(chunks=3))
    router = build([model("m", dep("a", priority=0), dep("b", priority=1))], [broken, good], clock)
    forwarded = await router.forward(router.resolve("m"), "t", make_request(stream=True))
    stream = forwarded.response.stream
    assert stream is not None
    received = []
    with pytest.raises(UpstreamError) as caught:
        async for chunk in stream:
            received.append(chunk["index"])
    assert received == [0, 1]
    assert caught.value.status_code == 502
    assert caught.value.retryable is False  # bytes have reached the client
    assert (broken.calls, good.calls) == (1, 0)
    health = state_of(router, "a")
    assert (health["in_flight"], health["consecutive_failures"]) == (0, 1)


async def test_deployment_failing_30_percent_beside_a_healthy_one_gives_no_errors() -> None:
    clock = FakeClock()
    dice = random.Random(99)

    def flaky_script(_call: int) -> Script:
        if dice.random() >= 0.3:
            return Script(chunks=4)
        return dice.choice(
            [
                Script(error=server_error()),
                Script(error=UpstreamError(502, "connection refused", retryable=True)),
                Script(chunks=0, then="fail"),  # a stream dying before its first chunk
            ]
        )

    flaky = ScriptedProvider("flaky", flaky_script)
    healthy = ScriptedProvider("healthy", Script(chunks=4))
    router = build([model("m", dep("flaky"), dep("healthy"))], [flaky, healthy], clock)

    errors: list[UpstreamError] = []

    async def one(i: int) -> None:
        try:
            _, chunks = await call(router, stream=i % 2 == 0)
            assert len(chunks) in (1, 4)
        except UpstreamError as error:
            errors.append(error)

    for batch in range(15):
        await asyncio.gather(*(one(batch * 20 + i) for i in range(20)))
        clock.advance(1)
    assert errors == []
    assert flaky.failures >= 30  # the failures really happened, and were absorbed
    assert flaky.calls + healthy.calls == 300 + flaky.failures


async def test_retry_budget_caps_retries_during_an_outage() -> None:
    clock = FakeClock()
    a = ScriptedProvider("a", Script(error=server_error()))
    b = ScriptedProvider("b", Script(error=server_error()))
    router = build(
        [model("m", dep("a"), dep("b"))],
        [a, b],
        clock,
        breaker={"consecutive_failures": 1000, "min_requests": 1000},
        retry={
            "max_attempts": 3,
            "budget_ratio": 0.2,
            "budget_min_per_s": 1,
            "budget_window_s": 10,
        },
    )
    for _ in range(100):
        with pytest.raises(UpstreamError):
            await call(router)
    # 100 first attempts + a reserve of 1/s * 10 s + 20% of 100 requests; 300 unbudgeted
    assert a.calls + b.calls == 130

    clock.advance(11)  # the window has passed: the budget is back
    before = a.calls + b.calls
    with pytest.raises(UpstreamError):
        await call(router)
    assert a.calls + b.calls - before == 3


# -- health -----------------------------------------------------------------------------


async def test_breaker_opens_on_consecutive_failures() -> None:
    clock = FakeClock()
    provider = ScriptedProvider("a", Script(error=server_error()))
    router = build(
        [model("m", dep("a"))],
        [provider],
        clock,
        breaker={"consecutive_failures": 3},
        retry={"max_attempts": 1},
    )
    for _ in range(3):
        assert state_of(router, "a")["state"] == "closed"
        with pytest.raises(UpstreamError) as caught:
            await call(router)
        assert caught.value.status_code == 503 and caught.value.retryable
    assert state_of(router, "a")["state"] == "open"
    with pytest.raises(UpstreamError) as caught:
        await call(router)
    assert caught.value.type == "service_unavailable"
    assert provider.calls == 3


async def test_breaker_opens_on_failure_rate() -> None:
    clock = FakeClock()
    # ok, fail, ok, fail, ...: never two failures in a row, half of all requests fail
    provider = ScriptedProvider("a", lambda n: Script(error=server_error()) if n % 2 else OK)
    router = build(
        [model("m", dep("a"))],
        [provider],
        clock,
        breaker={"consecutive_failures": 100, "min_requests": 10, "failure_rate": 0.5},
        retry={"max_attempts": 1},
    )
    for i in range(10):
        assert state_of(router, "a")["state"] == "closed", f"opened after {i} requests"
        try:
            await call(router)
        except UpstreamError:
            pass
    health = state_of(router, "a")
    assert health["state"] == "open"


async def test_breaker_stays_closed_below_the_failure_rate() -> None:
    clock = FakeClock()
    provider = ScriptedProvider("a", lambda n: Script(error=server_error()) if n % 3 == 0 else OK)
    router = build(
        [model("m", dep("a"))],
        [provider],
        clock,
        breaker={"min_requests": 10, "failure_rate": 0.5},
        retry={"max_attempts": 1},
    )
    for _ in range(99):
        try:
            await call(router)
        except UpstreamError:
            pass
        clock.advance(0.1)
    health = state_of(router, "a")
    assert health["state"] == "closed"
    assert 0.25 < health["recent_failure_rate"] < 0.4


async def test_half_open_lets_one_probe_through_and_closes_on_success() -> None:
    clock = FakeClock()
    provider = ScriptedProvider("a", Script(error=server_error()))
    router = build(
        [model("m", dep("a"))],
        [provider],
        clock,
        breaker={"consecutive_failures": 1, "open_s": 15, "half_open_probes": 1},
        retry={"max_attempts": 1},
    )
    with pytest.raises(UpstreamError):
        await call(router)
    assert state_of(router, "a")["state"] == "open"
    clock.advance(15)
    assert state_of(router, "a")["state"] == "half_open"

    provider._script = Script(chunks=2)
    probe = await router.forward(router.resolve("m"), "t", make_request(stream=True))
    with pytest.raises(UpstreamError) as caught:  # the probe is in flight: no second one
        await call(router)
    assert caught.value.status_code == 503
    assert provider.calls == 2

    assert probe.response.stream is not None
    assert len([c async for c in probe.response.stream]) == 2
    assert state_of(router, "a")["state"] == "closed"
    await call(router)
    await call(router)
    assert provider.calls == 4


async def test_failed_probe_opens_the_circuit_again() -> None:
    clock = FakeClock()
    provider = ScriptedProvider("a", Script(error=server_error()))
    router = build(
        [model("m", dep("a"))],
        [provider],
        clock,
        breaker={"consecutive_failures": 1, "open_s": 15},
        retry={"max_attempts": 1},
    )
    with pytest.raises(UpstreamError):
        await call(router)
    clock.advance(15)
    with pytest.raises(UpstreamError) as caught:
        await call(router)  # the probe fails
    assert caught.value.status_code == 503 and caught.value.retryable
    health = state_of(router, "a")
    assert (health["state"], health["open_remaining_s"]) == ("open", 15)
    clock.advance(14)
    with pytest.raises(UpstreamError) as caught:
        await call(router)
    assert caught.value.type == "service_unavailable"
    assert provider.calls == 2


async def test_429_cools_the_deployment_down_for_retry_after() -> None:
    clock = FakeClock()
    limited = ScriptedProvider(
        "limited",
        lambda n: (
            Script(error=UpstreamError(429, "slow down", retryable=True, retry_after=5))
            if n == 0
            else OK
        ),
    )
    other = ScriptedProvider("other")
    router = build([model("m", dep("limited"), dep("other"))], [limited, other], clock, seed=5)
    while limited.calls == 0:
        await call(router)
    assert state_of(router, "limited")["cooldown_remaining_s"] == 5
    for _ in range(30):
        forwarded, _ = await call(router)
        assert forwarded.deployment.name == "other"
        clock.advance(0.16)
    assert limited.calls == 1
    assert state_of(router, "limited")["state"] == "closed"  # a 429 is not a failure

    clock.advance(0.3)
    names = {(await call(router))[0].deployment.name for _ in range(30)}
    assert names == {"limited", "other"}


async def test_429_on_the_only_deployment_surfaces_the_429() -> None:
    clock = FakeClock()
    provider = ScriptedProvider(
        "a", Script(error=UpstreamError(429, "slow down", retryable=True, retry_after=2))
    )
    router = build([model("m", dep("a"))], [provider], clock)
    with pytest.raises(UpstreamError) as caught:
        await call(router)
    assert (caught.value.status_code, caught.value.retry_after) == (429, 2)
    assert provider.calls == 1
    with pytest.raises(UpstreamError) as caught:
        await call(router)
    assert (caught.value.status_code, caught.value.retry_after) == (503, 2)


async def test_health_reports_every_deployment() -> None:
    clock = FakeClock()
    router = build(
        [model("m", dep("a", weight=3), dep("b", priority=1))],
        [ScriptedProvider("a", Script(latency=0.2), clock), ScriptedProvider("b")],
        clock,
    )
    await call(router)
    health = {h["name"]: h for h in router.health()}
    assert health["a"]["model"] == "m"
    assert health["a"]["upstream_model"] == "up-a"
    assert health["a"]["state"] == "closed"
    assert health["a"]["healthy"] is True
    assert health["a"]["ewma_latency_s"] == pytest.approx(0.2)
    assert health["a"]["in_flight"] == 0
    assert health["a"]["recent_requests"] == 1
    assert health["a"]["recent_failure_rate"] == 0
    assert health["a"]["cooldown_until"] is None
    assert health["b"]["ewma_latency_s"] is None


async def test_active_health_check_probes_and_feeds_the_breaker() -> None:
    clock = FakeClock()
    good = ScriptedProvider("good")
    bad = ScriptedProvider("bad", Script(error=server_error()))
    router = build(
        [model("m", dep("good"), dep("bad"))],
        [good, bad],
        clock,
        breaker={"consecutive_failures": 2},
    )
    assert await router.check_health(make_request()) == {"good": True, "bad": False}
    assert await router.check_health(make_request()) == {"good": True, "bad": False}
    assert state_of(router, "bad")["state"] == "open"
    assert await router.check_health(make_request()) == {"good": True}  # open: skipped
    assert bad.calls == 2


class RecordingProvider(ScriptedProvider):
    """A scripted provider that also keeps every request it was sent."""

    def __init__(self, name: str, script: Script | Callable[[int], Script] = OK) -> None:
        super().__init__(name, script)
        self.requests: list[ProviderRequest] = []

    async def send(self, request: ProviderRequest) -> ProviderResponse:
        self.requests.append(request)
        return await super().send(request)


async def test_background_health_checks_run_on_their_interval_until_closed() -> None:
    clock = FakeClock()
    chat, embed = RecordingProvider("chat"), RecordingProvider("embed")
    router = build(
        [
            model("m", dep("chat", timeouts={"connect_s": 0.5})),
            model("e", dep("embed"), kind="embedding"),
        ],
        [chat, embed],
        clock,
        health_check_interval_s=0.05,
    )
    router.start_health_checks()
    await asyncio.sleep(0.3)
    await router.aclose()
    probes = chat.calls
    assert 3 <= probes <= 8 and embed.calls == probes
    await asyncio.sleep(0.15)
    assert chat.calls == probes, "probes went on after aclose()"
    # One-token probes, shaped for each deployment's kind; no traffic was needed.
    request = chat.requests[0]
    assert (request.endpoint, request.model) == ("chat.completions", "up-chat")
    assert not request.stream
    assert request.body["max_tokens"] == 1 and request.body["messages"][0]["role"] == "user"
    assert request.connect_timeout_s == 0.5
    assert embed.requests[0].endpoint == "embeddings" and "input" in embed.requests[0].body
    assert state_of(router, "chat")["recent_requests"] == probes


async def test_health_checks_are_off_without_an_interval() -> None:
    provider = ScriptedProvider("a")
    router = build([model("m", dep("a"))], [provider], FakeClock())
    router.start_health_checks()
    await asyncio.sleep(0.05)
    await router.aclose()
    assert provider.calls == 0


async def test_health_checks_outlive_a_probe_that_cannot_be_built() -> None:
    provider = ScriptedProvider("a")
    router = build([model("m", dep("a"))], [provider], FakeClock(), health_check_interval_s=0.02)
    built = 0

    def flaky_probe(deployment: Deployment) -> ProviderRequest:
        nonlocal built
        built += 1
        if built == 1:
            raise RuntimeError("a bug in building the probe")
        return make_request()(deployment)

    router.start_health_checks(flaky_probe)
    await asyncio.sleep(0.15)
    await router.aclose()
    assert built >= 3 and provider.calls == built - 1


# -- timeouts and cancellation ----------------------------------------------------------


def quick(**timeouts: float) -> dict[str, Any]:
    return {"timeouts": {"ttft_s": 5, "idle_s": 5, "total_s": 5, **timeouts}}


async def test_ttft_timeout_cancels_the_call_and_tries_another_deployment() -> None:
    clock = FakeClock()
    hanging = ScriptedProvider("hang", Script(hang=True))
    silent_stream = ScriptedProvider("silent", Script(chunks=0, then="hang"))
    good = ScriptedProvider("good", Script(chunks=2))
    router = build(
        [
            model(
                "m",
                dep("hang", priority=0, **quick(ttft_s=0.05)),
                dep("silent", priority=1, **quick(ttft_s=0.05)),
                dep("good", priority=2),
            )
        ],
        [hanging, silent_stream, good],
        clock,
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    forwarded, chunks = await call(router, stream=True)
    assert loop.time() - started < 1
    assert forwarded.tried == ["hang", "silent", "good"]
    assert len(chunks) == 2
    assert (hanging.cancelled, silent_stream.cancelled) == (1, 1)
    assert state_of(router, "hang")["consecutive_failures"] == 1
    assert all(d.in_flight == 0 for d in router.deployments())


async def test_idle_timeout_mid_stream_cancels_upstream_and_is_not_retried() -> None:
    clock = FakeClock()
    stalling = ScriptedProvider("stall", Script(chunks=1, then="hang"))
    good = ScriptedProvider("good", Script(chunks=2))
    router = build(
        [model("m", dep("stall", **quick(idle_s=0.05)), dep("good", priority=1))],
        [stalling, good],
        clock,
    )
    forwarded = await router.forward(router.resolve("m"), "t", make_request(stream=True))
    stream = forwarded.response.stream
    assert stream is not None
    assert (await anext(stream))["served_by"] == "stall"
    with pytest.raises(UpstreamError) as caught:
        await anext(stream)
    error = caught.value
    assert (error.status_code, error.retryable) == (504, False)
    assert "mid-stream" in error.message
    assert stalling.cancelled == 1
    assert good.calls == 0
    health = state_of(router, "stall")
    assert (health["in_flight"], health["consecutive_failures"]) == (0, 1)


async def test_idle_timeout_counts_only_time_waiting_on_the_upstream() -> None:
    clock = FakeClock()
    steady = ScriptedProvider("steady", Script(chunks=12, chunk_delay=0.03))
    instant = ScriptedProvider("instant", Script(chunks=3))
    router = build(
        [
            model("steady", dep("steady", **quick(idle_s=0.05))),
            model("instant", dep("instant", **quick(idle_s=0.05))),
        ],
        [steady, instant],
        clock,
    )
    # chunks every 0.03 s for 0.33 s in all: each gap is under the idle limit
    _, chunks = await call(router, "steady", stream=True)
    assert len(chunks) == 12

    # a slow reader (0.1 s per chunk) is not an idle upstream
    forwarded = await router.forward(router.resolve("instant"), "t", make_request(stream=True))
    assert forwarded.response.stream is not None
    received = 0
    async for _ in forwarded.response.stream:
        received += 1
        await asyncio.sleep(0.1)
    assert received == 3
    assert steady.cancelled + instant.cancelled == 0
    assert {h["consecutive_failures"] for h in router.health()} == {0}


async def test_total_timeout_ends_a_stream_that_never_finishes() -> None:
    clock = FakeClock()
    endless = ScriptedProvider("endless", Script(chunks=1, then="drip", chunk_delay=0.01))
    router = build([model("m", dep("endless", **quick(idle_s=1, total_s=0.15)))], [endless], clock)
    loop = asyncio.get_running_loop()
    started = loop.time()
    forwarded = await router.forward(router.resolve("m"), "t", make_request(stream=True))
    assert forwarded.response.stream is not None
    received = 0
    with pytest.raises(UpstreamError) as caught:
        async for _ in forwarded.response.stream:
            received += 1
    elapsed = loop.time() - started
    assert 0.14 <= elapsed < 0.5
    assert received > 3
    assert (caught.value.status_code, caught.value.retryable) == (504, False)
    assert "total timeout" in caught.value.message
    assert endless.cancelled == 1


async def test_total_timeout_bounds_a_non_streaming_call() -> None:
    clock = FakeClock()
    hanging = ScriptedProvider("hang", Script(hang=True))
    good = ScriptedProvider("good")
    router = build(
        [model("m", dep("hang", **quick(total_s=0.05)), dep("good", priority=1))],
        [hanging, good],
        clock,
    )
    with pytest.raises(UpstreamError) as caught:
        await call(router)
    assert (caught.value.status_code, caught.value.retryable) == (504, False)
    assert hanging.cancelled == 1
    assert good.calls == 0  # the request's whole time is spent: no retry


async def test_aclose_of_the_stream_closes_the_upstream_at_once() -> None:
    clock = FakeClock()
    provider = ScriptedProvider("a", Script(chunks=100, chunk_delay=0.01))
    router = build([model("m", dep("a"))], [provider], clock)
    forwarded = await router.forward(router.resolve("m"), "t", make_request(stream=True))
    stream = forwarded.response.stream
    assert stream is not None
    await anext(stream)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert provider.closed == 1
    health = state_of(router, "a")
    assert (health["in_flight"], health["consecutive_failures"]) == (0, 0)
    assert [c async for c in stream] == []


async def test_client_disconnect_cancels_the_upstream_at_once() -> None:
    clock = FakeClock()
    provider = ScriptedProvider("a", Script(chunks=100, chunk_delay=0.05))
    router = build([model("m", dep("a"))], [provider], clock)
    got_first = asyncio.Event()

    async def client() -> None:
        forwarded = await router.forward(router.resolve("m"), "t", make_request(stream=True))
        assert forwarded.response.stream is not None
        async for _ in forwarded.response.stream:
            got_first.set()

    task = asyncio.ensure_future(client())
    await got_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert provider.cancelled == 1
    health = state_of(router, "a")
    assert (health["in_flight"], health["state"], health["consecutive_failures"]) == (
        0,
        "closed",
        0,
    )


async def test_client_leaving_before_the_first_chunk_cancels_the_upstream() -> None:
    clock = FakeClock()
    provider = ScriptedProvider("a", Script(hang=True))
    router = build([model("m", dep("a"))], [provider], clock)
    task = asyncio.ensure_future(call(router))
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert provider.cancelled == 1
    assert provider.calls == 1
    assert state_of(router, "a")["in_flight"] == 0
