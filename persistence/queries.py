"""The gateway's own reads and writes: warehouses, reservation lookup, the ledger.

Stock snapshots are never written here: only the owning shard writes them. Every query
filters by organization_id, so one organization can never see another's rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from persistence import session


@dataclass(frozen=True)
class WarehouseRow:
    organization_id: str
    warehouse_id: str
    name: str
    active: bool


@dataclass(frozen=True)
class LineRow:
    variant_id: str
    warehouse_id: str
    quantity: int
    status: str


@dataclass(frozen=True)
class MovementRow:
    movement_id: int
    organization_id: str
    variant_id: str
    warehouse_id: str
    type: str
    on_hand_delta: int
    reserved_delta: int
    in_transit_delta: int
    reason: str
    reference_id: str
    source: str
    version: int
    occurred_at: datetime


GATEWAY_COMMAND_TIMEOUT = 60.0
"""Seconds a gateway query may take (a Postgres that stops answering must not hold calls forever)."""


async def create_pool(dsn: str, size: int = 8) -> asyncpg.Pool:
    # reset=None is asyncpg's default reset (since 0.30): a query on release that also lets go
    # of advisory locks. purchase_order_lock relies on it when a wait is cancelled after the
    # lock was granted: a no-op reset here would leak that lock.
    return await asyncpg.create_pool(  # type: ignore[no-any-return]
        dsn, min_size=1, max_size=size, reset=None, command_timeout=GATEWAY_COMMAND_TIMEOUT,
        server_settings=session.settings(dsn, "inventory-gateway"))


async def upsert_warehouse(pool: asyncpg.Pool, w: WarehouseRow) -> tuple[WarehouseRow, float]:
    """The row as written, and when (the clock when the row was written, after its row lock:
    of two upserts of one warehouse the one committed later has the later time, which now()
    does not promise): shards keep the latest state by it (SetWarehouseActive.as_of)."""
    row = await pool.fetchrow(
        """INSERT INTO warehouses (organization_id, warehouse_id, name, active, updated_at)
           VALUES ($1, $2, $3, $4, clock_timestamp())
           ON CONFLICT (organization_id, warehouse_id) DO UPDATE
           SET name = EXCLUDED.name, active = EXCLUDED.active, updated_at = clock_timestamp()
           RETURNING organization_id, warehouse_id, name, active, extract(epoch FROM updated_at)::float8""",
        w.organization_id, w.warehouse_id, w.name, w.active,
    )
    return WarehouseRow(*row[:4]), float(row[4])


async def list_warehouses(pool: asyncpg.Pool, organization_id: str) -> list[WarehouseRow]:
    rows = await pool.fetch(
        "SELECT organization_id, warehouse_id, name, active FROM warehouses"
        " WHERE organization_id = $1 ORDER BY warehouse_id", organization_id)
    return [WarehouseRow(*r) for r in rows]


async def mark_cancelled(pool: asyncpg.Pool, organization_id: str, reservation_id: str, order_id: str) -> bool:
    """Leave the header of a reservation cancelled before it was made, so that shards refuse to
    make it later (a ReserveStock or an order.placed behind the cancellation). False: the header
    has open lines (made meanwhile: release them). The shards' header write and this one meet
    on the header's key, so one of the two sees the other."""
    row = await pool.fetchval(
        """INSERT INTO reservations (reservation_id, organization_id, order_id, items_hash, expires_at, status,
                                     open_lines)
           VALUES ($2, $1, $3, '', now(), 'cancelled', 0)
           ON CONFLICT (organization_id, reservation_id) DO UPDATE SET status = 'cancelled', updated_at = now()
           WHERE reservations.open_lines = 0
           RETURNING 1""", organization_id, reservation_id, order_id)
    return row is not None


async def reservation_lines(pool: asyncpg.Pool, organization_id: str, reservation_id: str) -> list[LineRow]:
    rows = await pool.fetch(
        "SELECT variant_id, warehouse_id, quantity, status FROM reservation_lines"
        " WHERE organization_id = $1 AND reservation_id = $2", organization_id, reservation_id)
    return [LineRow(*r) for r in rows]


PURCHASE_LOCK_NAMESPACE = 0x1A7F  # pg_advisory_lock(namespace, hashtext(org:purchase order)); shards: 0x1A7E


