"""What every query over the gateway's database shares: how times are stored (naive UTC),
the 15-minute rollup buckets, upserts for the connection's dialect, and the SQLite file
behind a URL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.store.schema import BUCKET_SECONDS

_EPOCH = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL, or None (not SQLite, or in memory)."""
    parsed = make_url(url)
    if not parsed.get_backend_name().startswith("sqlite"):
        return None
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def naive_utc(moment: datetime) -> datetime:
    """A datetime as naive UTC (how every table stores times); naive input is taken as UTC."""
    if moment.tzinfo is None:
        return moment
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None)


def aware_utc(moment: datetime | None) -> datetime | None:
    """A stored (naive UTC) time as an aware UTC datetime; None stays None."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def epoch_seconds(moment: datetime) -> int:
    """Whole seconds since the epoch (naive input is taken as UTC)."""
    return (naive_utc(moment) - _EPOCH) // _SECOND


def bucket_of(moment: datetime) -> int:
    """The start (epoch seconds) of the 15-minute UTC bucket holding `moment`."""
    seconds = epoch_seconds(moment)
    return seconds - seconds % BUCKET_SECONDS


def dialect_insert(connection: AsyncConnection, table: Table) -> Any:
    """An INSERT that understands ON CONFLICT for this connection's dialect."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
