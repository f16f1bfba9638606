"""A process killed with SIGKILL while recording loses nothing: every request id it printed
after `record()` returned (a response that reached its client) is in the ledger exactly
once after the ledger is reopened. On SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from billing.ledger import ENTRIES, ROLLUPS, Ledger, LedgerConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent

RECORDER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from pathlib import Path

    from billing.ledger import Ledger, LedgerConfig
    from billing.record import UsageRecord
    from billing.usage import Usage

    async def main() -> None:
        url, journal = sys.argv[1], Path(sys.argv[2])
        config = LedgerConfig(
            url=url, url_env=None, journal_dir=journal, batch_size=400, flush_interval_ms=30
        )
        ledger = await Ledger.open(config)
        print("ready", flush=True)
        index = 0
        while True:
            request_id = f"crash-{index}"
            usage = Usage(100 + index % 50, index % 20, 30 + index % 40, 0)
            ledger.record(
                UsageRecord(
                    request_id=request_id,
                    started_at=datetime.now(UTC),
                    tenant_id=f"tenant-{index % 5}",
                    key_id="key",
                    model="gpt-sim",
                    endpoint="/v1/chat/completions",
                    usage=usage,
                    unit_price_input_nanos=1_000,
                    unit_price_output_nanos=2_000,
                    cost_nanos=usage.uncached_input * 1_000 + usage.output * 2_000,
                )
            )
            sys.stdout.write(request_id + "\\n")  # the response reached its client
            sys.stdout.flush()
            index += 1
            if index % 25 == 0:
                await asyncio.sleep(0.001)  # the event loop serves other work meanwhile

    asyncio.run(main())
    """
)


def _start_recorder(url: str, journal: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", RECORDER, url, str(journal)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=PROJECT_ROOT,
    )


async def _kill_mid_run(url: str, journal: Path) -> list[str]:
    child = _start_recorder(url, journal)
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 30
        seen = 0
        while seen < 3000 and time.monotonic() < deadline:
            line = await asyncio.to_thread(child.stdout.readline)
            assert line, "the recorder stopped early"
            seen += 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        remaining = child.stdout.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    printed = [f"crash-{i}" for i in range(seen)]
    printed += [line for line in remaining.decode().splitlines() if line.startswith("crash-")]
    return printed


async def _ids_in(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return list((await connection.scalars(select(ENTRIES.c.request_id))).all())
    finally:
        await engine.dispose()


async def _check_sigkill(url: str, journal: Path) -> None:
    printed = await _kill_mid_run(url, journal)
    assert len(printed) >= 3000
    committed_before_restart = set(await _ids_in(url))
    # The kill landed mid-way: some printed records existed only in the journal.
    assert not set(printed) <= committed_before_restart
    assert len(committed_before_restart) > 0
    ledger = await Ledger.open(LedgerConfig(url=url, url_env=None, journal_dir=journal))
    try:
        ids = await _ids_in(url)
        assert len(ids) == len(set(ids))  # exactly once (also enforced by the key)
        missing = set(printed) - set(ids)
        assert not missing, f"{len(missing)} recorded requests were lost"
        async with ledger.engine.connect() as connection:
            raw = await connection.scalar(select(func.sum(ENTRIES.c.cost_nanos)))
            rolled = await connection.scalar(select(func.sum(ROLLUPS.c.cost_nanos)))
            requests = await connection.scalar(select(func.sum(ROLLUPS.c.requests)))
        assert raw == rolled
        assert requests == len(ids)
        leftovers = await asyncio.to_thread(os.listdir, journal)
        assert all(name.startswith(f"{os.getpid()}-") for name in leftovers)  # replayed, trimmed
    finally:
        await ledger.aclose()


async def test_sigkill_loses_nothing_sqlite(tmp_path: Path) -> None:
    await _check_sigkill(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", tmp_path / "journal")


@pytest.mark.timeout(120)
async def test_sigkill_loses_nothing_postgres(postgres_database: str, tmp_path: Path) -> None:
    await _check_sigkill(postgres_database, tmp_path / "journal")
