"""The reconciler's query: recompute every stock from the ledger and the open reservation lines and
compare with the `stocks` snapshot. It reports; it repairs nothing.

For each (organization_id, variant_id, warehouse_id):
    on_hand    = sum(movements.on_hand_delta)
    reserved   = sum(movements.reserved_delta) = sum(reservation_lines.quantity) of open lines
                 (status active or confirmed)
    in_transit = sum(movements.in_transit_delta)
A row on one side only (a ledger without a stock, say) is drift too. Everything is read in one
REPEATABLE READ transaction, so the three sources are one consistent snapshot (a shard writes a
change, its movement and its lines in one transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

log = logging.getLogger("inventory.reconcile")

_DRIFT = """
WITH ledger AS (
    SELECT organization_id, variant_id, warehouse_id, sum(on_hand_delta)::bigint AS on_hand,
           sum(reserved_delta)::bigint AS reserved, sum(in_transit_delta)::bigint AS in_transit
    FROM movements WHERE ($1::text IS NULL OR organization_id = $1)
    GROUP BY organization_id, variant_id, warehouse_id
), open_lines AS (
    SELECT organization_id, variant_id, warehouse_id, sum(quantity)::bigint AS reserved
    FROM reservation_lines
    WHERE status IN ('active', 'confirmed') AND ($1::text IS NULL OR organization_id = $1)
    GROUP BY organization_id, variant_id, warehouse_id
), snapshot AS (
    SELECT organization_id, variant_id, warehouse_id, on_hand, reserved, in_transit
    FROM stocks WHERE ($1::text IS NULL OR organization_id = $1)
)
SELECT organization_id, variant_id, warehouse_id,
       s.on_hand, s.reserved, s.in_transit,
       coalesce(l.on_hand, 0) AS ledger_on_hand, coalesce(l.reserved, 0) AS ledger_reserved,
       coalesce(l.in_transit, 0) AS ledger_in_transit, coalesce(o.reserved, 0) AS lines_reserved
FROM snapshot s
FULL JOIN ledger l USING (organization_id, variant_id, warehouse_id)
FULL JOIN open_lines o USING (organization_id, variant_id, warehouse_id)
WHERE s.on_hand IS NULL
   OR s.on_hand <> coalesce(l.on_hand, 0)
   OR s.reserved <> coalesce(l.reserved, 0)
   OR s.in_transit <> coalesce(l.in_transit, 0)
   OR s.reserved <> coalesce(o.reserved, 0)
ORDER BY organization_id, variant_id, warehouse_id
"""

_COUNT = "SELECT count(*) FROM stocks WHERE ($1::text IS NULL OR organization_id = $1)"


@dataclass(frozen=True)
class Drift:
    organization_id: str
    variant_id: str
    warehouse_id: str
    on_hand: int | None  # None: no stock row for a ledger or open lines
    reserved: int | None
    in_transit: int | None
    ledger_on_hand: int
    ledger_reserved: int
    ledger_in_transit: int
    lines_reserved: int

    def describe(self) -> str:
        if self.on_hand is None:
            return (f"no stock row, but ledger on_hand={self.ledger_on_hand} reserved={self.ledger_reserved} "
                    f"in_transit={self.ledger_in_transit}, open lines {self.lines_reserved}")
        parts = []
        for name, snap, ledger in (("on_hand", self.on_hand, self.ledger_on_hand),
                                   ("reserved", self.reserved, self.ledger_reserved),
                                   ("in_transit", self.in_transit, self.ledger_in_transit)):
            if snap != ledger:
                parts.append(f"{name} {snap} but ledger {ledger}")
        if self.reserved != self.lines_reserved:
            parts.append(f"reserved {self.reserved} but open lines {self.lines_reserved}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Report:
    stocks: int  # stock rows checked
    drifts: tuple[Drift, ...]


async def check(conn: asyncpg.Connection, organization_id: str | None = None) -> Report:
    """Compare every stock (of one organization, or all) with its ledger and open lines."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # (it reads the whole ledger: not bounded by a pool's command timeout, made for calls)
        rows = await conn.fetch(_DRIFT, organization_id, timeout=CHECK_TIMEOUT)
        count = await conn.fetchval(_COUNT, organization_id, timeout=CHECK_TIMEOUT)
    return Report(int(count), tuple(Drift(*r.values()) for r in rows))


CHECK_TIMEOUT = 6 * 3600.0  # seconds a check may read (about 1.6 M ledger rows a second on a small machine)
RECONCILE_LOCK_ID = 0x1A7E_0004  # arbitrary, constant: "the reconciler" (relay 0x1A7E_0002, sweep 0x1A7E_0003)


async def run_periodically(pool: asyncpg.Pool, interval: float, on_report: Callable[[Report], None]) -> None:
    """The gateway's background job: check every `interval` seconds, hand each report over; never raises
    (a failed run is logged and the next one comes at its time). Cancel the task to stop it.

    A run scans the whole ledger, so with several gateways on one database only one runs it: the one
    holding a session advisory lock on a connection it keeps; the others try again each interval
    (and so take over when that gateway goes)."""
    owner: asyncpg.Connection | None = None
    try:
        while True:
            await asyncio.sleep(interval)
            try:
                if owner is None:
                    conn = await pool.acquire()
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", RECONCILE_LOCK_ID):
                        owner = conn
                    else:
                        await pool.release(conn)
                        continue  # another gateway reconciles this database
                report = await check(owner)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("reconcile run failed: %s: %s", type(e).__name__, e)
                if owner is not None:
                    owner.terminate()  # its session (and lock) may be gone: start again next time
                    await pool.release(owner)
                    owner = None
                continue
            log_report(report)
            on_report(report)
    finally:
        if owner is not None:
            with contextlib.suppress(Exception):
                await owner.execute("SELECT pg_advisory_unlock($1)", RECONCILE_LOCK_ID)
            await pool.release(owner)


def log_report(report: Report) -> None:
    """One log line per drifting stock (nothing is repaired)."""
    for d in report.drifts:
        log.error("stock drift: organization %s variant %s warehouse %s: %s", d.organization_id, d.variant_id,
                  d.warehouse_id, d.describe(), extra={
                      "organization_id": d.organization_id, "variant_id": d.variant_id,
                      "warehouse_id": d.warehouse_id})
