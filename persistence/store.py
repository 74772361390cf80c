"""The shard's store: activation reads and the one-transaction commit of a batch.

A shard is the single writer of its keys. It holds a session-level advisory lock for
its shard id on its own connection for as long as it serves (`connect` refuses to
return without it), and every snapshot update is guarded by the version it read, so
two incarnations of one shard can never both commit.

`commit` writes a whole batch as one statement: a data-modifying CTE per table, each a
multi-row insert or update over arrays (`unnest`), never a statement per row, and one
round trip to Postgres per batch (two when it expires a reservation). The same statement
checks that the reservations the shard took for new were not closed before (`unseen`),
so a batch of new reservations needs no read first.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from sys import intern

import asyncpg
import msgspec

from actors.keys import shard_hash, stock_id
from actors.messages import (
    NOTIFICATIONS,
    Event,
    PolicyChanged,
    ReservationAborted,
    ReservationConfirmed,
    ReservationExpired,
    ReservationReleased,
    ReservationShipped,
    StockArchived,
    StockCreated,
    StockKey,
    StockMoved,
    StockReserved,
    ThresholdCrossed,
)
from actors.stock import (
    HEAP_FROM,
    Line,
    PriorLine,
    PriorReservation,
    StockState,
    prior_of,
    recompute_next_expiry,
)
from persistence import outbox, session

log = logging.getLogger("inventory.store")

SHARD_LOCK_NAMESPACE = 0x1A7E  # pg_advisory_lock(namespace, shard_id); purchase orders: queries.PURCHASE_LOCK_NAMESPACE
_OWN_SESSION_START = "(SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())"
# Other sessions holding the advisory lock ($1, $2) in this database (advisory locks are per
# database): the condition on `pg_locks l` of both queries below.
_HELD_BY_OTHERS = ("l.locktype = 'advisory' AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 2 AND l.granted"
                   " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                   " AND l.pid <> pg_backend_pid()")
_LOCK_HOLDERS = f"SELECT pid, application_name FROM pg_locks l JOIN pg_stat_activity USING (pid) WHERE {_HELD_BY_OTHERS}"

# The shard's session plans every prepared statement once (a generic plan) and only as
# index lookups. By default Postgres plans a statement afresh at every execution while a
# fresh plan is estimated cheaper than the generic one, and over arrays of a few elements it
# always is: a batch of one reservation cost Postgres about 700 µs of CPU, half of it planning
# the batch statement (350 µs with generic plans; batches of 14 and more had generic plans
# already). A generic plan is kept until ANALYZE changes a table's statistics, and planned on
# young tables it was a hash join over a sequential scan of the whole table, kept as the table
# grew. Every statement of the shard but one finds its rows through an index for each element
# of its arrays; with sequential scans and hash and merge joins off, that is the plan whatever
# the tables' size when it is made (tests/actors/test_shard.py plans them on a new database).
# The one other, the timer window read at a start (`load_due`), is a range whose size only its
# values tell: it is planned afresh with Postgres's defaults (`_DUE_PLANNING`).
_SHARD_SESSION = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off", "enable_hashjoin": "off",
                  "enable_mergejoin": "off"}
POSTGRES_PLANNING = {"plan_cache_mode": "auto", "enable_seqscan": "on", "enable_hashjoin": "on",
                     "enable_mergejoin": "on"}  # Postgres's own defaults of the same settings


def set_planning(settings: dict[str, str], scope: str = "") -> str:
    """The SET statements for `settings` (`scope` "LOCAL": for the transaction). Not RESET or
    DEFAULT: those return to the values the connection was opened with, the shard's own."""
    verb = f"SET {scope} " if scope else "SET "
    return "; ".join(f"{verb}{name} = {value}" for name, value in settings.items())


_DUE_PLANNING = set_planning({**POSTGRES_PLANNING, "plan_cache_mode": "force_custom_plan"}, "LOCAL")


class ShardLockHeld(Exception):
    """Another incarnation of this shard holds its lock: this one must not serve."""


class Superseded(ShardLockHeld):
    """A newer incarnation of this shard has started since this one: this one must stop."""


RECONNECT_TAKE_OVER_WAIT = 1.5  # seconds a reconnecting shard waits for a stale holder's session to end


class StaleVersion(Exception):
    """A snapshot changed under us: another writer exists. The batch is rolled back."""


class ClosedReservationRetried(Exception):
    """A reservation the batch took for new is one Postgres knows closed (a retry after its
    release, expiry or shipment). The batch is rolled back; decide it again with its priors."""


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


# ---------------------------------------------------------------- the write of one batch


Unseen = tuple[str, str, str, str]
"""A ReserveStock the shard took for new: (organization, reservation, items hash, one of its variants)."""


