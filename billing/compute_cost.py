"""What serving tokens costs the operator: compute cost per deployment, versioned like prices.

Each deployment ("<provider>/<model>", see `gateway.routing.DeploymentConfig`) may have cost
versions with effective dates; the version in force at a request's start applies. A version
is one of:

- **hardware** (for simulated backends): accelerators rented at `price_per_hour` each,
  `count` of them. The backend's latency and capacity model (`providers.simulated`) says how
  long a token holds one of its `capacity` slots at a full batch: an input token
  `prefill_ms_per_token`, an output token `itl_ms * slowdown_at_capacity`. A slot-second
  costs ``price_per_hour * count / 3600 / capacity``, so a token costs its slot-seconds at
  that price: this is the cost per token *at capacity* (every slot busy). A cached prompt
  token costs `cached_input_factor` of an uncached one. Tokens are charged at this rate;
  the provisioned accelerator-hours not covered by served tokens are **idle capacity**
  (`provisioned_nanos` minus the compute cost of the period's requests), so the cost per
  million tokens at the *measured* utilisation is the at-capacity rate divided by it.
  `fleet_share` scales a fleet down to a simulation's traffic: a month of a few tens of
  thousands of requests stands for that share of the fleet's real traffic, so provisioned
  cost (and capacity) is multiplied by it while the cost per token is not.
- **wholesale** (for real upstreams): the price per million tokens the operator pays.

Per-token rates become integer nano-units through `billing.money.price_per_token_nanos`
(rule 1, rounded once); a request's compute cost is integer arithmetic (rule 2); a period's
provisioned cost is the hourly cost scaled by its length with `billing.money.apply_multiplier`
(rounded once, half-up). Compute costs are in the pricing currency.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from billing.money import apply_multiplier, price_per_token_nanos, to_nanos
from billing.usage import Usage

__all__ = [
    "ComputeCostConfig",
    "ComputeCostError",
    "ComputeCosts",
    "CostRate",
    "CostVersion",
    "HardwareProfile",
    "LatencyModel",
    "WholesalePrice",
]

_MS_PER_HOUR = Decimal(3_600_000)
_TOKENS_PER_MILLION = Decimal(1_000_000)


class ComputeCostError(ValueError):
    """The compute cost configuration is wrong; the message names the field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HardwareProfile(_Strict):
    """Accelerators behind a simulated backend: what they cost and how many there are."""

    accelerator: str = Field(default="accelerator", description="a label, e.g. 'H100 80GB'")
    price_per_hour: Decimal = Field(ge=0, description="per accelerator, pricing currency")
    count: int = Field(default=1, ge=1)
    fleet_share: Decimal = Field(
        default=Decimal(1),
        gt=0,
        le=1,
        description="the share of this fleet a scaled-down simulation's traffic stands for",
    )
    cached_input_factor: Decimal = Field(
        default=Decimal("0.1"), ge=0, le=1, description="a cached prompt token's share of cost"
    )

    @property
    def hourly_cost(self) -> Decimal:
        return self.price_per_hour * self.count


class WholesalePrice(_Strict):
    """What a real upstream charges the operator, per million tokens."""

    input: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    output: Decimal = Field(ge=0)


class CostVersion(_Strict):
    """A deployment's cost from `effective_from` until its next version."""

    effective_from: datetime
    hardware: HardwareProfile | None = None
    wholesale: WholesalePrice | None = None

    @field_validator("effective_from", mode="before")
    @classmethod
    def _date_means_midnight_utc(cls, value: Any) -> Any:
        if isinstance(value, str) and len(value) == 10:
            value = date.fromisoformat(value)
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime(value.year, value.month, value.day, tzinfo=UTC)
        return value

    @field_validator("effective_from")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.hardware is None) == (self.wholesale is None):
            raise ValueError("give exactly one of 'hardware' or 'wholesale'")
        return self


