"""Scenarios: named YAML files in `loadtest/scenarios/` (steady, burst, budget, degrade).

A scenario holds everything one run needs::

    description: what the run shows
    users: 12            # locust users (overridable on the command line)
    spawn_rate: 6        # users started per second
    duration: 60s        # locust --run-time
    seed: 1              # makes the users' draws repeatable (optional)
    simulators:          # each started as `maas-gateway simulate` on a free port
      - name: primary
        phases:          # the simulator config (model name -> SimulatedConfig fields) ...
          - models: {sim-mini: {itl_ms: 10}}
          - at: 0.5      # ... replaced by this one half-way through the run (a restart)
            models: {sim-mini: {itl_ms: 80, errors: {rate_500: 0.3}}}
    gateway:             # a gateway configuration (see the README's Configuration section)
      providers:
        - {name: primary, type: openai_compat, base_url: "simulator:primary"}
      models: [...]
      pricing: {...}
      tenants:
        - id: acme
          keys: [{id: acme-chat}]     # hashes are filled in with fresh keys per run
    apps:                # workload.AppProfile fields; `tenant` comes from the key
      - {name: acme-chat, key_id: acme-chat, mix: [{endpoint: chat, model: gpt-4o-mini}]}
    expect:              # outcome or label counts the run must show (optional)
      min: {rate_limit_exceeded: 1}
      max: {failed: 0}

The runner fills in the gateway's `server`, `ledger` and `tokenizers` sections and turns
``base_url: "simulator:NAME"`` into the address of that simulator.
"""

from __future__ import annotations

import copy
import re
import secrets
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import hash_key
from loadtest.workload import AppProfile

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
SIMULATOR_URL_PREFIX = "simulator:"
_DURATION = re.compile(r"^\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Phase(_Strict):
    """A simulator configuration in force from `at` (a fraction of the run) on."""

    at: float = Field(default=0, ge=0, lt=1)
    models: dict[str, dict[str, Any]] = Field(min_length=1)


class SimulatorSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    phases: list[Phase] = Field(min_length=1)


class Expectations(_Strict):
    min: dict[str, int] = Field(default_factory=dict)
    max: dict[str, int] = Field(default_factory=dict)


class Scenario(_Strict):
    """A named load-test scenario; see the module docstring for the file format."""

    name: str = ""
    description: str = ""
    users: int = Field(default=10, ge=1)
    spawn_rate: float = Field(default=10, gt=0)
    duration: str = "60s"
    seed: int | None = None
    simulators: list[SimulatorSpec] = Field(min_length=1)
    gateway: dict[str, Any]
    apps: list[dict[str, Any]] = Field(min_length=1)
    expect: Expectations = Field(default_factory=Expectations)


def available() -> list[str]:
    """The names of the scenarios shipped in `loadtest/scenarios/`."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A scenario by name (`steady`) or by the path of a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"no scenario {name_or_path!r}; known: {', '.join(available())}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    scenario = Scenario.model_validate(raw)
    scenario.name = scenario.name or path.stem
    return scenario


def parse_duration(text: str) -> float:
    """Seconds in a locust-style duration: ``90``, ``90s``, ``1m30s``, ``1h``."""
    match = _DURATION.match(text)
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r} (use e.g. 15s, 2m, 1h30m)")
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


def simulator_config(phase: Phase, time_scale: float | None) -> dict[str, Any]:
    """The `maas-gateway simulate` YAML of one phase, with `time_scale` forced if given."""
    models = copy.deepcopy(phase.models)
    if time_scale is not None:
        for fields in models.values():
            fields["time_scale"] = time_scale
    return models


def issue_keys(scenario: Scenario) -> dict[str, str]:
    """A fresh secret for every key id the scenario's tenants declare."""
    keys: dict[str, str] = {}
    for tenant in scenario.gateway.get("tenants") or ():
        for key in tenant.get("keys") or ():
            keys[key["id"]] = f"sk-load-{key['id']}-{secrets.token_urlsafe(18)}"
    return keys


def gateway_config(
    scenario: Scenario,
    *,
    simulator_urls: dict[str, str],
    keys: dict[str, str],
    ledger_path: Path,
    admin_key_env: str,
    tokenizer_dir: Path | None,
) -> dict[str, Any]:
    """The scenario's gateway configuration, completed for one run."""
    config = copy.deepcopy(scenario.gateway)
    config["server"] = {**config.get("server", {}), "admin_key_env": admin_key_env}
    # the metrics listener on any free port, so that runs side by side do not collide
    config["metrics"] = {"port": 0, **config.get("metrics", {})}
    config["ledger"] = {
        **config.get("ledger", {}),
        "url": f"sqlite+aiosqlite:///{ledger_path}",
        "url_env": None,
    }
    if tokenizer_dir is not None:
        config["tokenizers"] = {**config.get("tokenizers", {}), "dir": str(tokenizer_dir)}
    for provider in config.get("providers") or ():
        base_url = str(provider.get("base_url", ""))
        if base_url.startswith(SIMULATOR_URL_PREFIX):
            name = base_url[len(SIMULATOR_URL_PREFIX) :]
            if name not in simulator_urls:
                raise ValueError(f"provider {provider.get('name')!r}: no simulator {name!r}")
            provider["base_url"] = simulator_urls[name] + "/v1"
    for tenant in config.get("tenants") or ():
        for key in tenant.get("keys") or ():
            key["hash"] = hash_key(keys[key["id"]])
    return config


def app_profiles(scenario: Scenario, keys: dict[str, str]) -> list[AppProfile]:
    """The scenario's apps, each with its tenant and this run's secret key."""
    tenant_of_key = {
        key["id"]: tenant["id"]
        for tenant in scenario.gateway.get("tenants") or ()
        for key in tenant.get("keys") or ()
    }
    apps = []
    for raw in scenario.apps:
        key_id = str(raw.get("key_id"))
        if key_id not in tenant_of_key:
            raise ValueError(f"app {raw.get('name')!r}: key {key_id!r} is not in any tenant")
        fields = {**raw, "tenant": tenant_of_key[key_id], "api_key": keys[key_id]}
        apps.append(AppProfile.model_validate(fields))
    return apps