@dataclass
class BatchWrite:
    """Rows of one batch, coalesced so each primary key appears once per statement."""

    now: float
    new_stocks: list[StockState] = field(default_factory=list)
    changed_stocks: list[tuple[StockState, int]] = field(default_factory=list)  # (state, version read)
    movements: list[tuple[StockKey, str, int, int, int, str, str, str, int]] = field(default_factory=list)
    new_lines: dict[tuple[str, StockKey], list[object]] = field(default_factory=dict)
    line_status: dict[tuple[str, StockKey], str] = field(default_factory=dict)
    deleted_lines: list[tuple[str, StockKey]] = field(default_factory=list)
    opened: dict[str, list[object]] = field(default_factory=dict)  # rid -> header row; open delta
    closed: dict[str, list[object]] = field(default_factory=dict)  # rid -> [org, open delta, status]
    events: list[outbox.OutboxRow] = field(default_factory=list)
    replies: list[tuple[str, str, bytes]] = field(default_factory=list)
    # (organization, reservation) decided as never seen, without looking in Postgres: the
    # statement fails (ClosedReservationRetried) if Postgres knows one of them closed
    unseen: Sequence[Unseen] = ()

    def __bool__(self) -> bool:
        return bool(self.new_stocks or self.changed_stocks or self.events or self.replies)


def build_write(
    now: float,
    events: Sequence[tuple[StockKey, Event]],
    before: dict[StockKey, int | None],
    after: dict[StockKey, StockState],
    replies: Iterable[tuple[str, str, bytes]] = (),
) -> BatchWrite:
    """Turn a batch's events into rows.

    `before` maps each touched key to its committed version (None: created in this batch),
    `after` to its state once every event of the batch is applied.
    """
    w = BatchWrite(now=now, replies=list(replies))
    version = {k: (v or 0) for k, v in before.items()}
    for key, event in events:
        if isinstance(event, ThresholdCrossed):
            w.events.append(outbox.threshold(key, event, after[key], now))
            continue
        if isinstance(event, NOTIFICATIONS):
            w.events.append(outbox.notification(key, event, now))
            continue
        version[key] += 1
        _record(w, key, event, version[key])
    for key, state in after.items():
        read = before.get(key)
        if read is None:
            w.new_stocks.append(state)
        elif state.version != read:
            w.changed_stocks.append((state, read))
        else:
            continue
        w.events.append(outbox.stock_updated(key, state, now))
    w.events.extend(outbox.released(events, now))
    w.events.extend(outbox.movements(events, after, now))
    return w


def _record(w: BatchWrite, key: StockKey, event: Event, version: int) -> None:
    mv = w.movements
    if isinstance(event, StockReserved):
        rid = event.reservation_id
        mv.append((key, "reserve", 0, event.quantity, 0, "", rid, "", version))
        w.new_lines[(rid, key)] = [rid, key, event.order_id, event.quantity, event.expires_at,
                                   event.items_hash, "active"]
        header = w.opened.get(rid)
        if header is None:
            w.opened[rid] = [rid, key[0], event.order_id, event.items_hash, event.expires_at, 1, "active"]
        else:
            header[5] = int(header[5]) + 1  # type: ignore[call-overload]
        return
    if isinstance(event, ReservationConfirmed):
        mv.append((key, "confirm", 0, 0, 0, "", event.reservation_id, "", version))
        _line_status(w, key, event.reservation_id, "confirmed", close=False)
    elif isinstance(event, ReservationReleased):
        mv.append((key, "release", 0, -event.quantity, 0, event.reason, event.reservation_id, "", version))
        _line_status(w, key, event.reservation_id, "released", close=True)
    elif isinstance(event, ReservationExpired):
        mv.append((key, "expire", 0, -event.quantity, 0, "", event.reservation_id, "", version))
        _line_status(w, key, event.reservation_id, "expired", close=True)
    elif isinstance(event, ReservationShipped):
        mv.append((key, "ship", -event.quantity, -event.quantity, 0, "", event.reservation_id, "", version))
        _line_status(w, key, event.reservation_id, "shipped", close=True)
    elif isinstance(event, ReservationAborted):
        rid = event.reservation_id
        mv.append((key, "abort", 0, -event.quantity, 0, "", rid, "", version))
        if w.new_lines.pop((rid, key), None) is None:
            w.deleted_lines.append((rid, key))
        _close_header(w, key[0], rid, "aborted")
    elif isinstance(event, StockMoved):
        mv.append((key, event.kind, event.on_hand_delta, 0, event.in_transit_delta, event.reason,
                   event.reference_id, event.source, version))
    elif isinstance(event, PolicyChanged):
        mv.append((key, "policy", 0, 0, 0, "", "", "", version))
    elif isinstance(event, StockCreated):
        mv.append((key, "created", 0, 0, 0, "", "", "", version))
    elif isinstance(event, StockArchived):
        mv.append((key, "archive", 0, 0, 0, "variant deleted in catalog", "", "", version))


def _line_status(w: BatchWrite, key: StockKey, rid: str, status: str, close: bool) -> None:
    row = w.new_lines.get((rid, key))
    if row is not None:
        row[6] = status
    else:
        w.line_status[(rid, key)] = status
    _close_header(w, key[0], rid, status, -1 if close else 0)


