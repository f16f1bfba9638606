"""`maas-gateway serve --workers 2`: two worker processes behind one socket, sharing a real
redis-server for quotas, one SQLite ledger and one Prometheus multiprocess directory.

Whichever worker answers a scrape, the request, token and cost counters equal the ledger's
totals exactly: nothing counted twice, nothing missing, also after a worker is killed and
replaced (its counters stay in the sums, its live gauges leave them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.redis_server import RedisServer
from tests.harness import (
    ACME_KEY,
    GLOBEX_KEY,
    PROJECT_ROOT,
    base_config,
    free_port,
    stop_process,
    wait_for_http,
)

SERVE = [sys.executable, "-m", "gateway.cli", "serve"]
WORKERS = 2


@dataclass
class Served:
    """A running `serve --workers 2` and the files it shares between its workers."""

    url: str
    process: subprocess.Popen[bytes]
    ledger: Path
    journal: Path
    multiproc_dir: Path
    log: Path
    metrics_url: str

    def worker_pids(self) -> set[int]:
        """Workers that have opened the ledger (each holds its own journal segment)."""
        return {int(p.name.split("-")[0]) for p in self.journal.glob("*.jsonl")}

    def requests_by_worker(self) -> dict[int, int]:
        """maas_requests_total per worker, read from each worker's own counter file."""
        counts: dict[int, int] = {}
        for path in self.multiproc_dir.glob("counter_*.db"):
            pid = int(path.stem.removeprefix("counter_"))
            total = 0.0
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
                if json.loads(key)[1] == "maas_requests_total":
                    total += value
            counts[pid] = int(total)
        return counts


