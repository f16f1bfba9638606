"""Scenario files: a gateway configuration, a month, tenants' traffic profiles, and variants.

A scenario is one YAML file (documented in `docs/economics.md`, examples in
`examples/scenarios/`). `gateway` is an ordinary gateway configuration (the file
`maas-gateway serve` reads) written inline, or `gateway_config` names one relative to the
scenario file. `tenants` gives each tenant of that configuration a traffic profile.
`variants` are named changes for what-if comparisons: each deep-merges its `gateway` into
the configuration (mappings merge, lists are replaced) and may replace top-level settings
such as `requests`. `months`, `trends` and `events` make it a projection over several
months (`economics.projection`); `capacity` says what a saturated deployment does
(`economics.capacity`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from economics.capacity import CapacityConfig
from gateway.config import (
    ConfigError,
    Settings,
    deep_merge,
    describe_errors,
    parse_settings,
    read_yaml_mapping,
)
from providers.lengths import Distribution

__all__ = [
    "DIURNAL_SHAPES",
    "Event",
    "Growth",
    "LengthDistribution",
    "Scenario",
    "ScenarioError",
    "TenantProfile",
    "Trends",
    "Variant",
    "load_scenario",
]

#: Named daily shapes: relative request rates for local hours 0..23.
DIURNAL_SHAPES: dict[str, tuple[float, ...]] = {
    "flat": (1.0,) * 24,
    "business": (
        0.15, 0.1, 0.08, 0.08, 0.1, 0.2, 0.4, 0.8, 1.4, 1.9, 2.0, 1.9,
        1.6, 1.8, 2.0, 1.9, 1.7, 1.3, 0.9, 0.6, 0.45, 0.35, 0.25, 0.2,
    ),
    "evening": (
        0.5, 0.35, 0.25, 0.2, 0.2, 0.25, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1,
        1.1, 1.1, 1.0, 1.0, 1.1, 1.3, 1.6, 1.9, 2.1, 2.0, 1.5, 0.9,
    ),
    "batch-night": (
        2.2, 2.4, 2.4, 2.3, 2.0, 1.4, 0.8, 0.5, 0.4, 0.4, 0.4, 0.4,
        0.4, 0.4, 0.4, 0.4, 0.4, 0.5, 0.6, 0.8, 1.0, 1.3, 1.7, 2.0,
    ),
}  # fmt: skip


class ScenarioError(ValueError):
    """The scenario file is missing or invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LengthDistribution(_Strict):
    """A token count per request: lognormal or normal (`mean`, `sd`), fixed (`mean`), or
    uniform: over [`min`, `max`], or over `mean` +- sqrt(3) x `sd` when `mean` is given."""

    distribution: Distribution = "lognormal"
    mean: float | None = Field(default=None, gt=0)
    sd: float = Field(default=0, ge=0)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=8192, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> LengthDistribution:
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        if self.mean is None and self.distribution != "uniform":
            raise ValueError(f"a {self.distribution} distribution needs a 'mean'")
        return self


class Growth(_Strict):
    """Compound growth: usage multiplies by `factor` every `months` months (30-day months)."""

    factor: float = Field(default=1.0, gt=0)
    months: float = Field(default=1.0, gt=0)

    def daily_rate(self) -> float:
        return float(self.factor ** (1 / (30 * self.months)))


class TenantProfile(_Strict):
    """How one tenant uses the gateway over the month."""

    share: float = Field(gt=0, description="share of the scenario's requests (normalised)")
    models: dict[str, float] = Field(min_length=1, description="model -> share of requests")
    diurnal: str | list[float] = Field(
        default="business", description="a named shape or 24 weights for local hours 0..23"
    )
    weekly: list[float] = Field(
        default=[1, 1, 1, 1, 1, 0.4, 0.3], description="weights for Monday..Sunday"
    )
    growth: Growth = Field(default_factory=Growth)
    prompt_tokens: LengthDistribution = Field(
        default_factory=lambda: LengthDistribution(mean=600, sd=400, max=6000)
    )
    output_tokens: LengthDistribution = Field(
        default_factory=lambda: LengthDistribution(mean=250, sd=180, max=2000)
    )
    stream_share: float = Field(default=0.3, ge=0, le=1)

    @field_validator("diurnal")
    @classmethod
    def _shape(cls, value: str | list[float]) -> str | list[float]:
        if isinstance(value, str) and value not in DIURNAL_SHAPES:
            raise ValueError(f"unknown shape {value!r}; use one of {sorted(DIURNAL_SHAPES)}")
        if isinstance(value, list) and (len(value) != 24 or min(value) < 0):
            raise ValueError("give 24 non-negative weights, one per local hour")
        return value

    @field_validator("weekly")
    @classmethod
    def _week(cls, value: list[float]) -> list[float]:
        if len(value) != 7 or min(value) < 0 or not sum(value):
            raise ValueError("give 7 non-negative weights, Monday first")
        return value

    def hourly_weights(self) -> tuple[float, ...]:
        if isinstance(self.diurnal, str):
            return DIURNAL_SHAPES[self.diurnal]
        return tuple(self.diurnal)