@asynccontextmanager
async def purchase_order_lock(pool: asyncpg.Pool, organization_id: str,
                              purchase_order_id: str) -> AsyncIterator[asyncpg.Connection]:
    """One purchase order at a time, across gateways: a session lock on a pooled connection,
    held while the caller reads the order's ledger and makes its movements. A session lock,
    not a transaction's: an open transaction would hold its reads' table locks while the
    caller waits for shards (a migration's DDL would queue behind them, and every shard's
    writes behind the DDL). The lock always goes: unlocked, or its session ended."""
    async with pool.acquire() as conn:
        key = f"{organization_id}:{purchase_order_id}"
        await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", PURCHASE_LOCK_NAMESPACE, key)
        try:
            yield conn
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", PURCHASE_LOCK_NAMESPACE, key)
            except BaseException:
                conn.terminate()  # (the pool replaces it): never back in the pool with the lock
                raise


@dataclass(frozen=True)
class PurchaseProgress:
    """Where one purchase order's variant stands in one warehouse, from its ledger rows."""

    in_transit: int  # what the order has in in_transit now: what its receipts may take out of it
    received_beyond: int  # received units that did not come out of in_transit: its late
    # `purchase_order.created` must not put them in transit


async def purchase_progress(conn: asyncpg.Pool | asyncpg.Connection, organization_id: str, purchase_order_id: str,
                            variant_id: str, warehouse_id: str) -> PurchaseProgress:
    """(Migration 009's index.)"""
    row = await conn.fetchrow(
        "SELECT coalesce(sum(in_transit_delta), 0),"
        " coalesce(sum(on_hand_delta + in_transit_delta) FILTER (WHERE type = 'purchase_received'), 0)"
        " FROM movements WHERE organization_id = $1 AND reference_id = $2"
        " AND type IN ('purchase_ordered', 'purchase_received') AND variant_id = $3 AND warehouse_id = $4",
        organization_id, purchase_order_id, variant_id, warehouse_id)
    return PurchaseProgress(max(int(row[0]), 0), int(row[1]))


async def record_purchase(pool: asyncpg.Pool | asyncpg.Connection, organization_id: str, purchase_order_id: str, warehouse_id: str,
                          variant_ids: list[str], supplier_id: str, at: datetime | None, *, received: bool) -> None:
    """The purchase history behind reorder_needed's supplier and lead time (migration 008): a
    created order sets `ordered_at` (and its supplier), the first receipt sets `received_at`.
    Idempotent: a replay or a later receipt changes nothing; a supplier given once is kept."""
    column = "received_at" if received else "ordered_at"
    await pool.execute(
        f"""INSERT INTO purchase_order_lines AS p (organization_id, purchase_order_id, variant_id, warehouse_id,
                                                  supplier_id, {column})
            SELECT $1, $2, v, $3, $5, coalesce($6, now()) FROM unnest($4::text[]) AS v
            ON CONFLICT (organization_id, purchase_order_id, variant_id, warehouse_id) DO UPDATE
            SET supplier_id = CASE WHEN excluded.supplier_id <> '' THEN excluded.supplier_id ELSE p.supplier_id END,
                {column} = coalesce(p.{column}, excluded.{column})""",
        organization_id, purchase_order_id, warehouse_id, variant_ids, supplier_id, at)


LEAD_TIME_SAMPLE = 10  # the latest received purchase orders that make a stock's average lead time


async def supplier_history(conn: asyncpg.Connection, organization_id: str, variant_id: str,
                           warehouse_id: str) -> tuple[str | None, int | None]:
    """(the supplier of the stock's latest purchase order that names one, the average days from
    order to first receipt over its latest LEAD_TIME_SAMPLE received orders), each None if unknown."""
    row = await conn.fetchrow(
        """SELECT (SELECT supplier_id FROM purchase_order_lines
                   WHERE organization_id = $1 AND variant_id = $2 AND warehouse_id = $3 AND supplier_id <> ''
                   ORDER BY ordered_at DESC NULLS LAST LIMIT 1),
                  (SELECT round(avg(greatest(extract(epoch FROM received_at - ordered_at), 0)) / 86400)::int
                   FROM (SELECT received_at, ordered_at FROM purchase_order_lines
                         WHERE organization_id = $1 AND variant_id = $2 AND warehouse_id = $3
                           AND ordered_at IS NOT NULL AND received_at IS NOT NULL
                         ORDER BY ordered_at DESC LIMIT $4) AS latest)""",
        organization_id, variant_id, warehouse_id, LEAD_TIME_SAMPLE)
    return row[0], row[1]