class ComputeCostConfig(_Strict):
    """The `compute_costs:` section: cost versions per deployment name."""

    deployments: dict[str, list[CostVersion]] = {}

    @field_validator("deployments")
    @classmethod
    def _ordered_versions(cls, value: dict[str, list[CostVersion]]) -> dict[str, list[CostVersion]]:
        checked = {}
        for name, versions in value.items():
            if not versions:
                raise ValueError(f"{name}: at least one cost version is required")
            ordered = sorted(versions, key=lambda v: v.effective_from)
            for earlier, later in itertools.pairwise(ordered):
                if earlier.effective_from == later.effective_from:
                    raise ValueError(
                        f"{name}: two cost versions take effect at"
                        f" {later.effective_from.isoformat()}"
                    )
            checked[name] = ordered
        return checked


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """The part of a simulated backend's model that sets its throughput (see the module doc)."""

    capacity: int
    prefill_ms_per_token: float
    itl_ms: float
    slowdown_at_capacity: float
    ttft_overhead_ms: float = 0.0

    @classmethod
    def of(cls, config: Any) -> LatencyModel:
        """From a `providers.simulated.SimulatedConfig` (or anything with its fields)."""
        return cls(
            capacity=int(config.capacity),
            prefill_ms_per_token=float(config.prefill_ms_per_token),
            itl_ms=float(config.itl_ms),
            slowdown_at_capacity=float(config.slowdown_at_capacity),
            ttft_overhead_ms=float(config.ttft_overhead_ms),
        )

    @property
    def output_slot_ms(self) -> Decimal:
        """Slot time of one output token at a full batch, in milliseconds."""
        return Decimal(str(self.itl_ms)) * Decimal(str(self.slowdown_at_capacity))

    @property
    def input_slot_ms(self) -> Decimal:
        return Decimal(str(self.prefill_ms_per_token))


@dataclass(frozen=True, slots=True)
class CostRate:
    """The compute cost of one deployment under one cost version, nano-units per token."""

    deployment: str
    version: str
    kind: Literal["hardware", "wholesale"]
    input_nanos: int
    cached_nanos: int
    output_nanos: int
    input_per_million: Decimal  # before rounding, for reports
    output_per_million: Decimal
    hourly_cost_nanos: int  # provisioned cost per hour (x fleet_share); 0 for wholesale
    accelerator: str = ""
    count: int = 0
    fleet_share: Decimal = Decimal(1)

    def cost(self, usage: Usage) -> int:
        """Rule 2: the compute cost of this usage, in nano-units (exact)."""
        return (
            usage.uncached_input * self.input_nanos
            + usage.cached_input * self.cached_nanos
            + usage.output * self.output_nanos
        )


def hardware_rate(deployment: str, version: CostVersion, latency: LatencyModel) -> CostRate:
    """Cost per token at capacity, from the hardware profile and the latency model."""
    hw = version.hardware
    assert hw is not None
    slot_ms_price = hw.hourly_cost / _MS_PER_HOUR / latency.capacity  # currency per slot-ms
    input_pm = slot_ms_price * latency.input_slot_ms * _TOKENS_PER_MILLION
    output_pm = slot_ms_price * latency.output_slot_ms * _TOKENS_PER_MILLION
    return CostRate(
        deployment=deployment,
        version=f"{deployment}@{_stamp(version)};hardware={hw.count}x{hw.accelerator}",
        kind="hardware",
        input_nanos=price_per_token_nanos(input_pm),
        cached_nanos=price_per_token_nanos(input_pm * hw.cached_input_factor),
        output_nanos=price_per_token_nanos(output_pm),
        input_per_million=input_pm,
        output_per_million=output_pm,
        hourly_cost_nanos=apply_multiplier(to_nanos(hw.hourly_cost), hw.fleet_share),
        accelerator=hw.accelerator,
        count=hw.count,
        fleet_share=hw.fleet_share,
    )


def wholesale_rate(deployment: str, version: CostVersion) -> CostRate:
    price = version.wholesale
    assert price is not None
    cached = price.input if price.cached_input is None else price.cached_input
    return CostRate(
        deployment=deployment,
        version=f"{deployment}@{_stamp(version)};wholesale",
        kind="wholesale",
        input_nanos=price_per_token_nanos(price.input),
        cached_nanos=price_per_token_nanos(cached),
        output_nanos=price_per_token_nanos(price.output),
        input_per_million=price.input,
        output_per_million=price.output,
        hourly_cost_nanos=0,
    )


def _stamp(version: CostVersion) -> str:
    return version.effective_from.strftime("%Y-%m-%dT%H:%MZ")


@dataclass(frozen=True, slots=True)
class _Line:
    starts: tuple[datetime, ...]
    rates: tuple[CostRate, ...]

    def at(self, moment: datetime) -> CostRate | None:
        index = bisect_right(self.starts, moment) - 1
        return self.rates[index] if index >= 0 else None