class Trends(_Strict):
    """How the market moves over a projection, as factors after one year (compounded by
    month: month k of the projection applies factor ** (k / 12))."""

    accelerator_price_per_year: float = Field(
        default=1.0, gt=0, description="accelerator price per hour (0.8: 20% cheaper a year on)"
    )
    throughput_per_year: float = Field(
        default=1.0, gt=0, description="tokens per accelerator-hour (2: twice as many)"
    )

    @property
    def cost_per_token_per_year(self) -> float:
        """Cost per token a year on, as a factor (0.25: four times cheaper)."""
        return self.accelerator_price_per_year / self.throughput_per_year


class Event(_Strict):
    """Something that happened in the market on a date, noted in the trajectory report."""

    date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    note: str


class Variant(_Strict):
    """A named change to the scenario, for what-if comparisons."""

    description: str = ""
    gateway: dict[str, Any] = Field(default_factory=dict, description="merged into `gateway`")
    requests: int | None = Field(default=None, gt=0)
    tenants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="tenant id -> profile fields to replace"
    )


class Scenario(_Strict):
    """A month of synthetic traffic through the gateway."""

    name: str
    description: str = ""
    seed: int = 0
    month: str = Field(pattern=r"^\d{4}-\d{2}$", description="e.g. 2026-11 (the first month)")
    requests: int = Field(gt=0, description="expected requests in the month, all tenants")
    concurrency: int = Field(default=16, ge=1, description="requests in flight at once")
    months: int = Field(default=1, ge=1, le=120, description="months of a projection")
    trends: Trends = Field(default_factory=Trends)
    events: list[Event] = Field(default_factory=list)
    capacity: CapacityConfig = Field(default_factory=CapacityConfig)
    gateway: dict[str, Any] = Field(description="a gateway configuration")
    tenants: dict[str, TenantProfile] = Field(min_length=1)
    variants: dict[str, Variant] = Field(default_factory=dict)

    def settings(self) -> Settings:
        """The gateway configuration, validated (`ScenarioError` names the field)."""
        try:
            settings = parse_settings(self.gateway, f"scenario {self.name!r} gateway")
        except ConfigError as exc:
            raise ScenarioError(str(exc)) from None
        known = {t.id for t in settings.tenants}
        served = {m.name for m in settings.models} | {a for m in settings.models for a in m.aliases}
        for tenant_id, profile in self.tenants.items():
            if tenant_id not in known:
                raise ScenarioError(f"tenants.{tenant_id}: not a tenant of the gateway config")
            for model in profile.models:
                if model not in served:
                    raise ScenarioError(f"tenants.{tenant_id}.models: unknown model {model!r}")
        return settings

    def variant(self, name: str) -> Scenario:
        """This scenario with variant `name` applied ("baseline" is the scenario itself)."""
        if name == "baseline":
            return self
        if name not in self.variants:
            known = ", ".join(["baseline", *self.variants])
            raise ScenarioError(f"unknown variant {name!r} (known: {known})")
        change = self.variants[name]
        data = self.model_dump(mode="json")
        data["name"] = f"{self.name}:{name}"
        data["description"] = change.description or data["description"]
        data["gateway"] = deep_merge(self.gateway, change.gateway)
        if change.requests is not None:
            data["requests"] = change.requests
        for tenant_id, fields in change.tenants.items():
            if tenant_id not in data["tenants"]:
                raise ScenarioError(f"variants.{name}.tenants.{tenant_id}: unknown tenant")
            data["tenants"][tenant_id] = deep_merge(data["tenants"][tenant_id], fields)
        data["variants"] = {}
        return _validate(data, f"variant {name!r}")


def _validate(data: dict[str, Any], source: str) -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{source} is invalid:\n{describe_errors(exc)}") from None


def load_scenario(path: Path | str) -> Scenario:
    """Read and validate a scenario file; `gateway_config` is read relative to it."""
    path = Path(path)
    data = read_yaml_mapping(path, "scenario", ScenarioError)
    reference = data.pop("gateway_config", None)
    if reference is not None:
        if "gateway" in data:
            raise ScenarioError(f"{path}: give 'gateway' or 'gateway_config', not both")
        config_path = path.parent / str(reference)
        try:
            data["gateway"] = yaml.safe_load(config_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ScenarioError(f"{path}: gateway_config {config_path}: {exc}") from None
    scenario = _validate(data, str(path))
    scenario.settings()
    return scenario
