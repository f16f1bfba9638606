"""Several processes starting on one new ledger database migrate it once, without errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_MIGRATE = """
import asyncio, sys
from billing.ledger import create_ledger_engine
from billing.store.migrations import upgrade

async def main() -> None:
    engine = create_ledger_engine(sys.argv[1])
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()

asyncio.run(main())
"""


def _migrate_at_once(url: str, processes: int) -> list[subprocess.CompletedProcess[str]]:
    started = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for process in started:
        out, err = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def test_workers_starting_on_a_new_sqlite_ledger_migrate_it_once(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    for result in _migrate_at_once(url, processes=6):
        assert result.returncode == 0, result.stderr[-2000:]


def test_workers_starting_on_a_new_postgres_ledger_migrate_it_once(postgres_database: str) -> None:
    for result in _migrate_at_once(postgres_database, processes=6):
        assert result.returncode == 0, result.stderr[-2000:]