class ComputeCosts:
    """Compute cost rates, answering `cost_nanos()` on the request path.

    `deployments` maps every served deployment name to its provider's simulated latency
    model, or to None for a real upstream. Construction checks the configuration against
    them: every named deployment exists, and hardware profiles name simulated ones.
    """

    def __init__(
        self, config: ComputeCostConfig, deployments: Mapping[str, LatencyModel | None]
    ) -> None:
        self.config = config
        self.latency = dict(deployments)
        lines: dict[str, _Line] = {}
        for name, versions in config.deployments.items():
            if name not in deployments:
                known = ", ".join(sorted(deployments)) or "none"
                raise ComputeCostError(
                    f"compute_costs.deployments.{name}: unknown deployment (known: {known})"
                )
            rates = []
            for index, version in enumerate(versions):
                if version.hardware is not None:
                    latency = deployments[name]
                    if latency is None:
                        raise ComputeCostError(
                            f"compute_costs.deployments.{name}[{index}].hardware: only a"
                            " simulated deployment has a latency model; give 'wholesale'"
                        )
                    rates.append(hardware_rate(name, version, latency))
                else:
                    rates.append(wholesale_rate(name, version))
            lines[name] = _Line(tuple(v.effective_from for v in versions), tuple(rates))
        self._lines = lines

    @property
    def deployments(self) -> frozenset[str]:
        """Deployments with a compute cost configured."""
        return frozenset(self._lines)

    @property
    def hardware_deployments(self) -> frozenset[str]:
        """Deployments with a hardware cost version: the ones that provision capacity."""
        return frozenset(
            name
            for name, line in self._lines.items()
            if any(rate.kind == "hardware" for rate in line.rates)
        )

    def rate(self, deployment: str, at: datetime) -> CostRate | None:
        """The cost rate in force for `deployment` at `at`, if any."""
        line = self._lines.get(deployment)
        if line is None:
            return None
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return line.at(at)

    def cost_nanos(self, deployment: str, usage: Usage, at: datetime) -> int:
        """The compute cost of `usage` served by `deployment` for a request started at `at`."""
        line = self._lines.get(deployment)
        if line is None:
            return 0
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        rate = line.at(at)
        return rate.cost(usage) if rate is not None else 0

    def provisioned_nanos(self, deployment: str, start: datetime, end: datetime) -> int:
        """What the deployment's accelerators cost over [start, end), whether busy or idle.

        Each hardware version's hours in the period times its hourly cost, rounded once,
        half-up, per version; wholesale versions provision nothing.
        """
        line = self._lines.get(deployment)
        if line is None or end <= start:
            return 0
        total = 0
        bounds = [*line.starts[1:], None]
        for begin, until, rate in zip(line.starts, bounds, line.rates, strict=True):
            lo = max(begin, start)
            hi = end if until is None else min(until, end)
            if hi <= lo or rate.hourly_cost_nanos == 0:
                continue
            seconds = Decimal((hi - lo).total_seconds())
            total += apply_multiplier(rate.hourly_cost_nanos, seconds / Decimal(3600))
        return total


class _ProviderSpec(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...


class _DeploymentSpec(Protocol):
    @property
    def provider(self) -> str: ...
    @property
    def resolved_name(self) -> str: ...


class _ModelSpec(Protocol):
    @property
    def deployments(self) -> Sequence[_DeploymentSpec]: ...


class FleetSpec(Protocol):
    """What `build_compute_costs` reads of the gateway's settings (`gateway.config.Settings`)."""

    @property
    def compute_costs(self) -> ComputeCostConfig: ...
    @property
    def providers(self) -> Sequence[_ProviderSpec]: ...
    @property
    def models(self) -> Sequence[_ModelSpec]: ...


def build_compute_costs(settings: FleetSpec) -> ComputeCosts:
    """Compute cost rates for every deployment; simulated ones bring their latency model."""
    simulated = {p.name: p for p in settings.providers if p.type == "simulated"}
    deployments: dict[str, LatencyModel | None] = {}
    for model in settings.models:
        for d in model.deployments:
            sim = simulated.get(d.provider)
            deployments[d.resolved_name] = LatencyModel.of(sim) if sim is not None else None
    return ComputeCosts(settings.compute_costs, deployments)
