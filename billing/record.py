"""The usage record: what the request path hands to the ledger, once per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from billing.usage import Usage

#: The `error_type` of a request closed by the crash policy: the gateway process died (or
#: stopped) while the request was in flight, so its real outcome was never recorded.
GATEWAY_DIED = "gateway_died"
#: The `status_code` such a request is recorded with.
GATEWAY_DIED_STATUS = 500


@dataclass(slots=True)
class UsageRecord:
    """One request's metered outcome, successful or not.

    Costs are integer nano-units (see `billing.money`). `price_version` names the
    price in force when the request started; the unit prices are the ones applied
    (nano-units per token). `list_cost_nanos` is the same usage at list price, so an
    invoice can show a plan discount as its own line.
    """

    request_id: str
    started_at: datetime  # timezone-aware, UTC
    tenant_id: str
    key_id: str
    model: str  # the public model name the caller asked for (after alias resolution)
    endpoint: str
    provider: str = ""
    deployment: str = ""
    usage: Usage = field(default_factory=Usage)
    currency: str = "USD"
    price_version: str = ""
    unit_price_input_nanos: int = 0
    unit_price_cached_nanos: int = 0
    unit_price_output_nanos: int = 0
    list_unit_price_input_nanos: int | None = None
    list_unit_price_cached_nanos: int | None = None
    list_unit_price_output_nanos: int | None = None
    cost_nanos: int = 0
    list_cost_nanos: int = 0
    compute_cost_nanos: int = 0
    status_code: int = 200
    error_type: str | None = None
    stream: bool = False
    stream_cut_by: str | None = None  # None, "client", "upstream" or "gateway"
    attempts: int = 1
    ttft_ms: float | None = None
    duration_ms: float = 0.0