async def transfer_in_transit(pool: asyncpg.Pool, organization_id: str,
                              transfer_id: str) -> tuple[str, str, int] | None:
    """(variant_id, destination warehouse_id, quantity) of a shipped transfer."""
    row = await pool.fetchrow(
        "SELECT variant_id, warehouse_id, in_transit_delta FROM movements"
        " WHERE organization_id = $1 AND reference_id = $2 AND type = 'transfer_in_transit'"
        " ORDER BY movement_id LIMIT 1", organization_id, transfer_id)
    return (row[0], row[1], row[2]) if row else None


async def list_movements(pool: asyncpg.Pool, organization_id: str, variant_id: str, warehouse_id: str,
                         limit: int, before_id: int | None) -> list[MovementRow]:
    rows = await pool.fetch(
        """SELECT movement_id, organization_id, variant_id, warehouse_id, type, on_hand_delta, reserved_delta,
                  in_transit_delta, reason, reference_id, source, version, occurred_at
           FROM movements
           WHERE organization_id = $1 AND variant_id = $2 AND ($3 = '' OR warehouse_id = $3)
             AND ($4::bigint IS NULL OR movement_id < $4)
           ORDER BY movement_id DESC LIMIT $5""",
        organization_id, variant_id, warehouse_id, before_id, limit)
    return [MovementRow(*r) for r in rows]


# ---------------------------------------------------------------- the overdue-reservation sweep (gateway/sweep.py)


@dataclass(frozen=True)
class OverdueLine:
    organization_id: str
    variant_id: str
    warehouse_id: str
    reservation_id: str
    expires_at: float  # epoch seconds


async def overdue_lines(conn: asyncpg.Connection | asyncpg.Pool, grace_seconds: float,
                        limit: int) -> list[OverdueLine]:
    """Open TTL lines (status active) of every organization and shard that are past `expires_at` by more
    than `grace_seconds`, oldest first. Read only: the owning shard expires them."""
    rows = await conn.fetch(
        "SELECT organization_id, variant_id, warehouse_id, reservation_id,"
        " extract(epoch FROM expires_at)::float8 FROM reservation_lines"
        " WHERE status = 'active' AND expires_at < now() - make_interval(secs => $1)"
        " ORDER BY expires_at LIMIT $2", grace_seconds, limit)
    return [OverdueLine(*r) for r in rows]


# ---------------------------------------------------------------- read-only queries for metrics (gateway/health.py)


BACKLOG_COUNT_LIMIT = 100_000
"""The backlog is counted exactly up to here, and estimated from the unsent ids beyond."""


