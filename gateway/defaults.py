"""The embedded default: what `maas-gateway serve` runs with no configuration file.

Two simulated chat models and one embedding model on a built-in simulated backend,
list prices for them, SQLite for the ledger, in-process quotas, and a demo tenant whose
key is printed at start-up (or taken from MAAS_DEMO_KEY).
"""

from __future__ import annotations

from typing import Any

from gateway.config import Settings, parse_settings

DEFAULT_CONFIG: dict[str, Any] = {
    "providers": [
        {
            "name": "sim",
            "type": "simulated",
            "ttft_overhead_ms": 20,
            "prefill_ms_per_token": 0.02,
            "itl_ms": 10,
            "capacity": 64,
            "output": {"distribution": "lognormal", "mean": 120, "sd": 60, "min": 1, "max": 1024},
        },
        {
            "name": "sim-big",
            "type": "simulated",
            "ttft_overhead_ms": 60,
            "prefill_ms_per_token": 0.05,
            "itl_ms": 25,
            "capacity": 16,
            "output": {"distribution": "lognormal", "mean": 250, "sd": 120, "min": 1, "max": 2048},
        },
    ],
    "models": [
        {
            "name": "sim-small",
            "aliases": ["gpt-4o-mini"],
            "deployments": [{"provider": "sim", "model": "sim-small"}],
        },
        {
            "name": "sim-large",
            "aliases": ["gpt-4o"],
            "deployments": [{"provider": "sim-big", "model": "sim-large"}],
        },
        {
            "name": "sim-embed",
            "aliases": ["text-embedding-3-small"],
            "kind": "embedding",
            "deployments": [{"provider": "sim", "model": "sim-embed"}],
        },
    ],
    "pricing": {
        "currency": "USD",
        "models": {
            "sim-small": [
                {
                    "effective_from": "2026-01-01",
                    "prices": {"input": "0.15", "cached_input": "0.075", "output": "0.60"},
                }
            ],
            "sim-large": [
                {
                    "effective_from": "2026-01-01",
                    "tiers": [
                        {
                            "max_prompt_tokens": 32768,
                            "input": "1.25",
                            "cached_input": "0.125",
                            "output": "10",
                        },
                        {
                            "max_prompt_tokens": 131072,
                            "input": "2.50",
                            "cached_input": "0.25",
                            "output": "15",
                        },
                    ],
                }
            ],
            "sim-embed": [
                {"effective_from": "2026-01-01", "prices": {"input": "0.02", "output": "0"}}
            ],
        },
    },
    "tenants": [
        {
            "id": "demo",
            "name": "Demo tenant",
            "timezone": "UTC",
            "limits": {"rpm": 6000, "tpm": 2000000, "tokens_per_month": 100000000},
        }
    ],
    "demo_key_env": "MAAS_DEMO_KEY",
    "console": {"demo_password_env": "MAAS_DEMO_CONSOLE_PASSWORD"},
}


def default_settings() -> Settings:
    return parse_settings(DEFAULT_CONFIG, "the embedded default configuration")
