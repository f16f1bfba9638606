"""How long the console's tenant overview takes with a million ledger rows in the month.

Writes `--rows` requests for one tenant, spread over the whole of this month, through the
ledger's own SQLite writer (rows and 15-minute rollups in one transaction per batch), signs
in as the tenant's owner and fetches `/console/tenants/<id>/` `--repeat` times, printing the server
time of each (the page's `Server-Timing` header: the handler's time, rollup queries and
rendering included) and the whole request's time.

    python bench/console_bench.py --rows 1000000 --repeat 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from billing.ledger import ENTRY_COLUMNS, SqliteWriter  # noqa: E402
from gateway.config import Settings, deep_merge, parse_settings  # noqa: E402
from gateway.defaults import DEFAULT_CONFIG  # noqa: E402

TENANT = "demo"
MODELS = (("sim-small", 150, 600), ("sim-large", 2500, 10000), ("sim-embed", 20, 0))


def _rows(first: int, count: int, total: int, start: datetime, span_s: float) -> list[Any]:
    """Rows `first`..`first + count` of `total` (ENTRY_COLUMNS order), evenly spread over
    [start, start + span_s)."""
    base = start.replace(tzinfo=None)
    step = span_s / total
    template = dict.fromkeys(ENTRY_COLUMNS)
    rows = []
    for i in range(first, first + count):
        model, price_in, price_out = MODELS[i % 3]
        uncached, output = 200 + i % 700, (i * 7) % 400 if price_out else 0
        cost = uncached * price_in + output * price_out
        values = dict(template)
        values.update(
            request_id=f"bench-{i}",
            started_at=base + timedelta(seconds=i * step),
            tenant_id=TENANT,
            key_id="demo",
            model=model,
            endpoint="chat.completions",
            provider="sim",
            deployment=f"sim/{model}",
            uncached_input=uncached,
            cached_input=0,
            output=output,
            reasoning=0,
            currency="USD",
            price_version=f"{model}@2026-01-01T00:00Z",
            unit_price_input_nanos=price_in,
            unit_price_cached_nanos=price_in,
            unit_price_output_nanos=price_out,
            list_price_input_nanos=price_in,
            list_price_cached_nanos=price_in,
            list_price_output_nanos=price_out,
            cost_nanos=cost,
            list_cost_nanos=cost,
            compute_cost_nanos=cost // 3,
            status_code=200 if i % 97 else 502,
            error_type=None,
            stream=False,
            stream_cut_by=None,
            attempts=1,
            ttft_ms=80.0,
            duration_ms=400.0,
        )
        rows.append(tuple(values[name] for name in ENTRY_COLUMNS))
    return rows


def fill(db: Path, count: int, now: datetime, *, whole_month: bool = True) -> float:
    """Write `count` rows for the tenant spread over the whole of this month (a full
    month's rollups, the most the page reads) or, with `whole_month=False`, over the month
    so far; returns the seconds taken."""
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + timedelta(days=32)).replace(day=1)
    end = following if whole_month else now - timedelta(minutes=1)
    span = max((end - start).total_seconds() - 1, 60.0)
    began = time.perf_counter()
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=OFF")
    batch = 20_000
    for offset in range(0, count, batch):
        rows = _rows(offset, min(batch, count - offset), count, start, span)
        connection.execute("BEGIN IMMEDIATE")
        SqliteWriter._insert(connection, rows, assume_new=True)
        connection.execute("COMMIT")
    connection.close()
    return time.perf_counter() - began


def settings_for(db: Path) -> Settings:
    config = deep_merge(
        DEFAULT_CONFIG,
        {
            "ledger": {"url": f"sqlite+aiosqlite:///{db}", "url_env": None},
            "console": {"demo_password_env": "MAAS_BENCH_CONSOLE_PASSWORD"},
        },
    )
    return parse_settings(config)


async def measure(settings: Settings, repeat: int) -> tuple[list[float], list[float], str]:
    """Sign in as the demo owner, fetch the overview `repeat` times: (server ms, wall ms)."""
    from litestar.testing import AsyncTestClient

    from gateway.app import Gateway, create_app

    os.environ["MAAS_BENCH_CONSOLE_PASSWORD"] = "bench-password"
    app = create_app(settings, gateway=Gateway(settings))
    server, wall = [], []
    page = ""
    async with AsyncTestClient(app, base_url="http://127.0.0.1") as client:
        login = await client.get("/console/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', login.text)
        assert token is not None
        signed = await client.post(
            "/console/login",
            data={"csrf_token": token.group(1), "username": "demo", "password": "bench-password"},
            follow_redirects=False,
        )
        assert signed.status_code == 303, signed.text
        for _ in range(repeat):
            began = time.perf_counter()
            response = await client.get(f"/console/tenants/{TENANT}/")
            wall.append((time.perf_counter() - began) * 1000)
            assert response.status_code == 200, response.text
            timing = response.headers["server-timing"]
            server.append(float(timing.split("dur=")[1]))
            page = response.text
    return server, wall, page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="ledger rows (1,000,000)")
    parser.add_argument("--repeat", type=int, default=20, help="page fetches (20)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        db = Path(tmp) / "ledger.db"
        settings = settings_for(db)
        asyncio.run(migrate(settings))
        now = datetime.now(UTC)
        seconds = fill(db, args.rows, now)
        with sqlite3.connect(db) as connection:
            (entries,) = connection.execute("SELECT count(*) FROM ledger_entries").fetchone()
            (rollups,) = connection.execute("SELECT count(*) FROM usage_rollups").fetchone()
        print(f"wrote {entries:,} ledger rows ({rollups:,} rollup rows) in {seconds:.1f} s")
        server, wall, page = asyncio.run(measure(settings, args.repeat))
        shown = re.search(r'id="month-requests">([\d,]+)<', page)
        print(f"the page shows {shown.group(1) if shown else '?'} requests this month")
        for name, values in (("server time", server), ("request time", wall)):
            ordered = sorted(values)
            p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
            print(
                f"{name}: median {statistics.median(values):.1f} ms, p95 {p95:.1f} ms, "
                f"max {max(values):.1f} ms over {len(values)} fetches"
            )
    return 0


async def migrate(settings: Settings) -> None:
    """Bring the ledger database of `settings` to the newest schema."""
    from billing.ledger import Ledger

    ledger = await Ledger.open(settings.ledger)
    await ledger.aclose()


if __name__ == "__main__":
    raise SystemExit(main())
