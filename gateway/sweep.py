"""The backstop for reservation expiry: a periodic Postgres sweep for overdue lines.

Expiry is the shards' job (a timer heap per shard, and every touch of a stock expires its
overdue lines first). A line can still outlive its `expires_at` when no timer holds it and
nothing touches its stock: a lost Thespian wakeup, a crash between a timer and its commit,
rows written by an incarnation whose timers died with it. Every `sweep_interval_seconds`
the sweeper reads the open TTL lines (status `active`) of every organization and shard that
are overdue by more than GRACE_SECONDS and sends the owning shard one `ExpireReservation`
per variant, through the gateway's bridge, exactly as the shard's own timer would. The
shard stays the single writer: it expires the lines in one transaction with their ledger
movements and events (and the one `inventory.reservation.expired` of the reservation, by
its header's open line count); the sweep itself writes nothing.

With several gateways on one database a session advisory lock (SWEEP_LOCK_ID) makes one
sweeper active; the others try again at their next interval. A duplicate sweep would be
harmless anyway (expiring is idempotent), the lock only saves the work.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import asyncpg

from actors.keys import shard_of
from actors.messages import Command, DoneResult, ExpireReservation, Rejected
from persistence import queries, session

log = logging.getLogger("inventory.sweep")

SWEEP_LOCK_ID = 0x1A7E_0003  # arbitrary, constant: "the overdue reservation sweep" (relay: 0x1A7E_0002)
GRACE_SECONDS = 5.0  # leave just-due lines to the shard's own timer
BATCH_LINES = 1000  # overdue lines handled per run; more wait for the next run


@dataclass(frozen=True)
class SweepReport:
    overdue: int  # lines found overdue in Postgres
    variants: int  # ExpireReservation commands sent (one per variant)
    expired: int  # lines of variants whose shard expired something
    unchanged: int  # lines of variants whose shard found nothing to expire (closed meanwhile, clock skew)
    failed: int  # lines of variants whose shard did not answer (unavailable): the next run tries again


async def expire_overdue(bridge: Any, lines: list[queries.OverdueLine]) -> SweepReport:
    """Send each overdue line's owning shard one ExpireReservation per variant; count the outcomes by line."""
    by_variant: dict[tuple[str, str], list[queries.OverdueLine]] = defaultdict(list)
    for line in lines:
        by_variant[(line.organization_id, line.variant_id)].append(line)
    keys = sorted(by_variant)
    calls: list[tuple[int, Command]] = [
        (shard_of(org, variant, bridge.shard_count), ExpireReservation(org, by_variant[(org, variant)][0].reservation_id,
                                                                      variant))
        for org, variant in keys]
    replies = await bridge.call_many(calls) if calls else []
    expired = unchanged = failed = 0
    for key, reply in zip(keys, replies):
        n = len(by_variant[key])
        if isinstance(reply, Rejected):
            failed += n
            log.warning("sweep: shard could not expire variant %s: %s: %s", key[1], reply.code, reply.message,
                        extra={"organization_id": key[0], "variant_id": key[1]})
        elif isinstance(reply, DoneResult) and reply.changed:
            expired += n
        else:
            unchanged += n
    return SweepReport(len(lines), len(keys), expired, unchanged, failed)


class OverdueSweeper:
    """The gateway's background job (one task): every `interval` s, if this gateway holds the sweep lock,
    hand the overdue lines to their shards. Never raises; a failed run is logged, the next comes on time."""

    def __init__(self, dsn: str, bridge: Any, interval: float, metrics: Any = None, *,
                 grace: float = GRACE_SECONDS, limit: int = BATCH_LINES) -> None:
        self.dsn = dsn
        self.bridge = bridge
        self.interval = interval
        self.metrics = metrics
        self.grace = grace
        self.limit = limit
        self.active = False  # holds the lock
        self.runs = 0
        self._conn: asyncpg.Connection | None = None

    async def try_lock(self) -> bool:
        """Connect if need be; True if this sweeper holds (or just took) the sweep lock."""
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            self.active = False
            self._conn = await asyncpg.connect(self.dsn, timeout=10,
                                               server_settings=session.settings(self.dsn, "inventory-sweep"))
        if not self.active:
            self.active = bool(await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK_ID))
            if self.active:
                log.info("sweep: active (overdue reservation lines every %.0f s)", self.interval)
        return self.active

    async def sweep_once(self) -> SweepReport | None:
        """One run; None if another gateway's sweeper is the active one."""
        if not await self.try_lock():
            return None
        assert self._conn is not None
        lines = await queries.overdue_lines(self._conn, self.grace, self.limit)
        report = await expire_overdue(self.bridge, lines)
        self.runs += 1
        if self.metrics is not None:
            self.metrics.sweep_runs.inc()
            for outcome in ("expired", "unchanged", "failed"):
                if n := getattr(report, outcome):
                    self.metrics.sweep_lines.labels(outcome).inc(n)
        if report.overdue:
            log.warning("sweep: %d overdue reservation lines in %d variants that no timer expired: "
                        "%d expired by their shard, %d unchanged, %d failed", report.overdue, report.variants,
                        report.expired, report.unchanged, report.failed)
        return report

    async def run(self) -> None:
        """Sweep every `interval` seconds until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.sweep_once()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                    log.warning("sweep run failed: %s: %s", type(e).__name__, e)
                    await self.close()
        finally:
            await self.close()

    async def close(self) -> None:
        conn, self._conn, self.active = self._conn, None, False
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception as e:  # noqa: BLE001 - closing a broken connection: the lock goes with it
                log.debug("sweep: closing the connection: %s", e)
                conn.terminate()
