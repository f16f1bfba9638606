"""Drive a synthetic month through the real gateway on a compressed clock.

The gateway runs in this process exactly as `maas-gateway serve` runs it (the Litestar app
under uvicorn, on a loopback socket), with these changes for the simulation:

- **Clock.** Each request carries its simulated start time in the
  `x-maas-simulated-time` header (epoch microseconds). A thin ASGI wrapper, used only
  here, puts it in a context variable that the gateway's injected `clock` reads, so
  pricing versions, off-peak windows, quota windows and ledger times all follow the
  simulated month.
- **Capacity.** With the scenario's `capacity.on_saturation: refuse`, each simulated
  backend asks a `FleetGate` (`economics.capacity`) whether its queue on the
  simulated clock has room, and requests are sent one at a time so that the answer does not
  depend on timing; with `queue` (the default) nothing changes here and the margin report
  models the queue.
- **Backends.** Simulated providers run with `time_scale: 0` (no sleeping), and their
  output length is left to the request: each request asks for the output length its
  tenant's profile drew (`max_tokens`) and the backend says exactly that much. Streams
  carry at least 32 tokens per chunk.
- **Storage.** The ledger is an SQLite file in the run's directory; quotas are in-process.

Requests are sent in start-time order with at most `concurrency` in flight, and one
tenant's requests one after the other, so each tenant's quota decisions see its requests
in order and the same seed gives the same ledger sums and invoices.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from economics.capacity import FleetGate, fleet_queues
from economics.scenario import Scenario
from economics.traffic import PlannedRequest, plan_month, prompt_text
from gateway.app import Gateway, create_app
from gateway.auth import hash_key
from gateway.config import Settings, deep_merge

__all__ = ["SIMULATED_TIME_HEADER", "RunResult", "run_month", "run_settings", "tenant_secret"]

log = logging.getLogger("maas.economics")

SIMULATED_TIME_HEADER = "x-maas-simulated-time"
_HEADER_BYTES = SIMULATED_TIME_HEADER.encode()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_CHUNK_TOKENS = 32
_UNLIMITED_OUTPUT = 1_000_000

_simulated_now: contextvars.ContextVar[datetime | None] = contextvars.ContextVar(
    "maas_simulated_now", default=None
)

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def simulated_clock() -> datetime:
    """The current request's simulated start time (wall-clock time outside a request)."""
    return _simulated_now.get() or datetime.now(UTC)


def with_simulated_clock(app: ASGIApp) -> ASGIApp:
    """Wrap an ASGI app so each HTTP request runs at the time its header names."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == _HEADER_BYTES:
                    moment = _EPOCH + timedelta(microseconds=int(value))
                    token = _simulated_now.set(moment)
                    try:
                        await app(scope, receive, send)
                    finally:
                        _simulated_now.reset(token)
                    return
        await app(scope, receive, send)

    return wrapped


def tenant_secret(scenario: Scenario, tenant_id: str) -> str:
    """The API key the simulator uses for a tenant (derived from the seed, never stored)."""
    digest = hashlib.sha256(f"{scenario.name}:{scenario.seed}:{tenant_id}".encode()).hexdigest()
    return f"sk-sim-{digest[:40]}"


def run_settings(scenario: Scenario, workdir: Path, tokenizer_dir: Path | None = None) -> Settings:
    """The scenario's gateway configuration as the simulation runs it (see the module doc)."""
    data = deep_merge(scenario.gateway, {})
    providers = []
    for provider in data.get("providers", []):
        if provider.get("type") == "simulated":
            provider = deep_merge(
                provider,
                {
                    "time_scale": 0,
                    "chunk_tokens": max(int(provider.get("chunk_tokens", 1)), _MIN_CHUNK_TOKENS),
                    "output": {
                        "distribution": "fixed",
                        "mean": _UNLIMITED_OUTPUT,
                        "sd": 0,
                        "min": 1,
                        "max": _UNLIMITED_OUTPUT,
                    },
                },
            )
        providers.append(provider)
    data["providers"] = providers
    data["ledger"] = {
        "url": f"sqlite+aiosqlite:///{workdir / 'ledger.db'}",
        "url_env": None,
        "journal_dir": str(workdir / "ledger.journal"),
        "batch_size": 5000,
        "flush_interval_ms": 250,
    }
    data["quotas"] = {**data.get("quotas", {}), "backend": "memory"}
    data["demo_key_env"] = None
    if tokenizer_dir is not None:
        data["tokenizers"] = {**data.get("tokenizers", {}), "dir": str(tokenizer_dir)}
    tenants = []
    for tenant in data.get("tenants", []):
        secret = tenant_secret(scenario, tenant["id"])
        key = {"id": f"{tenant['id']}-simulator", "hash": hash_key(secret)}
        tenants.append({**tenant, "keys": [*tenant.get("keys", []), key]})
    data["tenants"] = tenants
    from gateway.config import parse_settings

    return parse_settings(data, f"scenario {scenario.name!r} gateway")


