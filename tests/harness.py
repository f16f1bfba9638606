"""Run real gateways and simulators for tests: in-process on a real socket, or as processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from gateway.app import Gateway, create_app
from gateway.auth import hash_key
from gateway.config import Settings, deep_merge, parse_settings
from loadtest.run import stop_process as stop_process  # one way to stop a server

PROJECT_ROOT = Path(__file__).resolve().parent.parent

ACME_KEY = "sk-test-acme-0000000000000000000000000000000000000"
ACME_LIMITED_KEY = "sk-test-acme-limited-00000000000000000000000000000"
GLOBEX_KEY = "sk-test-globex-000000000000000000000000000000000000"
ADMIN_KEY = "sk-admin-test-0000000000000000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SLOW_SIMULATOR: dict[str, Any] = {
    "name": "sim",
    "type": "simulated",
    "time_scale": 1,
    "ttft_overhead_ms": 5,
    "itl_ms": 20,
    "output": {"distribution": "uniform", "min": 300, "max": 400},
}
"""A simulated provider in real time: 300 to 400 tokens, 20 ms apart (streams of 6 to 8 s)."""


def base_config(tmp: Path, tokenizer_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A test configuration: fast simulated models, SQLite in `tmp`, two tenants."""
    config: dict[str, Any] = {
        "server": {"admin_key_env": "MAAS_TEST_ADMIN_KEY"},
        "metrics": {"port": 0},  # the metrics listener on any free loopback port
        "tokenizers": {"dir": str(tokenizer_dir)},
        "providers": [
            {
                "name": "sim",
                "type": "simulated",
                "time_scale": 0,
                "seed": 7,
                "output": {"distribution": "uniform", "mean": 20, "sd": 10, "min": 5, "max": 40},
            }
        ],
        "models": [
            {
                "name": "gpt-4o-mini",
                "aliases": ["mini"],
                "deployments": [{"provider": "sim", "model": "sim-mini"}],
            },
            {
                "name": "gpt-4",
                "deployments": [{"provider": "sim", "model": "sim-4"}],
            },
            {
                "name": "text-embedding-3-small",
                "kind": "embedding",
                "deployments": [{"provider": "sim", "model": "sim-embed"}],
            },
        ],
        "pricing": {
            "currency": "USD",
            "models": {
                "gpt-4o-mini": [
                    {
                        "effective_from": "2026-01-01",
                        "prices": {"input": "0.15", "cached_input": "0.075", "output": "0.60"},
                    }
                ],
                "gpt-4": [
                    {
                        "effective_from": "2026-01-01",
                        "prices": {"input": "30", "output": "60"},
                    }
                ],
                "text-embedding-3-small": [
                    {"effective_from": "2026-01-01", "prices": {"input": "0.02", "output": "0"}}
                ],
            },
        },
        "ledger": {"url": f"sqlite+aiosqlite:///{tmp / 'ledger.db'}", "url_env": None},
        "tenants": [
            {
                "id": "acme",
                "name": "Acme Corp",
                "limits": {"rpm": 100000, "tpm": 100000000},
                "keys": [
                    {"id": "acme-main", "hash": hash_key(ACME_KEY)},
                    {
                        "id": "acme-limited",
                        "hash": hash_key(ACME_LIMITED_KEY),
                        "models": ["gpt-4o-mini"],
                    },
                ],
            },
            {
                "id": "globex",
                "name": "Globex",
                "timezone": "Asia/Shanghai",
                "limits": {"rpm": 100000, "tpm": 100000000},
                "keys": [{"id": "globex-main", "hash": hash_key(GLOBEX_KEY)}],
            },
        ],
    }
    return deep_merge(config, overrides)


class RunningGateway:
    """A gateway served by uvicorn on a real loopback socket inside the test's event loop."""

    def __init__(self, settings: Settings) -> None:
        if settings.metrics.port:  # any free port: gateways in parallel never collide
            metrics = settings.metrics.model_copy(update={"port": 0})
            settings = settings.model_copy(update={"metrics": metrics})
        self.settings = settings
        self.gateway = Gateway(settings, metrics_listener=True)
        self.gateway.admin_key = ADMIN_KEY
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings, gateway=self.gateway),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunningGateway:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task

    @property
    def metrics_url(self) -> str:
        """Where the metrics listener serves `GET /metrics` (not the public port)."""
        listener = self.gateway.metrics_listener
        assert listener is not None, "the metrics listener is off (metrics.port: null)"
        return listener.url

    def admin(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
        )


@contextlib.asynccontextmanager
async def running_gateway(
    tmp: Path, tokenizer_dir: Path, **overrides: Any
) -> AsyncIterator[RunningGateway]:
    settings = parse_settings(base_config(tmp, tokenizer_dir, **overrides))
    async with RunningGateway(settings) as gw:
        yield gw


def wait_for_http(
    url: str, timeout: float = 20.0, process: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def gateway_process(
    config: dict[str, Any], tmp: Path, *, env: dict[str, str] | None = None, name: str = "gw"
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`maas-gateway serve` as a real OS process on a free port; yields its base URL."""
    port = free_port()
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp / f"{name}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(port)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "MAAS_TEST_ADMIN_KEY": ADMIN_KEY, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz", process=process)
        yield url, process
    finally:
        stop_process(process)
        log.close()