def _close_header(w: BatchWrite, org: str, rid: str, status: str, delta: int = -1) -> None:
    """Count `delta` lines closed on the reservation's header and set its status."""
    header = w.opened.get(rid)
    if header is None:
        header = w.closed.setdefault(rid, [org, 0, status])
        header[1] = int(header[1]) + delta  # type: ignore[call-overload]
        header[2] = status
    else:
        header[5] = int(header[5]) + delta  # type: ignore[call-overload]
        header[6] = status


# ---------------------------------------------------------------- SQL

# The reads by a list of keys are written as one index lookup per key (a LATERAL subquery
# that OFFSET 0 keeps from being flattened into a join). As joins, asyncpg's prepared
# statements got generic plans while their tables were young and small: a hash join over a
# sequential scan of the whole table, kept as the table grew (the check of a batch's new
# reservations scanned 10,000 lines, 2.4 ms of a hot stock's 8 ms batch, until autovacuum's
# next ANALYZE).
_LOAD_STOCKS = """
SELECT s.organization_id, s.variant_id, s.warehouse_id, s.on_hand, s.reserved, s.in_transit,
       s.min_stock, s.max_stock, s.reorder_point, s.status, s.version, coalesce(w.active, true) AS wh_active
FROM unnest($1::text[], $2::text[]) AS u(o, v)
CROSS JOIN LATERAL (SELECT * FROM stocks s WHERE s.organization_id = u.o AND s.variant_id = u.v OFFSET 0) s
LEFT JOIN warehouses w ON w.organization_id = s.organization_id AND w.warehouse_id = s.warehouse_id
"""

_LOAD_LINES = """
SELECT l.organization_id, l.variant_id, l.warehouse_id, l.reservation_id, l.order_id, l.quantity,
       extract(epoch FROM l.expires_at)::float8 AS expires_at, l.items_hash, l.status
FROM unnest($1::text[], $2::text[]) AS u(o, v)
CROSS JOIN LATERAL (SELECT * FROM reservation_lines l WHERE l.organization_id = u.o AND l.variant_id = u.v
                    AND l.status IN ('active', 'confirmed') OFFSET 0) l
"""

# The lines of these reservations, and a row with status 'cancelled' and no variant for each
# whose order was cancelled before anything was reserved (queries.mark_cancelled).
_LOAD_PRIORS = """
SELECT l.organization_id, l.reservation_id, l.variant_id, l.warehouse_id, l.quantity, l.status,
       l.items_hash, extract(epoch FROM l.expires_at)::float8 AS expires_at
FROM unnest($1::text[], $2::text[]) AS u(o, r)
CROSS JOIN LATERAL (SELECT * FROM reservation_lines l WHERE l.organization_id = u.o AND l.reservation_id = u.r
                    OFFSET 0) l
UNION ALL
SELECT h.organization_id, h.reservation_id, NULL, NULL, NULL, 'cancelled', NULL, NULL
FROM unnest($1::text[], $2::text[]) AS u(o, r)
CROSS JOIN LATERAL (SELECT * FROM reservations h WHERE h.organization_id = u.o AND h.reservation_id = u.r
                    AND h.status = 'cancelled' OFFSET 0) h
"""

# The reservations a shard took for new ($1 organization, $2 reservation, $3 items hash, one
# row per variant $4 of the command's lines here) that are not: Postgres has a line of the
# reservation with other items (the same order asked again with other items: a conflict), a
# line on one of these variants (this shard's part, closed since it is not open in memory:
# a retry after release, expiry or shipment), or lines all closed (a retry of a reservation
# closed everywhere). Open lines elsewhere, with the same items, are another shard's part.
# `prior_of` applies the same rule to the rows of _LOAD_PRIORS.
_SEEN_BEFORE = """
SELECT 1 FROM unnest($1::text[], $2::text[], $4::text[]) AS u(o, r, v)
WHERE EXISTS (SELECT 1 FROM reservation_lines l
              WHERE l.reservation_id = u.r AND l.organization_id = u.o AND l.variant_id = u.v)
UNION ALL
SELECT 1 FROM (SELECT DISTINCT o, r, h FROM unnest($1::text[], $2::text[], $3::text[]) AS x(o, r, h)) u
WHERE (SELECT bool_or(l.items_hash <> u.h) OR bool_and(l.status NOT IN ('active', 'confirmed'))
       FROM reservation_lines l WHERE l.organization_id = u.o AND l.reservation_id = u.r)
   OR EXISTS (SELECT 1 FROM reservations h WHERE h.organization_id = u.o AND h.reservation_id = u.r
              AND h.status = 'cancelled')
"""

_LOAD_DUE = """
SELECT extract(epoch FROM min(expires_at))::float8 AS expires_at, organization_id, variant_id
FROM reservation_lines
WHERE status = 'active' AND expires_at >= to_timestamp($3) AND expires_at < to_timestamp($4)
  AND shard_hash % $2 = $1
GROUP BY organization_id, variant_id
"""