async def outbox_backlog(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[int, float]:
    """(unsent events, age in seconds of the oldest unsent one, 0 if none).

    Polled every few seconds by every gateway, so it must not scan a large backlog (a broker
    outage): the oldest unsent row is the first of the `outbox_unsent` index, the count stops
    at BACKLOG_COUNT_LIMIT and past it is the span of the unsent ids (an upper bound)."""
    row = await conn.fetchrow(f"""
        SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox WHERE sent_at IS NULL
                                      LIMIT {BACKLOG_COUNT_LIMIT + 1}) AS capped),
               COALESCE(EXTRACT(EPOCH FROM now() - (SELECT created_at FROM outbox WHERE sent_at IS NULL
                                                    ORDER BY id LIMIT 1)), 0)::float8,
               (SELECT max(id) FROM outbox WHERE sent_at IS NULL)
               - (SELECT min(id) FROM outbox WHERE sent_at IS NULL) + 1""")
    depth = int(row[0])
    if depth > BACKLOG_COUNT_LIMIT:
        depth = max(depth, int(row[2] or 0))
    return depth, float(row[1])


async def outbox_high_water(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    return int(await conn.fetchval("SELECT COALESCE(max(id), 0) FROM outbox"))


async def outbox_events_since(conn: asyncpg.Connection | asyncpg.Pool, after_id: int,
                              event_name: str) -> tuple[int, int]:
    """(how many `event_name` rows have an id above `after_id`, the highest id seen) for a counter."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE event_name = $2), COALESCE(max(id), $1) FROM outbox WHERE id > $1",
        after_id, event_name)
    return int(row[0]), int(row[1])


# ---------------------------------------------------------------- the outbox relay and the event inbox (gateway/relay.py, events.py)


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    event_id: str
    event_name: str
    payload: str  # the envelope as JSON text, published as is


async def warehouse_name(conn: asyncpg.Connection, organization_id: str, warehouse_id: str) -> str | None:
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT name FROM warehouses WHERE organization_id = $1 AND warehouse_id = $2", organization_id, warehouse_id)


async def outbox_unsent(conn: asyncpg.Connection, limit: int) -> list[OutboxEntry]:
    """The oldest unsent rows in id order (per stock, id order is commit order: one shard writes a stock)."""
    rows = await conn.fetch(
        "SELECT id, event_id::text, event_name, payload::text FROM outbox WHERE sent_at IS NULL"
        " ORDER BY id LIMIT $1", limit)
    return [OutboxEntry(*r) for r in rows]


async def outbox_mark_sent(conn: asyncpg.Connection, ids: list[int]) -> None:
    await conn.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[]) AND sent_at IS NULL", ids)


async def outbox_insert_once(conn: asyncpg.Connection | asyncpg.Pool, event_id: str, event_name: str,
                             organization_id: str, payload: str) -> bool:
    """Insert an outbox row unless one with this event_id exists; True if inserted."""
    status = await conn.execute(
        "INSERT INTO outbox (event_id, event_name, organization_id, payload) VALUES ($1::uuid, $2, $3, $4::jsonb)"
        " ON CONFLICT (event_id) DO NOTHING", event_id, event_name, organization_id, payload)
    return bool(status.endswith(" 1"))


async def inbox_claim(pool: asyncpg.Pool, queue: str, key: str, organization_id: str,
                      lease_seconds: float) -> str:
    """Claim an incoming message's key: 'claimed', 'done' (a duplicate) or 'busy' (another consumer has it)."""
    claimed = await pool.fetchval(
        """INSERT INTO inbox (queue, message_key, organization_id, status, claimed_until)
           VALUES ($1, $2, $3, 'processing', now() + make_interval(secs => $4))
           ON CONFLICT (queue, message_key) DO UPDATE SET claimed_until = EXCLUDED.claimed_until
           WHERE inbox.status = 'processing' AND inbox.claimed_until < now()
           RETURNING true""", queue, key, organization_id, lease_seconds)
    if claimed:
        return "claimed"
    status = await pool.fetchval("SELECT status FROM inbox WHERE queue = $1 AND message_key = $2", queue, key)
    return "done" if status == "done" else "busy"


async def inbox_done(pool: asyncpg.Pool, queue: str, key: str, outcome: str) -> None:
    await pool.execute(
        "UPDATE inbox SET status = 'done', outcome = $3, processed_at = now(), claimed_until = NULL"
        " WHERE queue = $1 AND message_key = $2", queue, key, outcome)


async def inbox_release(pool: asyncpg.Pool, queue: str, key: str) -> None:
    """Give a claim back after a failure, so the retried delivery may claim it at once."""
    await pool.execute("DELETE FROM inbox WHERE queue = $1 AND message_key = $2 AND status = 'processing'",
                       queue, key)


async def inbox_prune(pool: asyncpg.Pool, older_than_seconds: float) -> int:
    status = await pool.execute(
        "DELETE FROM inbox WHERE status = 'done' AND processed_at < now() - make_interval(secs => $1)",
        older_than_seconds)
    return int(status.split()[-1])


async def outbox_prune(conn: asyncpg.Connection, older_than_seconds: float, limit: int = 10_000) -> int:
    """Forget published rows older than the retention, `limit` at a time (the relay calls it hourly)."""
    status = await conn.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sent_at < now() - make_interval(secs => $1)"
        " ORDER BY id LIMIT $2)", older_than_seconds, limit)
    return int(status.split()[-1])
