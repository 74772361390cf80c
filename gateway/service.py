"""gRPC servicers: translate requests into shard commands, replies into responses.

The error table of this edge (one place):

| reply / condition                | gRPC status          |
|----------------------------------|----------------------|
| bad field (names the field)      | INVALID_ARGUMENT     |
| insufficient_stock, closed, archived | FAILED_PRECONDITION |
| conflict (same order, other items) | ALREADY_EXISTS     |
| not_found, other organization's id | NOT_FOUND          |
| unavailable (commit failed, shard down, Postgres down) | UNAVAILABLE (retry) |

A successful reply means committed: shards reply only after their transaction commits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NoReturn

import asyncpg
import grpc

from actors.keys import items_hash, reservation_id, shard_of
from actors.messages import (
    AbortReservation,
    Command,
    ConfirmReservation,
    DoneResult,
    ReadStock,
    ReceiveTransfer,
    RecordMovement,
    Rejected,
    ReleaseReservation,
    Reply,
    ReservationResult,
    ReserveLine,
    ReserveStock,
    SetStockPolicy,
    SetWarehouseActive,
    ShipTransfer,
    StockLevel,
    StockLevelsResult,
)
from actors.stock import MAX_QUANTITY, choose_warehouse
from gateway.bridge import ActorBridge
from gateway.config import Settings
from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence import queries
from persistence.outbox import iso

log = logging.getLogger("inventory.grpc")

STATUS = {
    "insufficient_stock": grpc.StatusCode.FAILED_PRECONDITION,
    "closed": grpc.StatusCode.FAILED_PRECONDITION,
    "archived": grpc.StatusCode.FAILED_PRECONDITION,
    "conflict": grpc.StatusCode.ALREADY_EXISTS,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}

MOVEMENT_KIND = {
    pb.MOVEMENT_TYPE_RECEIPT: "receipt",
    pb.MOVEMENT_TYPE_ISSUE: "issue",
    pb.MOVEMENT_TYPE_ADJUSTMENT: "adjustment",
    pb.MOVEMENT_TYPE_RETURN: "return",
}

MAX_ID_LENGTH = 200


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> NoReturn:
    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def _require_id(value: str, field: str) -> str:
    if not value or not value.strip():
        _invalid(f"{field}: must not be empty")
    if len(value) > MAX_ID_LENGTH:
        _invalid(f"{field}: longer than {MAX_ID_LENGTH} characters")
    if "\x00" in value:
        _invalid(f"{field}: must not contain NUL")
    return value


def _raise_rejected(reply: Rejected) -> NoReturn:
    raise _Abort(STATUS.get(reply.code, grpc.StatusCode.INTERNAL), reply.message)


def _level_pb(level: StockLevel) -> pb.StockLevel:
    status = level.status if level.warehouse_active else f"{level.status} (warehouse inactive)"
    return pb.StockLevel(
        organization_id=level.organization_id, variant_id=level.variant_id, warehouse_id=level.warehouse_id,
        on_hand=level.on_hand, reserved=level.reserved, available=level.available, in_transit=level.in_transit,
        min_stock=level.min_stock, max_stock=level.max_stock, reorder_point=level.reorder_point,
        status=status, version=level.version,
    )


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

    async def exists(self, organization_id: str, warehouse_id: str) -> bool:
        if warehouse_id in await self.of(organization_id):
            return True
        self._cache.pop(organization_id, None)  # a new warehouse may have been added elsewhere
        return warehouse_id in await self.of(organization_id)

    def forget(self, organization_id: str) -> None:
        self._cache.pop(organization_id, None)


class Core:
    """What both servicers need: routing by key, the bridge, the pool, settings."""

    def __init__(self, settings: Settings, bridge: ActorBridge, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.bridge = bridge
        self.pool = pool
        self.warehouses = Warehouses(pool)

    def shard(self, organization_id: str, variant_id: str) -> int:
        return shard_of(organization_id, variant_id, self.bridge.shard_count)

    async def ask(self, organization_id: str, variant_id: str, command: Command) -> Reply:
        return await self.bridge.call(self.shard(organization_id, variant_id), command)

    async def ask_ok(self, organization_id: str, variant_id: str, command: Command) -> Reply:
        reply = await self.ask(organization_id, variant_id, command)
        if isinstance(reply, Rejected):
            _raise_rejected(reply)
        return reply

    async def require_warehouse(self, organization_id: str, warehouse_id: str, field: str) -> None:
        _require_id(warehouse_id, field)
        try:
            known = await self.warehouses.exists(organization_id, warehouse_id)
        except (OSError, asyncpg.PostgresError) as e:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"database unavailable: {type(e).__name__}") from None
        if not known:
            _invalid(f"{field}: unknown warehouse {warehouse_id!r}")

    async def lines_of(self, organization_id: str, rid: str) -> list[queries.LineRow]:
        try:
            return await queries.reservation_lines(self.pool, organization_id, rid)
        except (OSError, asyncpg.PostgresError) as e:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"database unavailable: {type(e).__name__}") from None

    def by_shard(self, organization_id: str, variant_ids: Sequence[str]) -> dict[int, tuple[str, ...]]:
        groups: dict[int, list[str]] = defaultdict(list)
        for v in sorted(set(variant_ids)):
            groups[self.shard(organization_id, v)].append(v)
        return {s: tuple(vs) for s, vs in groups.items()}


async def _handle(context: grpc.aio.ServicerContext, coro: Any) -> Any:
    try:
        return await coro
    except _Abort as e:
        await context.abort(e.code, e.message)


class InventoryServicer(pbg.InventoryServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def CheckAvailability(self, request: pb.AvailabilityRequest, context: Any) -> pb.AvailabilityResponse:
        return await _handle(context, self._check(request))

    async def ReserveStock(self, request: pb.ReserveStockRequest, context: Any) -> pb.ReserveStockResponse:
        return await _handle(context, self._reserve(request))

    async def ReleaseReservation(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        return await _handle(context, self._release(request))

    async def ConfirmReservation(self, request: pb.ConfirmRequest, context: Any) -> pb.ConfirmResponse:
        return await _handle(context, self._confirm(request))

    # ------------------------------------------------------------ availability

    async def _check(self, request: pb.AvailabilityRequest) -> pb.AvailabilityResponse:
        org = _require_id(request.organization_id, "organization_id")
        self._check_count(len(request.items))
        for i, item in enumerate(request.items):
            _require_id(item.variant_id, f"items[{i}].variant_id")
            if item.quantity <= 0:
                _invalid(f"items[{i}].quantity: must be positive")
        variants = sorted({item.variant_id for item in request.items})
        replies = await self.core.bridge.call_many(
            [(self.core.shard(org, v), ReadStock(org, v)) for v in variants])
        levels: dict[str, tuple[StockLevel, ...]] = {}
        for v, reply in zip(variants, replies):
            if isinstance(reply, Rejected):
                _raise_rejected(reply)
            assert isinstance(reply, StockLevelsResult)
            levels[v] = reply.levels
        results = []
        for item in request.items:
            usable = [(lv.warehouse_id, lv.available) for lv in levels[item.variant_id]
                      if lv.status == "active" and lv.warehouse_active]
            choice = choose_warehouse(usable, item.quantity, request.preferred_warehouse_id)
            results.append(pb.AvailabilityResult(
                variant_id=item.variant_id, requested=item.quantity, available=choice.available,
                sufficient=choice.sufficient, warehouse_id=choice.warehouse_id))
        return pb.AvailabilityResponse(all_available=all(r.sufficient for r in results), results=results)

    def _check_count(self, n: int) -> None:
        if n == 0:
            _invalid("items: at least one item is required")
        if n > self.core.settings.max_items:
            _invalid(f"items: at most {self.core.settings.max_items} items per request, got {n}")

    # ------------------------------------------------------------ reserve

    def _ttl_seconds(self, request: pb.ReserveStockRequest) -> int:
        if request.ttl_seconds < 0:
            _invalid("ttl_seconds: must not be negative")
        if request.ttl_minutes < 0:
            _invalid("ttl_minutes: must not be negative")
        if request.ttl_seconds > 0:
            ttl, field = request.ttl_seconds, "ttl_seconds"
        elif request.ttl_minutes > 0:
            ttl, field = request.ttl_minutes * 60, "ttl_minutes"
        else:
            return self.core.settings.default_ttl_minutes * 60
        if ttl > self.core.settings.max_ttl_seconds:
            _invalid(f"{field}: at most {self.core.settings.max_ttl_seconds // 3600} hours")
        return ttl

    async def _reserve(self, request: pb.ReserveStockRequest) -> pb.ReserveStockResponse:
        org = _require_id(request.organization_id, "organization_id")
        order_id = _require_id(request.order_id, "order_id")
        self._check_count(len(request.items))
        ttl = self._ttl_seconds(request)
        merged: dict[tuple[str, str], int] = {}
        for i, item in enumerate(request.items):
            _require_id(item.variant_id, f"items[{i}].variant_id")
            if item.quantity <= 0:
                _invalid(f"items[{i}].quantity: must be positive")
            if item.warehouse_id:
                await self.core.require_warehouse(org, item.warehouse_id, f"items[{i}].warehouse_id")
            key = (item.variant_id, item.warehouse_id)
            merged[key] = merged.get(key, 0) + item.quantity
            if merged[key] > MAX_QUANTITY:
                _invalid(f"items[{i}].quantity: total for variant {item.variant_id} exceeds int32")
        result = await reserve(self.core, org, order_id, merged, time.time() + ttl)
        return pb.ReserveStockResponse(
            success=True, reservation_id=result.reservation_id, expires_at=iso(result.expires_at),
            lines=[pb.ReservedLine(variant_id=ln.variant_id, warehouse_id=ln.warehouse_id, quantity=ln.quantity)
                   for ln in result.lines])

    # ------------------------------------------------------------ release / confirm

    async def _release(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        org = _require_id(request.organization_id, "organization_id")
        rid = _require_id(request.reservation_id, "reservation_id")
        await release(self.core, org, rid, request.reason or "released")
        return pb.ReleaseResponse(success=True)

    async def _confirm(self, request: pb.ConfirmRequest) -> pb.ConfirmResponse:
        org = _require_id(request.organization_id, "organization_id")
        rid = _require_id(request.reservation_id, "reservation_id")
        await confirm(self.core, org, rid)
        return pb.ConfirmResponse(success=True)


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
        return ReservationResult(rid, max(r.expires_at for r in results), lines,
                                 replayed=all(r.replayed for r in results))
    # Compensation: undo the groups that did reserve, so the call has no effect at all.
    done = [(s, groups[s]) for s, r in zip(shards, replies) if isinstance(r, ReservationResult)]
    if done:
        undo = await core.bridge.call_many(
            [(s, AbortReservation(org, rid, tuple(sorted({ln.variant_id for ln in lines}))))
             for s, lines in done])
        if any(isinstance(u, Rejected) for u in undo):
            log.error("compensation of reservation %s failed; its lines expire at their TTL", rid,
                      extra={"organization_id": org, "reservation_id": rid, "order_id": order_id})
    worst = _worst(failures)
    message = "; ".join(f.message for f in failures if f.code == worst.code) or worst.message
    raise _Abort(STATUS.get(worst.code, grpc.StatusCode.INTERNAL), message)


def _worst(failures: list[Rejected]) -> Rejected:
    order = ["invalid", "conflict", "archived", "closed", "insufficient_stock", "unavailable", "not_found"]
    return min(failures, key=lambda f: order.index(f.code) if f.code in order else len(order))


async def release(core: Core, org: str, rid: str, reason: str) -> bool:
    """Idempotent: releasing a released or expired reservation succeeds and changes nothing."""
    lines = await core.lines_of(org, rid)
    if not lines:
        raise _Abort(grpc.StatusCode.NOT_FOUND, f"reservation {rid} not found")
    open_variants = [ln.variant_id for ln in lines if ln.status in ("active", "confirmed")]
    if not open_variants:
        if any(ln.status == "shipped" for ln in lines):
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"reservation {rid} has already shipped")
        return False
    groups = core.by_shard(org, open_variants)
    replies = await core.bridge.call_many(
        [(s, ReleaseReservation(org, rid, vs, reason)) for s, vs in groups.items()])
    for reply in replies:
        if isinstance(reply, Rejected):
            _raise_rejected(reply)
    return any(isinstance(r, DoneResult) and r.changed for r in replies)


async def confirm(core: Core, org: str, rid: str) -> None:
    lines = await core.lines_of(org, rid)
    if not lines:
        raise _Abort(grpc.StatusCode.NOT_FOUND, f"reservation {rid} not found")
    closed = {ln.status for ln in lines} - {"active", "confirmed", "shipped"}
    if closed:
        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"reservation {rid} is {sorted(closed)[0]}")
    active = [ln.variant_id for ln in lines if ln.status == "active"]
    if not active:
        return  # already confirmed (or shipped): idempotent
    groups = core.by_shard(org, active)
    shards = list(groups)
    replies = await core.bridge.call_many([(s, ConfirmReservation(org, rid, groups[s])) for s in shards])
    failed = [r for r in replies if isinstance(r, Rejected)]
    if not failed:
        return
    confirmed = [s for s, r in zip(shards, replies) if not isinstance(r, Rejected)]
    if confirmed and any(f.code == "closed" for f in failed):
        # Part expired while the rest confirmed: the reservation as a whole has expired.
        await core.bridge.call_many(
            [(s, ReleaseReservation(org, rid, groups[s], "expired")) for s in confirmed])
    _raise_rejected(_worst(failed))


# ---------------------------------------------------------------- admin


class AdminServicer(pbg.InventoryAdminServiceServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def UpsertWarehouse(self, request: pb.Warehouse, context: Any) -> pb.Warehouse:
        return await _handle(context, self._upsert_warehouse(request))

    async def ListWarehouses(self, request: pb.ListWarehousesRequest, context: Any) -> pb.ListWarehousesResponse:
        return await _handle(context, self._list_warehouses(request))

    async def RecordMovement(self, request: pb.MovementRequest, context: Any) -> pb.MovementResponse:
        return await _handle(context, self._record_movement(request))

    async def SetStockPolicy(self, request: pb.StockPolicyRequest, context: Any) -> pb.StockPolicyResponse:
        return await _handle(context, self._set_policy(request))

    async def GetStock(self, request: pb.GetStockRequest, context: Any) -> pb.GetStockResponse:
        return await _handle(context, self._get_stock(request))

    async def ListMovements(self, request: pb.ListMovementsRequest, context: Any) -> pb.ListMovementsResponse:
        return await _handle(context, self._list_movements(request))

    async def TransferStock(self, request: pb.TransferRequest, context: Any) -> pb.TransferResponse:
        return await _handle(context, self._transfer(request))

    async def ReceiveTransfer(self, request: pb.ReceiveTransferRequest, context: Any) -> pb.TransferResponse:
        return await _handle(context, self._receive_transfer(request))

    async def _db(self, coro: Any) -> Any:
        try:
            return await coro
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as e:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"database unavailable: {type(e).__name__}") from None

    async def _upsert_warehouse(self, request: pb.Warehouse) -> pb.Warehouse:
        org = _require_id(request.organization_id, "organization_id")
        wid = _require_id(request.warehouse_id, "warehouse_id")
        if len(request.name) > 500:
            _invalid("name: longer than 500 characters")
        row = await self._db(queries.upsert_warehouse(
            self.core.pool, queries.WarehouseRow(org, wid, request.name, request.active)))
        self.core.warehouses.forget(org)
        # Resident stocks learn the new state at once; stocks activated later read it from Postgres.
        await self.core.bridge.call_many(
            [(s, SetWarehouseActive(org, wid, row.active)) for s in range(self.core.bridge.shard_count)])
        return pb.Warehouse(organization_id=row.organization_id, warehouse_id=row.warehouse_id,
                            name=row.name, active=row.active)

    async def _list_warehouses(self, request: pb.ListWarehousesRequest) -> pb.ListWarehousesResponse:
        org = _require_id(request.organization_id, "organization_id")
        rows = await self._db(queries.list_warehouses(self.core.pool, org))
        return pb.ListWarehousesResponse(warehouses=[
            pb.Warehouse(organization_id=r.organization_id, warehouse_id=r.warehouse_id, name=r.name,
                         active=r.active) for r in rows])

    async def _record_movement(self, request: pb.MovementRequest) -> pb.MovementResponse:
        org = _require_id(request.organization_id, "organization_id")
        variant = _require_id(request.variant_id, "variant_id")
        kind = MOVEMENT_KIND.get(request.type)
        if kind is None:
            _invalid("type: must be RECEIPT, ISSUE, ADJUSTMENT or RETURN")
        if kind == "adjustment":
            if request.quantity == 0:
                _invalid("quantity: an adjustment must not be zero")
        elif request.quantity <= 0:
            _invalid("quantity: must be positive")
        await self.core.require_warehouse(org, request.warehouse_id, "warehouse_id")
        if len(request.reason) > 1000 or len(request.reference_id) > MAX_ID_LENGTH:
            _invalid("reason/reference_id: too long")
        if request.idempotency_key:
            _require_id(request.idempotency_key, "idempotency_key")
        reply = await self.core.ask_ok(org, variant, RecordMovement(
            org, variant, request.warehouse_id, kind, request.quantity, request.reason, request.reference_id,
            request.idempotency_key, create_if_missing=kind == "receipt"))
        assert isinstance(reply, DoneResult)
        return pb.MovementResponse(stock=_level_pb(reply.levels[0]))

    async def _set_policy(self, request: pb.StockPolicyRequest) -> pb.StockPolicyResponse:
        org = _require_id(request.organization_id, "organization_id")
        variant = _require_id(request.variant_id, "variant_id")
        _require_id(request.warehouse_id, "warehouse_id")
        reply = await self.core.ask_ok(org, variant, SetStockPolicy(
            org, variant, request.warehouse_id, request.min_stock, request.max_stock, request.reorder_point))
        assert isinstance(reply, DoneResult)
        return pb.StockPolicyResponse(stock=_level_pb(reply.levels[0]))

    async def _get_stock(self, request: pb.GetStockRequest) -> pb.GetStockResponse:
        org = _require_id(request.organization_id, "organization_id")
        variant = _require_id(request.variant_id, "variant_id")
        reply = await self.core.ask_ok(org, variant, ReadStock(org, variant, request.warehouse_id))
        assert isinstance(reply, StockLevelsResult)
        if request.warehouse_id and not reply.levels:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"no stock of variant {variant} in warehouse {request.warehouse_id}")
        return pb.GetStockResponse(levels=[_level_pb(lv) for lv in reply.levels])

    async def _list_movements(self, request: pb.ListMovementsRequest) -> pb.ListMovementsResponse:
        org = _require_id(request.organization_id, "organization_id")
        variant = _require_id(request.variant_id, "variant_id")
        size = request.page_size or 50
        if not 1 <= size <= 500:
            _invalid("page_size: between 1 and 500")
        before: int | None = None
        if request.page_token:
            if not request.page_token.isdigit():
                _invalid("page_token: not a token from a previous page")
            before = int(request.page_token)
        rows = await self._db(queries.list_movements(self.core.pool, org, variant, request.warehouse_id,
                                                     size + 1, before))
        page, more = rows[:size], len(rows) > size
        return pb.ListMovementsResponse(
            movements=[pb.Movement(
                movement_id=r.movement_id, organization_id=r.organization_id, variant_id=r.variant_id,
                warehouse_id=r.warehouse_id, type=r.type, on_hand_delta=r.on_hand_delta,
                reserved_delta=r.reserved_delta, in_transit_delta=r.in_transit_delta, reason=r.reason,
                reference_id=r.reference_id, occurred_at=r.occurred_at.isoformat(), version=r.version,
                source=r.source) for r in page],
            next_page_token=str(page[-1].movement_id) if more else "")

    async def _transfer(self, request: pb.TransferRequest) -> pb.TransferResponse:
        org = _require_id(request.organization_id, "organization_id")
        variant = _require_id(request.variant_id, "variant_id")
        await self.core.require_warehouse(org, request.from_warehouse_id, "from_warehouse_id")
        await self.core.require_warehouse(org, request.to_warehouse_id, "to_warehouse_id")
        if request.from_warehouse_id == request.to_warehouse_id:
            _invalid("to_warehouse_id: must differ from from_warehouse_id")
        if request.quantity <= 0:
            _invalid("quantity: must be positive")
        transfer_id = request.transfer_id or str(uuid.uuid4())
        _require_id(transfer_id, "transfer_id")
        reply = await self.core.ask_ok(org, variant, ShipTransfer(
            org, variant, request.from_warehouse_id, request.to_warehouse_id, request.quantity, transfer_id,
            request.reason, create_if_missing=True))
        assert isinstance(reply, DoneResult)
        return pb.TransferResponse(transfer_id=transfer_id, source=_level_pb(reply.levels[0]),
                                   destination=_level_pb(reply.levels[1]))

    async def _receive_transfer(self, request: pb.ReceiveTransferRequest) -> pb.TransferResponse:
        org = _require_id(request.organization_id, "organization_id")
        transfer_id = _require_id(request.transfer_id, "transfer_id")
        found = await self._db(queries.transfer_in_transit(self.core.pool, org, transfer_id))
        if found is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"transfer {transfer_id} not found")
        variant, warehouse, quantity = found
        reply = await self.core.ask_ok(org, variant, ReceiveTransfer(org, variant, warehouse, quantity, transfer_id))
        assert isinstance(reply, DoneResult)
        return pb.TransferResponse(transfer_id=transfer_id, destination=_level_pb(reply.levels[0]))


def shortages_json(reply: Rejected) -> str:
    return json.dumps([{"variant_id": s.variant_id, "warehouse_id": s.warehouse_id,
                        "requested": s.requested, "available": s.available} for s in reply.shortages])


async def gather_bounded(coros: Sequence[Any], limit: int = 64) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))