@dataclass(slots=True)
class RunResult:
    """What a run did: where its ledger is, and what the clients saw."""

    scenario: Scenario
    settings: Settings
    workdir: Path
    planned: int
    elapsed_s: float
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def ledger_path(self) -> Path:
        return self.workdir / "ledger.db"


async def run_month(
    scenario: Scenario,
    workdir: Path,
    *,
    tokenizer_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Send the scenario's month through a gateway on a loopback socket; returns when every
    request is in the ledger. `workdir` must not hold a ledger from an earlier run."""
    _fresh(workdir)
    settings = run_settings(scenario, workdir, tokenizer_dir)
    zones = {t.id: t.timezone for t in settings.tenants}
    plan = plan_month(scenario, zones)
    gateway = Gateway(settings, clock=simulated_clock)
    app = with_simulated_clock(create_app(settings, gateway=gateway))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
    )
    started = time.perf_counter()
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()
                raise RuntimeError("the gateway stopped while starting")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        gate = _install_gate(scenario, settings, gateway)
        # Refusals depend on the order requests reach a backend: one at a time, in order.
        concurrency = 1 if gate is not None else scenario.concurrency
        statuses = await _send_all(
            scenario, plan, f"http://127.0.0.1:{port}", concurrency, progress
        )
    finally:
        server.should_exit = True
        await serving  # the lifespan closes the gateway, flushing the ledger
    elapsed = time.perf_counter() - started
    return RunResult(scenario, settings, workdir, len(plan), elapsed, statuses)


def _install_gate(scenario: Scenario, settings: Settings, gateway: Gateway) -> FleetGate | None:
    """With `capacity.on_saturation: refuse`, let the simulated backends refuse on the
    simulated clock (`economics.capacity`); with `queue` nothing is refused."""
    if scenario.capacity.on_saturation != "refuse":
        return None
    names = {(d.provider, d.model): d.resolved_name for m in settings.models for d in m.deployments}
    gate = FleetGate(fleet_queues(gateway.compute_costs), names, scenario.capacity, simulated_clock)
    for provider in gateway.simulated.values():
        provider.admission = gate.admit
    return gate


def _fresh(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "ledger.db").exists():
        raise FileExistsError(f"{workdir / 'ledger.db'} exists: use a fresh directory")


async def _send_all(
    scenario: Scenario,
    plan: list[PlannedRequest],
    base_url: str,
    concurrency: int,
    progress: Callable[[int, int], None] | None,
) -> Counter[int]:
    secrets = {t: tenant_secret(scenario, t) for t in scenario.tenants}
    statuses: Counter[int] = Counter()
    slots = asyncio.Semaphore(concurrency)
    previous: dict[str, asyncio.Task[None]] = {}
    done = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as client:

        async def send(request: PlannedRequest, before: asyncio.Task[None] | None) -> None:
            nonlocal done
            try:
                if before is not None:
                    await before
                statuses[await _send(client, secrets[request.tenant_id], request)] += 1
            except Exception:  # counted as status 0; the month goes on
                log.exception("request %d of %s failed", request.index, request.tenant_id)
                statuses[0] += 1
            finally:
                slots.release()
                done += 1
                if progress is not None and done % 1000 == 0:
                    progress(done, len(plan))

        for request in plan:
            await slots.acquire()
            task = asyncio.create_task(send(request, previous.get(request.tenant_id)))
            previous[request.tenant_id] = task
        # Each task awaits the one before it of its tenant: the last ones finish last.
        await asyncio.gather(*previous.values())
    return statuses


async def _send(client: httpx.AsyncClient, secret: str, request: PlannedRequest) -> int:
    at = int((request.at - _EPOCH) / timedelta(microseconds=1))
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [
            {"role": "user", "content": prompt_text(request.prompt_tokens, request.index)}
        ],
        "max_tokens": request.max_tokens,
    }
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    headers = {"authorization": f"Bearer {secret}", SIMULATED_TIME_HEADER: str(at)}
    if not request.stream:
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        return response.status_code
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        async for _ in response.aiter_raw():
            pass
        return response.status_code