_DUE_CHUNK = 20_000
START_READ_TIMEOUT = 600.0  # seconds for each read of the timers due at a start (ShardCore.start)

_LOAD_REPLIES = """
SELECT i.organization_id, i.key, i.reply
FROM unnest($1::text[], $2::text[]) AS u(o, k)
CROSS JOIN LATERAL (SELECT * FROM idempotency i WHERE i.organization_id = u.o AND i.key = u.k OFFSET 0) i
"""

_INSERT_STOCKS = """
INSERT INTO stocks (organization_id, variant_id, warehouse_id, stock_id, shard_hash, on_hand, reserved,
                    in_transit, min_stock, max_stock, reorder_point, status, version)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::int8[], $6::int4[], $7::int4[],
                     $8::int4[], $9::int4[], $10::int4[], $11::int4[], $12::text[], $13::int8[])
ON CONFLICT DO NOTHING
"""

_UPDATE_STOCKS = """
UPDATE stocks s SET on_hand = u.on_hand, reserved = u.reserved, in_transit = u.in_transit,
       min_stock = u.min_stock, max_stock = u.max_stock, reorder_point = u.reorder_point,
       status = u.status, version = u.version, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int4[], $6::int4[], $7::int4[], $8::int4[],
            $9::int4[], $10::text[], $11::int8[], $12::int8[])
     AS u(o, v, w, on_hand, reserved, in_transit, min_stock, max_stock, reorder_point, status, version, read)
WHERE s.organization_id = u.o AND s.variant_id = u.v AND s.warehouse_id = u.w AND s.version = u.read
"""

_INSERT_MOVEMENTS = """
INSERT INTO movements (organization_id, variant_id, warehouse_id, type, on_hand_delta, reserved_delta,
                       in_transit_delta, reason, reference_id, source, version, occurred_at)
SELECT o, v, w, t, a, b, c, r, ref, src, ver, $12
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int4[], $7::int4[], $8::text[],
            $9::text[], $10::text[], $11::int8[]) AS u(o, v, w, t, a, b, c, r, ref, src, ver)
"""

_UPSERT_LINES = """
INSERT INTO reservation_lines (reservation_id, organization_id, variant_id, warehouse_id, shard_hash, order_id,
                               quantity, expires_at, items_hash, status)
SELECT rid, o, v, w, h, ord, q, to_timestamp(e), ih, st
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::int4[], $8::float8[],
            $9::text[], $10::text[]) AS u(rid, o, v, w, h, ord, q, e, ih, st)
ON CONFLICT (reservation_id, organization_id, variant_id, warehouse_id) DO UPDATE
SET order_id = EXCLUDED.order_id, quantity = EXCLUDED.quantity, expires_at = EXCLUDED.expires_at,
    items_hash = EXCLUDED.items_hash, status = EXCLUDED.status, updated_at = now()
"""

_UPDATE_LINES = """
UPDATE reservation_lines l SET status = u.st, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(rid, o, v, w, st)
WHERE l.reservation_id = u.rid AND l.organization_id = u.o AND l.variant_id = u.v AND l.warehouse_id = u.w
"""

_DELETE_LINES = """
DELETE FROM reservation_lines l
USING unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(rid, o, v, w)
WHERE l.reservation_id = u.rid AND l.organization_id = u.o AND l.variant_id = u.v AND l.warehouse_id = u.w
"""

# A header an order.cancelled left (status 'cancelled', no lines: see queries.mark_cancelled)
# is never opened again: the part then returns fewer rows than it has, and the statement fails
# as when it finds a closed reservation taken for new (a cancellation committed between this
# statement's snapshot and its write); the shard decides again, with the cancellation.
_UPSERT_HEADERS = """
INSERT INTO reservations (reservation_id, organization_id, order_id, items_hash, expires_at, status, open_lines)
SELECT rid, o, ord, ih, to_timestamp(e), st, n
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::int4[])
     AS u(rid, o, ord, ih, e, st, n)
ON CONFLICT (organization_id, reservation_id) DO UPDATE
SET open_lines = reservations.open_lines + EXCLUDED.open_lines, status = EXCLUDED.status,
    items_hash = EXCLUDED.items_hash, expires_at = EXCLUDED.expires_at, updated_at = now()
WHERE reservations.status <> 'cancelled'
"""

_CLOSE_HEADERS = """
UPDATE reservations r SET open_lines = r.open_lines + u.n, status = u.st, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::int4[], $4::text[]) AS u(rid, o, n, st)
WHERE r.reservation_id = u.rid AND r.organization_id = u.o
RETURNING r.reservation_id, r.organization_id, r.order_id, r.open_lines, r.status,
          extract(epoch FROM r.expires_at)::float8 AS expires_at
"""

_EXPIRED_LINES = """
SELECT l.organization_id, l.reservation_id, l.variant_id, l.warehouse_id, l.quantity
FROM unnest($1::text[], $2::text[]) AS u(o, r)
CROSS JOIN LATERAL (SELECT * FROM reservation_lines l WHERE l.organization_id = u.o AND l.reservation_id = u.r
                    OFFSET 0) l
ORDER BY l.reservation_id, l.variant_id, l.warehouse_id
"""

