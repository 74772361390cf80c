"""The business flows behind both edges (gRPC and AMQP events): routing by key, fan-out
to shards, compensation. Failures are `FlowError`s with a domain code; each edge maps the
codes to its own error table (gRPC status; AMQP ack, retry or dead-letter).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import NoReturn

import asyncpg

from actors.keys import items_hash, reservation_id, shard_of
from actors.messages import (
    AbortReservation,
    ArchiveVariant,
    Command,
    ConfirmReservation,
    DoneResult,
    InitializeVariant,
    RecordMovement,
    Rejected,
    ReleaseReservation,
    Reply,
    ReservationResult,
    ReserveLine,
    ReserveStock,
    ShipReservation,
    Shortage,
    StockLevel,
)
from gateway.breaker import Breakers
from gateway.bridge import ActorBridge
from gateway.catalog import CatalogUnavailable, VariantValidator
from gateway.config import Settings
from gateway.metrics import Metrics
from persistence import outbox, queries

log = logging.getLogger("inventory.flows")

MAX_ID_LENGTH = 200


class FlowError(Exception):
    """A refused or failed operation. `code` is one of actors.messages.REJECTION_CODES."""

    def __init__(self, code: str, message: str, shortages: Sequence[Shortage] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.shortages = tuple(shortages)


def invalid(message: str) -> NoReturn:
    raise FlowError("invalid", message)


def require_id(value: str, field: str) -> str:
    if not value or not value.strip():
        invalid(f"{field}: must not be empty")
    if len(value) > MAX_ID_LENGTH:
        invalid(f"{field}: longer than {MAX_ID_LENGTH} characters")
    if "\x00" in value:
        invalid(f"{field}: must not contain NUL")
    return value


def raise_rejected(reply: Rejected) -> NoReturn:
    raise FlowError(reply.code, reply.message, reply.shortages)


def unavailable(e: BaseException) -> FlowError:
    return FlowError("unavailable", f"database unavailable: {type(e).__name__}")


class Warehouses:
    """A small cache of which warehouses exist (and are active) per organization."""

    def __init__(self, pool: asyncpg.Pool, ttl: float = 5.0) -> None:
        self.pool = pool
        self.ttl = ttl
        self._cache: dict[str, tuple[float, dict[str, bool]]] = {}

    async def of(self, organization_id: str) -> dict[str, bool]:
        hit = self._cache.get(organization_id)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        rows = await queries.list_warehouses(self.pool, organization_id)
        found = {r.warehouse_id: r.active for r in rows}
        self._cache[organization_id] = (time.monotonic(), found)
        return found

    def known(self, organization_id: str, warehouse_id: str) -> bool:
        """In the fresh cache: the common case, answered without a coroutine (every ReserveStock item)."""
        hit = self._cache.get(organization_id)
        return hit is not None and warehouse_id in hit[1] and time.monotonic() - hit[0] < self.ttl

    async def exists(self, organization_id: str, warehouse_id: str) -> bool:
        if warehouse_id in await self.of(organization_id):
            return True
        self._cache.pop(organization_id, None)  # a new warehouse may have been added elsewhere
        return warehouse_id in await self.of(organization_id)

    def forget(self, organization_id: str) -> None:
        self._cache.pop(organization_id, None)


class Core:
    """What every edge needs: routing by key, the bridge, the pool, settings, metrics.

    `validator` is set at start-up when a Catalog is configured (gateway/health.py), else None.
    """

    def __init__(self, settings: Settings, bridge: ActorBridge, pool: asyncpg.Pool,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.bridge = bridge
        self.pool = pool
        self.warehouses = Warehouses(pool)
        self.metrics = metrics or Metrics()
        self.validator: VariantValidator | None = None
        self.breakers = Breakers(settings.breaker_failure_threshold, settings.breaker_cooldown_seconds)

    async def check_variant(self, organization_id: str, variant_id: str) -> str:
        """Before a stock movement: may this variant hold stock? Returns the answer's source for the
        ledger ("catalog", "cache", "degraded"), or "" when validation is off (no Catalog configured)."""
        if self.validator is None:
            return ""
        try:
            checked = await self.validator.check(organization_id, variant_id)
        except CatalogUnavailable as e:
            raise FlowError("unavailable", str(e)) from None
        if not checked.info.exists:
            raise FlowError("not_found", f"variant {variant_id} does not exist")
        if not checked.info.is_active:
            raise FlowError("variant_inactive", f"variant {variant_id} is inactive")
        if not checked.info.tracks_inventory:
            raise FlowError("variant_untracked", f"variant {variant_id} does not track inventory")
        return checked.source

    async def invalidate_variant(self, organization_id: str, variant_id: str) -> None:
        """On catalog.variant.updated / .deleted: forget the cached variant (a no-op without validation)."""
        if self.validator is not None:
            await self.validator.invalidate(organization_id, variant_id)

    def shard(self, organization_id: str, variant_id: str) -> int:
        return shard_of(organization_id, variant_id, self.bridge.shard_count)

    async def ask(self, organization_id: str, variant_id: str, command: Command) -> Reply:
        return await self.bridge.call(self.shard(organization_id, variant_id), command)

    async def ask_ok(self, organization_id: str, variant_id: str, command: Command) -> Reply:
        reply = await self.ask(organization_id, variant_id, command)
        if isinstance(reply, Rejected):
            raise_rejected(reply)
        return reply

    async def require_warehouse(self, organization_id: str, warehouse_id: str, field: str) -> None:
        require_id(warehouse_id, field)
        try:
            known = await self.warehouses.exists(organization_id, warehouse_id)
        except (OSError, asyncpg.PostgresError) as e:
            raise unavailable(e) from None
        if not known:
            invalid(f"{field}: unknown warehouse {warehouse_id!r}")

    async def lines_of(self, organization_id: str, rid: str) -> list[queries.LineRow]:
        try:
            return await queries.reservation_lines(self.pool, organization_id, rid)
        except (OSError, asyncpg.PostgresError) as e:
            raise unavailable(e) from None

    def by_shard(self, organization_id: str, variant_ids: Sequence[str]) -> dict[int, tuple[str, ...]]:
        groups: dict[int, list[str]] = defaultdict(list)
        for v in sorted(set(variant_ids)):
            groups[self.shard(organization_id, v)].append(v)
        return {s: tuple(vs) for s, vs in groups.items()}


# ---------------------------------------------------------------- the reservation flows (also used by events)


async def reserve(core: Core, org: str, order_id: str, merged: dict[tuple[str, str], int],
                  expires_at: float) -> ReservationResult:
    """All-or-nothing across shards; idempotent per (organization, order)."""
    rid = reservation_id(org, order_id)
    digest = items_hash((v, w, q) for (v, w), q in merged.items())
    groups: dict[int, list[ReserveLine]] = defaultdict(list)
    for (variant, warehouse), qty in sorted(merged.items()):
        groups[core.shard(org, variant)].append(ReserveLine(variant, warehouse, qty))
    shards = sorted(groups)
    replies = await core.bridge.call_many(
        [(s, ReserveStock(org, rid, order_id, digest, expires_at, tuple(groups[s]))) for s in shards])
    failures = [r for r in replies if isinstance(r, Rejected)]
    if not failures:
        results = [r for r in replies if isinstance(r, ReservationResult)]
        lines = tuple(ln for r in results for ln in r.lines)
        replayed = all(r.replayed for r in results)
        core.metrics.reservation("replayed" if replayed else "reserved")
        return ReservationResult(rid, max(r.expires_at for r in results), lines, replayed=replayed)
    # Compensation: undo the parts this call made, so that it has no effect at all. A part
    # answered as a replay was made by an earlier call for this order, which may have succeeded
    # (and been confirmed): not this call's to undo. (A part whose answer was lost may have
    # committed: it is held until its TTL. Aborting it could take away an earlier call's part.)
    done = [(s, groups[s]) for s, r in zip(shards, replies) if isinstance(r, ReservationResult) and not r.replayed]
    if done:
        undo = await core.bridge.call_many(
            [(s, AbortReservation(org, rid, tuple(sorted({ln.variant_id for ln in lines}))))
             for s, lines in done])
        if any(isinstance(u, Rejected) for u in undo):
            log.error("compensation of reservation %s failed; its lines expire at their TTL", rid,
                      extra={"organization_id": org, "reservation_id": rid, "order_id": order_id})
    worst = _worst(failures)
    core.metrics.reservation(worst.code)
    shortages = sorted((s for f in failures for s in f.shortages), key=lambda s: (s.variant_id, s.warehouse_id))
    if worst.code == "insufficient_stock" and shortages:
        message = "insufficient stock for " + "; ".join(
            f"variant {s.variant_id}: requested {s.requested}, available {s.available}"
            + (f" in warehouse {s.warehouse_id}" if s.warehouse_id else "") for s in shortages)
    else:
        message = "; ".join(f.message for f in failures if f.code == worst.code) or worst.message
    raise FlowError(worst.code, _bounded(message), tuple(shortages))


MAX_MESSAGE = 2000
"""gRPC carries the message in a header (16 KB limit): 500 short items must not overflow it."""


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    cut = message[:MAX_MESSAGE].rsplit("; ", 1)[0]
    return f"{cut}; … and {message.count('; ') - cut.count('; ')} more"


def _worst(failures: list[Rejected]) -> Rejected:
    order = ["invalid", "conflict", "archived", "closed", "insufficient_stock", "unavailable", "not_found"]
    return min(failures, key=lambda f: order.index(f.code) if f.code in order else len(order))


async def release(core: Core, org: str, rid: str, reason: str) -> bool:
    """Idempotent: releasing a released or expired reservation succeeds and changes nothing."""
    lines = await core.lines_of(org, rid)
    if not lines:
        raise FlowError("not_found", f"reservation {rid} not found")
    open_variants = [ln.variant_id for ln in lines if ln.status in ("active", "confirmed")]
    if not open_variants:
        if any(ln.status == "shipped" for ln in lines):
            raise FlowError("closed", f"reservation {rid} has already shipped")
        return False
    return await _release_parts(core, org, rid, core.by_shard(org, open_variants), reason)


CANCEL_ROUNDS = 3  # looks and marks of a cancellation racing a reservation made and undone meanwhile


async def cancel_order(core: Core, org: str, order_id: str, reason: str) -> str:
    """An order cancelled (order.cancelled): its reservation released; if it has none (yet), a
    mark that makes the shards refuse it later: an order.placed retried behind this message,
    or a ReserveStock late over gRPC, is then `closed` instead of holding stock until its TTL."""
    rid = reservation_id(org, order_id)
    for _ in range(CANCEL_ROUNDS):
        try:
            return "released" if await release(core, org, rid, reason) else "already released"
        except FlowError as e:
            if e.code != "not_found":
                raise
        try:
            if await queries.mark_cancelled(core.pool, org, rid, order_id):
                return "nothing reserved"
        except (OSError, asyncpg.PostgresError) as e:
            raise unavailable(e) from None
        # Made meanwhile (its header has open lines): release it; or, if that call undid it
        # since (another part failed), mark again.
    raise FlowError("unavailable", f"order {order_id}: its reservation kept changing while it was cancelled; retry")


async def confirm(core: Core, org: str, rid: str) -> None:
    lines = await core.lines_of(org, rid)
    if not lines:
        raise FlowError("not_found", f"reservation {rid} not found")
    closed = {ln.status for ln in lines} - {"active", "confirmed", "shipped"}
    if closed:
        # Part of it expired or was released: the reservation as a whole is closed. Its other
        # parts are released (a confirmed part has no TTL: nothing else would ever free it).
        still_open = [ln.variant_id for ln in lines if ln.status in ("active", "confirmed")]
        if still_open:
            await _release_parts(core, org, rid, core.by_shard(org, still_open), min(closed))
        raise FlowError("closed", f"reservation {rid} is {min(closed)}")
    active = [ln.variant_id for ln in lines if ln.status == "active"]
    if not active:
        return  # already confirmed (or shipped): idempotent
    groups = core.by_shard(org, active)
    shards = list(groups)
    replies = await core.bridge.call_many([(s, ConfirmReservation(org, rid, groups[s])) for s in shards])
    failed = [r for r in replies if isinstance(r, Rejected)]
    if not failed:
        return
    if any(f.code == "closed" for f in failed):
        # Part expired while the rest confirmed (or may have: a lost answer): the reservation as
        # a whole has expired, and every part but the closed ones is released.
        rest = {s: groups[s] for s, r in zip(shards, replies) if not (isinstance(r, Rejected) and r.code == "closed")}
        if rest:
            await _release_parts(core, org, rid, rest, "expired")
    raise_rejected(_worst(failed))


async def _release_parts(core: Core, org: str, rid: str, groups: Mapping[int, tuple[str, ...]], reason: str) -> bool:
    """Release these parts of a reservation (True: something was released), or raise (e.g.
    unavailable): a retry of the call then finds what is still open and releases it."""
    replies = await core.bridge.call_many([(s, ReleaseReservation(org, rid, vs, reason)) for s, vs in groups.items()])
    for reply in replies:
        if isinstance(reply, Rejected):
            raise_rejected(reply)
    return any(isinstance(r, DoneResult) and r.changed for r in replies)




# ---------------------------------------------------------------- flows behind the consumed events


async def ship(core: Core, org: str, rid: str) -> bool:
    """Deduct a reservation (reserved goes out of on_hand). Idempotent: an already shipped one is a no-op."""
    lines = await core.lines_of(org, rid)
    if not lines:
        raise FlowError("not_found", f"reservation {rid} not found")
    open_variants = [ln.variant_id for ln in lines if ln.status in ("active", "confirmed")]
    if not open_variants:
        if all(ln.status == "shipped" for ln in lines):
            return False
        raise FlowError("closed", f"reservation {rid} is {min({ln.status for ln in lines})}")
    groups = core.by_shard(org, open_variants)
    replies = await core.bridge.call_many([(s, ShipReservation(org, rid, vs)) for s, vs in groups.items()])
    for reply in replies:
        if isinstance(reply, Rejected):
            raise_rejected(reply)
    return True


async def record_movement(core: Core, org: str, variant: str, warehouse: str, kind: str, quantity: int,
                          reason: str = "", reference_id: str = "", idempotency_key: str = "",
                          source: str = "", in_transit_limit: int = -1) -> tuple[StockLevel, ...]:
    """A movement from an event (return, purchase_ordered, purchase_received) or the admin API."""
    reply = await core.ask_ok(org, variant, RecordMovement(
        org, variant, warehouse, kind, quantity, reason, reference_id, idempotency_key,
        create_if_missing=kind in ("receipt", "purchase_ordered", "purchase_received"), source=source,
        in_transit_limit=in_transit_limit))
    assert isinstance(reply, DoneResult)
    return reply.levels


async def initialize_variant(core: Core, org: str, variant: str, min_stock: int, max_stock: int,
                             reorder_point: int = 0) -> tuple[StockLevel, ...]:
    """A stock record in every active warehouse of the organization (idempotent)."""
    try:
        warehouses = await core.warehouses.of(org)
    except (OSError, asyncpg.PostgresError) as e:
        raise unavailable(e) from None
    active = tuple(sorted(wh for wh, is_active in warehouses.items() if is_active))
    reply = await core.ask_ok(org, variant, InitializeVariant(org, variant, active, min_stock, max_stock,
                                                              reorder_point))
    assert isinstance(reply, DoneResult)
    return reply.levels


async def archive_variant(core: Core, org: str, variant: str) -> bool:
    """Archive the variant's stocks, or refuse (FlowError stock_not_zero) while any holds stock.

    Either way the answer event (archived / validation_failed) is in the outbox."""
    reply = await core.ask_ok(org, variant, ArchiveVariant(org, variant))
    assert isinstance(reply, DoneResult)
    return reply.changed


async def emit_event(core: Core, name: str, organization_id: str, data: dict[str, object]) -> str:
    """Put an event that is no stock change (e.g. inventory.reservation.failed) in the outbox; returns its id."""
    row = outbox.envelope(name, organization_id, data, time.time())
    try:
        async with core.pool.acquire() as conn:
            await outbox.insert(conn, [row])
    except (OSError, asyncpg.PostgresError) as e:
        raise unavailable(e) from None
    return row[0]


async def emit_event_once(core: Core, name: str, organization_id: str, data: dict[str, object],
                          event_id: str) -> bool:
    """Like emit_event with a caller-chosen event_id (derived from what it answers): a second call
    for the same thing writes nothing. Returns True if the row was written now."""
    _, _, _, payload = outbox.envelope(name, organization_id, data, time.time())
    body = json.loads(payload)
    body["event_id"] = event_id
    try:
        return await queries.outbox_insert_once(core.pool, event_id, name, organization_id, json.dumps(body))
    except (OSError, asyncpg.PostgresError) as e:
        raise unavailable(e) from None
