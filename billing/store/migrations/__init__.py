"""Alembic migrations that make the gateway database (`billing.store.schema`); run them
with `billing.store.migrations.upgrade`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


_ADVISORY_LOCK_ID = 0x6D616173  # "maas": serialises migrations across processes


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Migrate the database behind `engine` to `revision` (default: the newest).

    Safe when several processes start on one database at once (the workers of
    `serve --workers N`): they migrate one at a time, and the later ones find it done.
    """

    def run(connection: object) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with _migration_lock(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(text(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_ID})"))
        await connection.run_sync(run)


@contextlib.asynccontextmanager
async def _migration_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """For SQLite, an exclusive lock on a file beside the database while migrating
    (PostgreSQL takes an advisory lock in the migrating transaction instead)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".migrate-lock")
    handle = await asyncio.to_thread(_lock_file, lock_path)
    try:
        yield
    finally:
        handle.close()  # releases the lock


def _lock_file(path: Path) -> IO[str]:
    """Open `path` and wait for an exclusive lock on it; closing the file releases it."""
    handle = path.open("a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle
