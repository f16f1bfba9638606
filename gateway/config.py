"""The gateway's configuration: one YAML file, validated at start, errors naming the field.

Each part's settings are defined by the module that owns the part (tokenizers, routing,
pricing, quotas, ledger, metrics, the providers); this module composes them and checks
the references between them. Secrets never live in the file: it names environment
variables (`api_key_env`, `url_env`, `admin_key_env`).
"""

from __future__ import annotations

import copy
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from billing.compute_cost import ComputeCostConfig
from billing.ledger import LedgerConfig
from billing.pricing import PricingConfig
from billing.quota import Limits, QuotaConfig
from gateway.console.config import ConsoleConfig
from gateway.http_limits import HttpLimits
from gateway.metrics import MetricsConfig
from gateway.response_store import ResponsesConfig
from gateway.routing import ModelConfig, RoutingConfig
from gateway.schemas import MAX_JSON_DEPTH
from gateway.tokens import TokenizerConfig
from providers.openai_compat import OpenAICompatConfig
from providers.simulated import SimulatedConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    admin_key_env: str = Field(
        "MAAS_ADMIN_KEY", description="Environment variable holding the admin API key"
    )
    default_max_output_tokens: int = Field(
        4096, ge=1, description="Reserved for a request that sets no max_tokens"
    )
    max_json_depth: int = Field(
        MAX_JSON_DEPTH,
        ge=2,
        le=512,
        description="Deepest nesting of arrays and objects a JSON body may have (400 beyond)",
    )
    http: HttpLimits = Field(default_factory=HttpLimits)


class SimulatedProviderConfig(SimulatedConfig):
    type: Literal["simulated"]
    name: str


class OpenAICompatProviderConfig(OpenAICompatConfig):
    type: Literal["openai_compat"]
    name: str


ProviderConfig = Annotated[
    SimulatedProviderConfig | OpenAICompatProviderConfig, Field(discriminator="type")
]


class KeyConfig(Strict):
    id: str
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="hash_key() of the secret")
    name: str = ""
    models: list[str] | None = None
    expires_at: datetime | None = None
    revoked: bool = False
    limits: Limits | None = None


class TenantConfig(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    name: str = ""
    timezone: str = "UTC"
    currency: str = "USD"
    plan: str | None = None
    limits: Limits = Field(default_factory=Limits)
    model_limits: dict[str, Limits] = Field(default_factory=dict)
    balance: Decimal | None = Field(
        None, description="Prepaid: the starting balance; absent means billed in arrears"
    )
    tax_rate: Decimal = Field(Decimal(0), ge=0, lt=1)
    keys: list[KeyConfig] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class Settings(Strict):
    """The whole configuration file."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    tokenizers: TokenizerConfig = Field(default_factory=TokenizerConfig)
    providers: list[ProviderConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    compute_costs: ComputeCostConfig = Field(default_factory=ComputeCostConfig)
    quotas: QuotaConfig = Field(default_factory=QuotaConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    tenants: list[TenantConfig] = Field(default_factory=list)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    demo_key_env: str | None = Field(
        None,
        description="Give the first tenant a key from this environment variable "
        "(or a fresh one printed at start-up when it is unset)",
    )

    @model_validator(mode="after")
    def _references(self) -> Settings:
        providers = [p.name for p in self.providers]
        _unique(providers, "providers", "name")
        _unique([t.id for t in self.tenants], "tenants", "id")
        _unique([k.id for t in self.tenants for k in t.keys], "tenants.keys", "id")
        served = {m.name for m in self.models} | {a for m in self.models for a in m.aliases}
        for i, tenant in enumerate(self.tenants):
            where = f"tenants[{i}] ({tenant.id})"
            if tenant.plan is not None and tenant.plan not in self.pricing.plans:
                raise ValueError(f"{where}.plan: unknown plan {tenant.plan!r}")
            for model in tenant.model_limits:
                if model not in served:
                    raise ValueError(f"{where}.model_limits: unknown model {model!r}")
            for j, key in enumerate(tenant.keys):
                for model in key.models or ():
                    if model not in served:
                        raise ValueError(f"{where}.keys[{j}].models: unknown model {model!r}")
        return self


def _unique(values: list[str], section: str, field: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{section}: duplicate {field} {value!r}")
        seen.add(value)


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message names the field."""


def describe_errors(exc: ValidationError) -> str:
    """A pydantic error as one indented line per problem, each naming the field path."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path, what: str, error: type[ValueError]) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; anything else raises `error`."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping")
    return data


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`: mappings merge, anything else replaces."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def parse_settings(data: dict[str, Any], source: str = "configuration") -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{describe_errors(exc)}") from None


def load_settings(path: Path | str) -> Settings:
    """Read and validate a YAML configuration file."""
    path = Path(path)
    return parse_settings(read_yaml_mapping(path, "configuration", ConfigError), str(path))
