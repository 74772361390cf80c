"""Bench databases seeded straight into the service's schema (COPY + generate_series).

Creating a million stocks or 100,000 reservations through gRPC would take longer than the
measurement itself, so the rows are written as the shards would have written them:

* `stocks`: one per variant in one warehouse, with the service's `shard_hash` (crc32 of
  "org/variant") and `stock_id` (uuid5), `reserved` = the sum of its open lines;
* `reservation_lines` (status active, quantity 1) and their `reservations` headers
  (open_lines 1), `lines_per_stock` per stock, with `expires_at` given as an SQL expression
  of the line's ordinal `k` (0-based over all lines) and of `n` (their count).

No ledger movements or outbox rows are written for the seed (the reconciler would call
that drift; the benches turn it off). Shards activate these stocks and re-arm these
timers exactly as after a restart.
"""

from __future__ import annotations

import time
import uuid
import zlib

import asyncpg
from common import admin_dsn, db_name, log

_STOCK_NAMESPACE = uuid.UUID("5b0e4a3c-51c7-4c5e-9f1e-6c1f0d7e2a10")  # actors.keys: stock ids are uuid5


async def fresh_database(dsn: str, drop: bool = True) -> None:
    """Drop (unless told not to) and create the database, then apply the service's migrations."""
    from persistence.migrate import migrate

    name = db_name(dsn)
    admin = await asyncpg.connect(admin_dsn(dsn))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and drop:
            others = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name)
            if others:
                raise SystemExit(f"database {name} has {others} open session(s): is another bench running?")
            await admin.execute(f'DROP DATABASE "{name}"')
            exists = False
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await migrate(dsn)


async def drop_database(dsn: str) -> None:
    admin = await asyncpg.connect(admin_dsn(dsn))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name(dsn)}"')
    finally:
        await admin.close()


def variant_name(fmt: str, i: int) -> str:
    return fmt.format(i)


async def seed_stocks(dsn: str, org: str, warehouse: str, names: list[str], on_hand: int,
                      reserved: int = 0) -> float:
    """COPY one stock per variant name; returns seconds taken."""
    t = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("INSERT INTO warehouses (organization_id, warehouse_id, name, active)"
                           " VALUES ($1, $2, 'bench', true) ON CONFLICT DO NOTHING", org, warehouse)

        def rows():  # type: ignore[no-untyped-def]
            for v in names:
                yield (org, v, warehouse, uuid.uuid5(_STOCK_NAMESPACE, f"{org}/{v}/{warehouse}"),
                       zlib.crc32(f"{org}/{v}".encode()), on_hand, reserved, "active", 1)

        step = 200_000
        it = rows()
        while True:
            chunk = [r for _, r in zip(range(step), it, strict=False)]
            if not chunk:
                break
            await conn.copy_records_to_table(
                "stocks", records=chunk,
                columns=["organization_id", "variant_id", "warehouse_id", "stock_id", "shard_hash", "on_hand",
                         "reserved", "status", "version"])
        await conn.execute("ANALYZE stocks")
    finally:
        await conn.close()
    return time.monotonic() - t


async def seed_lines(dsn: str, org: str, lines_per_stock: int, expires_sql: str, like: str = "%",
                     order_by: str = "g, s.variant_id", bump_reserved: bool = False) -> tuple[int, float]:
    """Open reservation lines (and headers) for every stock of `org` whose variant matches `like`.

    `expires_sql` is an SQL expression of `k` (the line's 0-based ordinal in `order_by` order)
    and `n` (the number of lines), e.g. "now() + interval '1 day'" or
    "to_timestamp(1764316800 + 60.0 * k / n)". The stocks' `reserved` must already count them
    (seed_stocks(reserved=lines_per_stock)), or `bump_reserved` adds them. Returns (lines, seconds).
    The ids are as long as the service's: reservation and order ids are uuids (36 characters), the
    items hash 24 hex digits (resident memory grows with them).
    """
    t = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            if bump_reserved:
                await conn.execute("UPDATE stocks SET reserved = reserved + $3 WHERE organization_id = $1"
                                   " AND variant_id LIKE $2", org, like, lines_per_stock)
            n = int(await conn.fetchval(
                "SELECT count(*) FROM stocks WHERE organization_id = $1 AND variant_id LIKE $2", org, like))
            n *= lines_per_stock
            await conn.execute(f"""
                INSERT INTO reservation_lines (reservation_id, organization_id, variant_id, warehouse_id, shard_hash,
                                               order_id, quantity, expires_at, items_hash, status)
                SELECT md5('r/' || tag)::uuid::text, organization_id, variant_id, warehouse_id, shard_hash,
                       md5('o/' || tag)::uuid::text, 1, {expires_sql}, left(md5('h/' || tag), 24), 'active'
                FROM (SELECT s.variant_id || '/' || g AS tag, s.organization_id, s.variant_id,
                             s.warehouse_id, s.shard_hash,
                             (row_number() OVER (ORDER BY {order_by}) - 1)::float8 AS k, $2::float8 AS n
                      FROM stocks s, generate_series(1, $3) AS g
                      WHERE s.organization_id = $1 AND s.variant_id LIKE $4) AS x
                """, org, float(n), lines_per_stock, like)
            await conn.execute("""
                INSERT INTO reservations (reservation_id, organization_id, order_id, items_hash, expires_at,
                                          status, open_lines)
                SELECT reservation_id, organization_id, order_id, items_hash, expires_at, 'active', 1
                FROM reservation_lines WHERE organization_id = $1 AND variant_id LIKE $2
                ON CONFLICT (organization_id, reservation_id) DO NOTHING
                """, org, like)
        await conn.execute("ANALYZE reservation_lines")
        await conn.execute("ANALYZE reservations")
    finally:
        await conn.close()
    log(f"  seeded {n:,} open reservation lines and headers in {time.monotonic() - t:.1f} s")
    return n, time.monotonic() - t


async def clear_lines(dsn: str, org: str) -> float:
    """Remove every seeded reservation and set `reserved` back to 0."""
    t = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("DELETE FROM reservation_lines WHERE organization_id = $1", org)
            await conn.execute("DELETE FROM reservations WHERE organization_id = $1", org)
            await conn.execute("UPDATE stocks SET reserved = 0 WHERE organization_id = $1 AND reserved <> 0", org)
        await conn.execute("VACUUM ANALYZE reservation_lines")
    finally:
        await conn.close()
    return time.monotonic() - t


async def counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "stocks": int(await conn.fetchval("SELECT count(*) FROM stocks")),
            "open_lines": int(await conn.fetchval(
                "SELECT count(*) FROM reservation_lines WHERE status IN ('active', 'confirmed')")),
        }
    finally:
        await conn.close()