# A key already there: written meanwhile by another shard (one key used for two variants: a
# reused transfer id or idempotency key), which this statement's snapshot did not see. The
# part then returns fewer rows than it has, and the statement is decided again with the stored
# reply (`ClosedReservationRetried`, as for a retried closed reservation): refused `conflict`.
_INSERT_REPLIES = """
INSERT INTO idempotency (organization_id, key, reply)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) ON CONFLICT DO NOTHING
"""


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


def _columns(rows: Sequence[Sequence[object]], n: int) -> list[list[object]]:
    cols: list[list[object]] = [[] for _ in range(n)]
    for row in rows:
        for i in range(n):
            cols[i].append(row[i])
    return cols


class ShardStore:
    """One connection, one advisory lock, one writer."""

    # Seconds a statement may take before the batch fails (and the connection, with the lock,
    # is closed). Without it a Postgres that stops answering, connection open, held the shard
    # (and its lock, so no replacement could serve) until the kernel gave up on the connection.
    command_timeout = 15.0

    def __init__(self, dsn: str, shard_id: int, shard_count: int, lock_id: int | None = None) -> None:
        self.dsn = dsn
        self.shard_id = shard_id
        self.lock_id = shard_id if lock_id is None else lock_id
        self.shard_count = shard_count
        self.conn: asyncpg.Connection | None = None
        self.epoch: int | None = None  # this copy's epoch once it has one (see connect)
        self.token = uuid.uuid4().hex  # this copy's mark on the epochs it claims (claimed_by)

    async def connect(self, take_over: bool = False) -> None:
        """Connect and take this shard's lock. Raises ShardLockHeld if another copy serves,
        Superseded if a newer copy has started since this one.

        Epochs (migrations 010, 011): a copy starting anew (`epoch` None) moves the shard's epoch
        on and records its session as the epoch's holder, in the statement that takes the lock.
        A copy reconnecting (its `epoch`) serves on only while the epoch is still its own; then,
        if the lock is held by the session recorded for its epoch (its own old one, which
        Postgres kept after a network blip), it ends that session at once. Any other holder (a
        fresh copy about to move the epoch on, a copy of an older version) it leaves alone:
        ShardLockHeld, and it tries again later. When the epoch has moved on, it stops
        (ShardCore.superseded), even if the lock is free. Taking the lock and recording the
        holder happen in one statement: a session that holds the lock is always recorded.

        `take_over`: the shard's actor asks for it only after waiting TAKE_OVER_AFTER for the
        lock: the holder is then an orphan (its registrar died: a leader restarted) or stuck.
        The copy moves the epoch on first (kept even if what follows fails, so an older copy
        reconnecting meanwhile stops instead of fighting), then ends the holder's session:
        fencing allows it, without the lock the holder can commit nothing again."""
        await self.close()
        name = f"inventory-shard-{self.shard_id}"
        if self.lock_id != self.shard_id:  # (tests and benches: a lock of their own)
            name += f"-lock-{self.lock_id}"
        conn = await asyncpg.connect(self.dsn, statement_cache_size=256, command_timeout=self.command_timeout,
                                     timeout=self.command_timeout,
                                     server_settings=session.settings(self.dsn, name, **_SHARD_SESSION))
        try:
            await self._check_epoch(conn)
            if self.epoch is None:
                got = await self._lock_as_new(conn)
            else:
                got = await self._lock_as(conn) or await self._end_own_stale_session(conn)
            if not got and take_over:
                self.epoch = int(await conn.fetchval(
                    "INSERT INTO shard_epochs (lock_id, epoch, claimed_by) VALUES ($1, 1, $2 || ':1')"
                    " ON CONFLICT (lock_id) DO UPDATE SET epoch = shard_epochs.epoch + 1, holder_pid = NULL,"
                    " holder_start = NULL, claimed_by = $2 || ':' || (shard_epochs.epoch + 1)"
                    " RETURNING epoch", self.lock_id, self.token))
                for pid, holder in await conn.fetch(_LOCK_HOLDERS, SHARD_LOCK_NAMESPACE, self.lock_id):
                    log.warning("shard %s: ending the Postgres session %d (%s) that holds its lock",
                                self.shard_id, pid, holder)
                    await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
                got = await self._wait_for_lock(conn, 5.0)
            if not got:
                await self._check_epoch(conn)
                raise ShardLockHeld(f"shard {self.shard_id} is served by another process")
        except BaseException:
            conn.terminate()  # (and with it the lock, if taken)
            raise
        self.conn = conn

    async def _check_epoch(self, conn: asyncpg.Connection) -> None:
        """Adopt the shard's epoch if this copy claimed it (the reply to its claim may have been
        lost); raise Superseded if this copy has an epoch and it is no longer the shard's."""
        row = await conn.fetchrow("SELECT epoch, claimed_by FROM shard_epochs WHERE lock_id = $1", self.lock_id)
        # (the claim names its epoch too: a copy of an older version moves the epoch on without
        # touching claimed_by, and must not pass for this copy's claim)
        if row is not None and row["claimed_by"] == f"{self.token}:{row['epoch']}":
            self.epoch = int(row["epoch"])
        elif self.epoch is not None and (row is None or row["epoch"] != self.epoch):
            raise Superseded(f"shard {self.shard_id}: a newer copy has started (epoch > {self.epoch})")

    async def _lock_as_new(self, conn: asyncpg.Connection) -> bool:
        """Take the lock and, in the same statement, move the epoch on and record this session."""
        epoch = await conn.fetchval(
            "INSERT INTO shard_epochs AS e (lock_id, epoch, holder_pid, holder_start, claimed_by)"
            f" SELECT $1, 1, pg_backend_pid(), {_OWN_SESSION_START}, $4 || ':1'"
            " WHERE pg_try_advisory_lock($2, $3)"
            " ON CONFLICT (lock_id) DO UPDATE SET epoch = e.epoch + 1, holder_pid = excluded.holder_pid,"
            " holder_start = excluded.holder_start, claimed_by = $4 || ':' || (e.epoch + 1) RETURNING epoch",
            self.lock_id, SHARD_LOCK_NAMESPACE, self.lock_id, self.token)
        if epoch is None:
            return False
        self.epoch = int(epoch)
        return True

    async def _lock_as(self, conn: asyncpg.Connection) -> bool:
        """Take the lock as this copy's epoch's holder and record this session, in one statement;
        False if the lock is held, or the epoch is no longer this copy's. (If a newer copy's epoch
        commits while this statement waits on the row, the lock may have been taken for a row
        then skipped: let go of it at once, so that a lock holder is always recorded.)"""
        if await conn.fetchval(
                "UPDATE shard_epochs SET holder_pid = pg_backend_pid(),"
                f" holder_start = {_OWN_SESSION_START}"
                " WHERE lock_id = $1 AND CASE WHEN lock_id = $1 AND epoch = $2 THEN pg_try_advisory_lock($3, $4)"
                " ELSE false END"
                " RETURNING 1", self.lock_id, self.epoch, SHARD_LOCK_NAMESPACE, self.lock_id):
            return True
        await conn.execute("SELECT pg_advisory_unlock_all()")  # (the shard's session holds no other)
        return False

    async def _end_own_stale_session(self, conn: asyncpg.Connection) -> bool:
        """End the lock's holder if it is the session recorded for this copy's epoch, and take the lock."""
        stale = await conn.fetch(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) JOIN shard_epochs e"
            " ON e.lock_id = $4 AND e.epoch = $3 AND e.holder_pid = l.pid AND e.holder_start = a.backend_start"
            f" WHERE {_HELD_BY_OTHERS}",
            SHARD_LOCK_NAMESPACE, self.lock_id, self.epoch, self.lock_id)
        if not stale:
            return False
        for (pid,) in stale:
            log.warning("shard %s: ending its own old Postgres session %d, which still holds its lock",
                        self.shard_id, pid)
            await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        return await self._wait_for_lock(conn, RECONNECT_TAKE_OVER_WAIT)

    async def _wait_for_lock(self, conn: asyncpg.Connection, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while True:  # (a session ends, and its locks go, a moment after the signal)
            if await self._lock_as(conn):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            try:
                await self.conn.close(timeout=2)
            except Exception:  # noqa: BLE001 - a broken connection cannot close politely
                self.conn.terminate()
        self.conn = None

    def abandon(self) -> None:
        """Drop the session without a goodbye (it is gone, or stalled: closing politely would wait)."""
        if self.conn is not None and not self.conn.is_closed():
            self.conn.terminate()
        self.conn = None

    async def ping(self, timeout: float) -> None:
        """A round trip on the shard's own session (raises if the session is gone)."""
        await self._c().fetchval("SELECT 1", timeout=timeout)

    @property
    def healthy(self) -> bool:
        return self.conn is not None and not self.conn.is_closed()

    def _c(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            raise ConnectionError("shard store is not connected")
        return self.conn

    async def load_variants(self, pairs: Sequence[tuple[str, str]]) -> list[StockState]:
        """Every stock of these (organization, variant) pairs with its open reservation lines."""
        if not pairs:
            return []
        conn = self._c()
        orgs = [p[0] for p in pairs]
        variants = [p[1] for p in pairs]
        states: dict[StockKey, StockState] = {}
        for r in await conn.fetch(_LOAD_STOCKS, orgs, variants):
            key = (r[0], r[1], r[2])
            states[key] = StockState(  # ids interned: shared with the shard's keys and timers
                organization_id=intern(r[0]), variant_id=intern(r[1]), warehouse_id=intern(r[2]), on_hand=r[3],
                reserved=0, in_transit=r[5], min_stock=r[6], max_stock=r[7], reorder_point=r[8], status=intern(r[9]),
                version=r[10], warehouse_active=r[11],
            )
        lines: dict[StockKey, list[Line]] = {}
        for r in await conn.fetch(_LOAD_LINES, orgs, variants):
            key = (r[0], r[1], r[2])
            state = states.get(key)
            if state is None:
                continue
            lines.setdefault(key, []).append(Line.of(r[3], r[4], r[5], r[6], r[7], confirmed=r[8] == "confirmed"))
            state.reserved += r[5]
        for key, found in lines.items():
            states[key].lines = (tuple(found) if len(found) < HEAP_FROM
                                 else {ln.reservation_id: ln for ln in found})
        for state in states.values():
            recompute_next_expiry(state)
        return list(states.values())

    async def load_due(self, since: float, until: float, arm: Callable[[float, str, str], None],
                       timeout: float | None = None) -> int:
        """Call `arm(earliest expires_at in [since, until), org, variant)` for every variant of this
        shard with open TTL lines due then (the range uses the `reservation_lines_due` index); returns
        how many. Read through a cursor, a chunk at a time: a start with a million variants due
        would otherwise hold every row twice at once (asyncpg's records and their tuples)."""
        conn = self._c()
        count = 0
        async with conn.transaction(readonly=True):
            # after a stop, the window from 0 holds every line overdue: a scan of the whole
            # index may then be the worst plan, and only the values say so
            await conn.execute(_DUE_PLANNING)
            # `timeout` (None: the connection's): a start after a long stop may find a large
            # overdue backlog (START_READ_TIMEOUT), or the shard would never start; later windows
            # keep the statement timeout of batches
            cursor = await conn.cursor(_LOAD_DUE, self.shard_id, self.shard_count, since, until, timeout=timeout)
            while rows := await cursor.fetch(_DUE_CHUNK, timeout=timeout):
                for r in rows:
                    arm(r[0], r[1], r[2])
                count += len(rows)
        return count

    async def load_priors(self, unseen: Sequence[Unseen]) -> dict[tuple[str, str, str], PriorReservation]:
        """What is remembered of reservations not open in memory (see `prior_of`), by
        (organization, reservation, items hash): two calls for one order may differ in items."""
        if not unseen:
            return {}
        asked: dict[tuple[str, str, str], set[str]] = {}
        for org, rid, items_hash, variant in unseen:
            asked.setdefault((org, rid, items_hash), set()).add(variant)
        ids = list(dict.fromkeys((a[0], a[1]) for a in asked))
        rows = await self._c().fetch(_LOAD_PRIORS, [i[0] for i in ids], [i[1] for i in ids])
        grouped: dict[tuple[str, str], list[PriorLine]] = {}
        cancelled: set[tuple[str, str]] = set()
        for r in rows:
            if r[2] is None:  # (a cancelled header)
                cancelled.add((r[0], r[1]))
            else:
                grouped.setdefault((r[0], r[1]), []).append(PriorLine(*r[2:8]))
        priors = {}
        for (org, rid, items_hash), variants in asked.items():
            if (org, rid) in cancelled:
                priors[(org, rid, items_hash)] = PriorReservation("cancelled", items_hash, 0.0, ())
            elif (prior := prior_of(grouped.get((org, rid), []), items_hash, variants)) is not None:
                priors[(org, rid, items_hash)] = prior
        return priors

    async def load_replies(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        if not keys:
            return {}
        rows = await self._c().fetch(_LOAD_REPLIES, [k[0] for k in keys], [k[1] for k in keys])
        return {(r[0], r[1]): bytes(r[2]) for r in rows}

    async def commit(self, w: BatchWrite) -> None:
        """Write the whole batch atomically, or nothing (raises StaleVersion if another writer exists).

        One statement (one round trip, its own transaction) in the common case. A batch that
        expires the last open line of a reservation also needs the reservation's lines for
        the `reservation.expired` event: then a transaction holds both statements.
        """
        conn = self._c()
        sql, args = _batch_statement(w)
        try:
            if not any(c[2] == "expired" for c in w.closed.values()):
                await conn.fetchval(sql, *args)
                return
            async with conn.transaction():
                expired = json.loads(await conn.fetchval(sql, *args))
                if expired:
                    lines = await conn.fetch(_EXPIRED_LINES, [r["organization_id"] for r in expired],
                                             [r["reservation_id"] for r in expired])
                    await outbox.insert(conn, outbox.reservation_expired(expired, lines, w.now))
        except asyncpg.exceptions.RaiseError as e:
            if "inventory stale version" in str(e):
                raise StaleVersion(str(e)) from e
            if "inventory closed reservation retried" in str(e):
                raise ClosedReservationRetried(str(e)) from e
            raise


@functools.lru_cache(maxsize=1024)
def _renumber(sql: str, offset: int) -> str:
    """`sql` with its parameters numbered from `offset` + 1. Cached: a batch statement has a few
    shapes only, and the substitutions cost about 20 µs per batch."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + offset}", sql) if offset else sql


def _batch_statement(w: BatchWrite) -> tuple[str, list[object]]:
    """Every row of the batch in one statement: one data-modifying CTE per table part.

    The parts never touch one row twice (`build_write` coalesces by primary key: a line new
    in this batch carries its final status, a header opened here its final count), which is
    what data-modifying CTEs, all seeing one snapshot, require. The guarded parts end with
    `RETURNING 1` and are counted by `inventory_expect_rows` (migration 003), which raises
    and so aborts the whole statement when a count falls short. With `unseen` reservations,
    a last part finds those Postgres remembers closed (in the snapshot before this statement's
    own rows), and `inventory_expect_unseen` (migration 006) aborts the statement if there
    is one. The statement's value is the JSON array of headers this batch expired completely.
    """
    ctes: list[str] = []
    args: list[object] = []
    checks: list[str] = []

    def part(sql: str, cols: list[list[object]], extra: Sequence[object] = (), expect: int | None = None,
             all_written: int | None = None) -> str:
        """`expect`: rows the part must write, or the statement fails (StaleVersion: another
        writer); `all_written`: rows it must write, or the statement is decided again
        (ClosedReservationRetried: a row written meanwhile that this snapshot did not see)."""
        name = f"p{len(ctes)}"
        text = _renumber(sql.strip(), len(args))
        args.extend(cols)
        args.extend(extra)
        if expect is not None:
            args.append(expect)
            checks.append(f"inventory_expect_rows((SELECT count(*) FROM {name}), ${len(args)}::int8, '{name}')")
        if all_written is not None:
            checks.append(f"inventory_expect_unseen({all_written} - (SELECT count(*) FROM {name}))")
        if expect is not None or all_written is not None:
            text += " RETURNING 1"
        ctes.append(f"{name} AS ({text})")
        return name

    if w.new_stocks:
        rows = [(s.organization_id, s.variant_id, s.warehouse_id, stock_id(s.key),
                 shard_hash(s.organization_id, s.variant_id), s.on_hand, s.reserved, s.in_transit,
                 s.min_stock, s.max_stock, s.reorder_point, s.status, s.version) for s in w.new_stocks]
        part(_INSERT_STOCKS, _columns(rows, 13), expect=len(rows))
    if w.changed_stocks:
        rows = [(s.organization_id, s.variant_id, s.warehouse_id, s.on_hand, s.reserved, s.in_transit,
                 s.min_stock, s.max_stock, s.reorder_point, s.status, s.version, read)
                for s, read in w.changed_stocks]
        part(_UPDATE_STOCKS, _columns(rows, 12), expect=len(rows))
    if w.movements:
        rows = [(k[0], k[1], k[2], t, a, b, c, r, ref, src, ver) for k, t, a, b, c, r, ref, src, ver in w.movements]
        part(_INSERT_MOVEMENTS, _columns(rows, 11), extra=[_ts(w.now)])
    if w.new_lines:
        rows = [(rid, k[0], k[1], k[2], shard_hash(k[0], k[1]), order, q, e, ih, st)
                for rid, k, order, q, e, ih, st in w.new_lines.values()]  # type: ignore[misc]
        part(_UPSERT_LINES, _columns(rows, 10))
    if w.line_status:
        rows = [(rid, k[0], k[1], k[2], st) for (rid, k), st in w.line_status.items()]
        part(_UPDATE_LINES, _columns(rows, 5))
    if w.deleted_lines:
        rows = [(rid, k[0], k[1], k[2]) for rid, k in w.deleted_lines]
        part(_DELETE_LINES, _columns(rows, 4))
    if w.opened:
        rows = [(h[0], h[1], h[2], h[3], h[4], h[6], h[5]) for h in w.opened.values()]
        part(_UPSERT_HEADERS, _columns(rows, 7), all_written=len(rows))  # (or a cancellation got in first)
    closed = ""
    if w.closed:
        rows = [(rid, c[0], c[1], c[2]) for rid, c in w.closed.items()]
        closed = part(_CLOSE_HEADERS, _columns(rows, 4))
    if w.events:
        part(outbox.INSERT, outbox.columns(w.events))
    if w.replies:
        part(_INSERT_REPLIES, _columns(w.replies, 3), all_written=len(w.replies))  # (or a key used elsewhere)
    if w.unseen:
        name = part(_SEEN_BEFORE, _columns(list(w.unseen), 4))
        checks.append(f"inventory_expect_unseen((SELECT count(*) FROM {name}))")
    value = (f"(SELECT coalesce(json_agg(c), '[]')::text FROM {closed} c "
             "WHERE c.open_lines = 0 AND c.status = 'expired')") if closed else "'[]'::text"
    guard = f"WHERE ({' + '.join(checks)}) >= 0" if checks else ""
    return f"WITH {', '.join(ctes)}\nSELECT {value} {guard}", args


def encode_reply(reply: object) -> bytes:
    return msgspec.msgpack.encode(reply)
