"""Apply the SQL migrations in `migrations/` in order, once each.

Several processes may start at once (serve, tests, a second gateway): a transaction-level
advisory lock makes them take turns, and `schema_migrations` remembers what was applied.
"""

from __future__ import annotations

from importlib import resources

import asyncpg

from persistence import session

_LOCK_ID = 0x1A7E_0001  # arbitrary, constant: "inventory migrations"


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("persistence") / "migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name, (folder / name).read_text()) for name in names]


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; returns the names applied now."""
    conn = await asyncpg.connect(dsn, server_settings=session.settings(dsn, "inventory-migrate"))
    try:
        applied_now: list[str] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, sql in migration_files():
                if name in done:
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied_now.append(name)
        return applied_now
    finally:
        await conn.close()
