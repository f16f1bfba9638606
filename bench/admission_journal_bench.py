"""Cost of journaling a request at admission (`Ledger.admit`), per request.

    python bench/admission_journal_bench.py

Times `Ledger.admit` with a provisional record shaped like the gateway's, and for scale
`Ledger.record` of the final one, on a real journal file (no database writes are timed).
Admissions are journaled in one write per event-loop turn: they are timed in turns of
`--per-turn` admissions (64, like the benchmark's concurrency; 1 is the worst case),
each turn ending with the write (`Ledger.journal_admitted`).

Times are this thread's CPU time (`time.thread_time`), so other processes on a shared
machine do not inflate them; the best and the median of `--runs` runs are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing.ledger import Ledger, LedgerConfig
from billing.record import GATEWAY_DIED, UsageRecord
from billing.usage import Usage

N = 5_000


def make(request_id: str, error_type: str | None) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        started_at=datetime.now(UTC),
        tenant_id="acme",
        key_id="key_0123456789",
        model="gpt-4o-mini",
        endpoint="chat.completions",
        provider="openai",
        deployment="openai-mini",
        usage=Usage(120, 0, 30, 0),
        price_version="gpt-4o-mini@2026-01-01T00:00Z",
        unit_price_input_nanos=150,
        unit_price_output_nanos=600,
        cost_nanos=36_000,
        status_code=500 if error_type else 200,
        error_type=error_type,
    )


async def main(per_turn: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = LedgerConfig(
            url=f"sqlite+aiosqlite:///{tmp}/ledger.db", url_env=None, flush_interval_ms=60_000
        )
        ledger = await Ledger.open(config)
        admit_us, record_us = [], []
        for run in range(runs):
            ids = [f"req_{run}_{i}" for i in range(N)]
            finals = [make(rid, None) for rid in ids]
            t0 = time.thread_time()
            for start in range(0, N, per_turn):
                for rid in ids[start : start + per_turn]:
                    ledger.admit(rid, lambda rid=rid: make(rid, GATEWAY_DIED))
                ledger.journal_admitted()  # the end of the turn
            t1 = time.thread_time()
            for rec in finals:
                ledger.record(rec)
            t2 = time.thread_time()
            admit_us.append((t1 - t0) / N * 1e6)
            record_us.append((t2 - t1) / N * 1e6)
            await ledger.flush()
        await ledger.aclose()
    admit, record = statistics.median(admit_us), statistics.median(record_us)
    print(
        f"Ledger.admit  (provisional record built + journaled, {per_turn} per turn): "
        f"best {min(admit_us):.2f}, median {admit:.2f} us/request (CPU)"
    )
    print(
        "Ledger.record (final record journaled + queued):      "
        f"best {min(record_us):.2f}, median {record:.2f} us/request (CPU)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-turn", type=int, default=64, help="admissions per loop turn")
    parser.add_argument("--runs", type=int, default=20, help="timed runs of 5,000 requests")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.per_turn, arguments.runs))