def _config(tmp: Path, tokenizer_dir: Path, redis_url: str, metrics_port: int) -> dict[str, Any]:
    hardware = {"price_per_hour": "2", "count": 2}
    return base_config(
        tmp,
        tokenizer_dir,
        quotas={"backend": "redis", "redis_url": redis_url, "redis_url_env": None},
        metrics={"flush_interval_s": 0.1, "port": metrics_port},
        compute_costs={
            "deployments": {
                "sim/sim-mini": [{"effective_from": "2026-01-01", "hardware": hardware}],
                "sim/sim-4": [
                    {"effective_from": "2026-01-01", "wholesale": {"input": "2", "output": "8"}}
                ],
            }
        },
    )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, redis_server: RedisServer
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("metrics-workers")
    redis_server.start()
    redis_server.flush()
    config = tmp / "gateway.yaml"
    metrics_port = free_port()
    config.write_text(yaml.safe_dump(_config(tmp, tokenizer_dir, redis_server.url, metrics_port)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    log = tmp / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*SERVE, "--config", str(config), "--port", str(port), "--workers", str(WORKERS)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/healthz", timeout=60, process=process)
        found = re.search(r"PROMETHEUS_MULTIPROC_DIR=(\S+)", log.read_text())
        assert found, log.read_text()
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        multiproc_dir = Path(found[1])
        gw = Served(
            url, process, tmp / "ledger.db", tmp / "ledger.journal", multiproc_dir, log, metrics_url
        )
        _wait(
            lambda: len(gw.worker_pids()) == WORKERS,
            "both workers to open the ledger",
            lambda: f"journal {sorted(gw.journal.glob('*'))}, log:\n{log.read_text()[-3000:]}",
        )
        time.sleep(0.5)  # the last start-up steps after the ledger opens
        yield gw
    finally:
        stop_process(process, 30)


def _wait(condition: Any, what: str, detail: Any = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}" + (f": {detail()}" if detail else "")
            )
        time.sleep(0.05)


async def _send(url: str, count: int) -> Counter[int]:
    """`count` chat requests from six concurrent callers, each on a new connection, so that
    the kernel hands them to both workers."""
    statuses: Counter[int] = Counter()
    queue = list(range(count))

    async def caller() -> None:
        while queue:
            n = queue.pop()
            key = ACME_KEY if n % 3 else GLOBEX_KEY
            body: dict[str, Any] = {
                "model": "gpt-4o-mini" if n % 2 else "gpt-4",
                "messages": [{"role": "user", "content": f"Count the tokens of request {n}."}],
                "max_tokens": 30,
            }
            if n % 4 == 0:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                response = await client.post(
                    "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                )
            statuses[response.status_code] += 1

    await asyncio.gather(*(caller() for _ in range(6)))
    return statuses


def _ledger(path: Path, expected_rows: int) -> dict[str, dict[tuple[str, ...], int]]:
    """The ledger's sums in the metrics' label shapes, once all `expected_rows` are in."""
    import sqlite3

    def rows() -> list[Any]:
        with sqlite3.connect(path) as db:
            return db.execute(
                "SELECT tenant_id, model, deployment, status_code, uncached_input,"
                " cached_input, output, cost_nanos, compute_cost_nanos FROM ledger_entries"
            ).fetchall()

    _wait(lambda: len(rows()) == expected_rows, f"{expected_rows} ledger rows")
    sums: dict[str, Counter[tuple[str, ...]]] = {
        name: Counter() for name in ("requests", "tokens", "cost", "compute", "success", "output")
    }
    for tenant, model, deployment, status, uncached, cached, output, cost, compute in rows():
        sums["requests"][(tenant, model)] += 1
        for token_type, total in (
            ("uncached_input", uncached),
            ("cached_input", cached),
            ("output", output),
        ):
            sums["tokens"][(tenant, model, token_type)] += total
        sums["cost"][(tenant, model)] += cost
        sums["compute"][(tenant, deployment)] += compute
        if status == 200:
            sums["success"][()] += 1
            sums["output"][()] += output
    return {name: {k: v for k, v in totals.items() if v} for name, totals in sums.items()}


def _scrape(url: str) -> dict[str, dict[tuple[str, ...], int]]:
    """One scrape on a new connection, summed like `_ledger`."""
    text = httpx.get(url, headers={"connection": "close"}, timeout=10).text
    shapes = {
        "maas_requests_total": ("requests", ("tenant", "model")),
        "maas_tokens_total": ("tokens", ("tenant", "model", "token_type")),
        "maas_cost_nanos_total": ("cost", ("tenant", "model")),
        "maas_compute_cost_nanos_total": ("compute", ("tenant", "deployment")),
        "vllm:request_success_total": ("success", ()),
        "vllm:generation_tokens_total": ("output", ()),
    }
    sums: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name, _ in shapes.values()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in shapes:
                name, labels = shapes[sample.name]
                assert sample.value == int(sample.value), sample
                sums[name][tuple(sample.labels[label] for label in labels)] += int(sample.value)
    return {name: {k: v for k, v in totals.items() if v} for name, totals in sums.items()}


def _every_scrape_equals(url: str, ledger: dict[str, Any], scrapes: int = 12) -> None:
    for n in range(scrapes):
        assert _scrape(url) == ledger, f"scrape {n}"


def test_any_worker_scrape_equals_the_ledger_exactly(served: Served) -> None:
    statuses = asyncio.run(_send(served.url, 60))
    assert statuses == {200: 60}
    assert httpx.get(served.url + "/metrics").status_code == 404  # never on the public port
    # within the flush interval every worker's observations are in its own file
    _wait(lambda: sum(served.requests_by_worker().values()) == 60, "60 requests in the files")
    by_worker = served.requests_by_worker()
    assert len([pid for pid, n in by_worker.items() if n]) == WORKERS, by_worker  # both served
    ledger = _ledger(served.ledger, 60)
    assert set(ledger["compute"]) >= {("acme", "sim/sim-mini"), ("globex", "sim/sim-4")}
    time.sleep(0.5)  # and the simulated backends' totals, published as often
    _every_scrape_equals(served.metrics_url, ledger)
    # only the hardware deployment provisions accelerators; counted once, not per worker
    text = httpx.get(served.metrics_url, headers={"connection": "close"}).text
    provisioned = [line for line in text.splitlines() if line.startswith("maas_provisioned")]
    assert len(provisioned) == 1 and 'deployment="sim/sim-mini"' in provisioned[0]


def test_a_killed_worker_is_replaced_and_still_counted_once(served: Served) -> None:
    before = served.worker_pids()
    victim = max(served.requests_by_worker().items(), key=lambda item: item[1])[0]
    assert victim in before
    os.kill(victim, signal.SIGKILL)
    live_gauges = served.multiproc_dir / f"gauge_livesum_{victim}.db"
    _wait(lambda: not live_gauges.exists(), "the killed worker to be marked dead")
    _wait(lambda: len(served.worker_pids() - before) == 1, "a replacement worker")
    time.sleep(0.5)
    assert (served.multiproc_dir / f"counter_{victim}.db").exists()  # its counts stay
    statuses = asyncio.run(_send(served.url, 24))
    assert statuses == {200: 24}
    ledger = _ledger(served.ledger, 84)
    time.sleep(0.5)
    _every_scrape_equals(served.metrics_url, ledger)


def test_stopping_removes_the_temporary_metrics_directory(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(30) == 0
    assert not served.multiproc_dir.exists()


def test_several_workers_without_redis_quotas_are_refused(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    config = tmp_path / "memory.yaml"
    config.write_text(yaml.safe_dump(base_config(tmp_path, tokenizer_dir)))
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", "2"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--workers 2 needs quotas.backend: redis" in result.stderr
    assert not (tmp_path / "ledger.db").exists()  # refused before anything started
