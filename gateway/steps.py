"""What one request is, step by step: the values the relay's steps hand each other.

`Authenticated` → `Routed` → `Priced` → `Admitted` (the steps a refusal can stop at:
`Step`), then `Served` (the router's answer, as the record reads it) → `Outcome` (how the
request ended) → its `UsageRecord`, and the `Bill` an answer's cost headers and a dialect's
usage object are made of. Each is frozen: a step reads what it was handed and hands on a
new value. `gateway.relay` runs the steps; `gateway.dialects` reads these values at the
edges of the APIs it translates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from billing.money import format_amount
from billing.pricing import Quote
from billing.quota import Admission
from billing.record import UsageRecord
from billing.usage import Usage
from gateway.auth import ApiKey, Tenant
from gateway.routing import Deployment
from providers.base import Endpoint, TokenUsage

__all__ = ["Admitted", "Authenticated", "Bill", "Outcome", "Priced", "Routed", "Served", "Step"]


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Step 1: who asks, at which endpoint (`api` names it in the ledger), since when."""

    request_id: str
    key: ApiKey
    tenant: Tenant
    endpoint: Endpoint
    api: str
    started: datetime
    t0: float  # perf_counter at the start, for the duration

    @property
    def who(self) -> Authenticated:
        return self


@dataclass(frozen=True, slots=True)
class Routed:
    """Step 2: the (public) model the request routes to."""

    who: Authenticated
    model: str


@dataclass(frozen=True, slots=True)
class Priced:
    """Step 3: the model it routes to, the prompt counted, the price quoted."""

    who: Authenticated
    model: str
    stream: bool
    prompt_tokens: int
    quote: Quote


@dataclass(frozen=True, slots=True)
class Admitted:
    """Step 4: the quota store's reservation for a priced request."""

    priced: Priced
    admission: Admission

    @property
    def who(self) -> Authenticated:
        return self.priced.who

    @property
    def request_id(self) -> str:
        return self.priced.who.request_id

    @property
    def started(self) -> datetime:
        return self.priced.who.started

    @property
    def tenant(self) -> Tenant:
        return self.priced.who.tenant

    @property
    def prompt_tokens(self) -> int:
        return self.priced.prompt_tokens


Step = Authenticated | Routed | Priced | Admitted
"""How far a request got: what its record is built from."""


@dataclass(frozen=True, slots=True)
class Served:
    """Step 5, as the record reads it: the deployment that served the request (or was
    tried last), after how many attempts, its time to first byte and the upstream time."""

    deployment: Deployment | None = None
    attempts: int = 0
    ttft_s: float | None = None
    upstream_s: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """Step 6: how the request ended: the tokens to bill, its status and who cut it."""

    usage: Usage
    status_code: int = 200
    error_type: str | None = None
    cut_by: str | None = None  # None, "client", "upstream" or "gateway"


@dataclass(frozen=True, slots=True)
class Bill:
    """What a request was charged (its ledger row) and the usage its upstream reported:
    what the answer's cost headers and a dialect's usage object are made of."""

    record: UsageRecord
    reported: TokenUsage | None = None

    def cost_object(self) -> dict[str, str]:
        rec = self.record
        return {
            "cost": format_amount(rec.cost_nanos),
            "currency": rec.currency,
            "price_version": rec.price_version,
        }

    def headers(self) -> dict[str, str]:
        rec = self.record
        return {
            "x-maas-cost": format_amount(rec.cost_nanos),
            "x-maas-currency": rec.currency,
            "x-maas-prompt-tokens": str(rec.usage.input),
            "x-maas-cached-tokens": str(rec.usage.cached_input),
            "x-maas-completion-tokens": str(rec.usage.output),
            "x-maas-price-version": rec.price_version,
        }
