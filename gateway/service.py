"""gRPC servicers: translate requests into shard commands, replies into responses.

The error table of this edge (one place):

| reply / condition                | gRPC status          |
|----------------------------------|----------------------|
| bad field (names the field)      | INVALID_ARGUMENT     |
| insufficient_stock, closed, archived | FAILED_PRECONDITION |
| variant_inactive, variant_untracked (Catalog) | FAILED_PRECONDITION |
| conflict (same order, other items) | ALREADY_EXISTS     |
| not_found, other organization's id, unknown variant | NOT_FOUND |
| unavailable (commit failed, shard down, Postgres down, Catalog down without degraded mode) | UNAVAILABLE (retry) |

A successful reply means committed: shards reply only after their transaction commits.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import asyncpg
import grpc

from actors.messages import (
    DoneResult,
    ReadStock,
    ReceiveTransfer,
    RecordMovement,
    Rejected,
    SetStockPolicy,
    SetWarehouseActive,
    ShipTransfer,
    StockLevel,
    StockLevelsResult,
)
from actors.stock import MAX_QUANTITY, choose_warehouse
from gateway.flows import (
    MAX_ID_LENGTH,
    Core,
    FlowError,
    confirm,
    invalid,
    raise_rejected,
    release,
    require_id,
    reserve,
    unavailable,
)
from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence import queries
from persistence.outbox import iso

log = logging.getLogger("inventory.grpc")

STATUS = {
    "insufficient_stock": grpc.StatusCode.FAILED_PRECONDITION,
    "closed": grpc.StatusCode.FAILED_PRECONDITION,
    "archived": grpc.StatusCode.FAILED_PRECONDITION,
    "stock_not_zero": grpc.StatusCode.FAILED_PRECONDITION,
    "variant_inactive": grpc.StatusCode.FAILED_PRECONDITION,
    "variant_untracked": grpc.StatusCode.FAILED_PRECONDITION,
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


def _level_pb(level: StockLevel) -> pb.StockLevel:
    status = level.status if level.warehouse_active else f"{level.status} (warehouse inactive)"
    return pb.StockLevel(
        organization_id=level.organization_id, variant_id=level.variant_id, warehouse_id=level.warehouse_id,
        on_hand=level.on_hand, reserved=level.reserved, available=level.available, in_transit=level.in_transit,
        min_stock=level.min_stock, max_stock=level.max_stock, reorder_point=level.reorder_point,
        status=status, version=level.version,
    )


async def _handle(context: grpc.aio.ServicerContext, coro: Any) -> Any:
    try:
        return await coro
    except FlowError as e:
        await context.abort(STATUS.get(e.code, grpc.StatusCode.INTERNAL), e.message)


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
        org = require_id(request.organization_id, "organization_id")
        self._check_count(len(request.items))
        for i, item in enumerate(request.items):
            require_id(item.variant_id, f"items[{i}].variant_id")
            if item.quantity <= 0:
                invalid(f"items[{i}].quantity: must be positive")
        variants = sorted({item.variant_id for item in request.items})
        replies = await self.core.bridge.call_many(
            [(self.core.shard(org, v), ReadStock(org, v)) for v in variants])
        levels: dict[str, tuple[StockLevel, ...]] = {}
        for v, reply in zip(variants, replies):
            if isinstance(reply, Rejected):
                raise_rejected(reply)
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
            invalid("items: at least one item is required")
        if n > self.core.settings.max_items:
            invalid(f"items: at most {self.core.settings.max_items} items per request, got {n}")

    # ------------------------------------------------------------ reserve

    def _ttl_seconds(self, request: pb.ReserveStockRequest) -> int:
        if request.ttl_seconds < 0:
            invalid("ttl_seconds: must not be negative")
        if request.ttl_minutes < 0:
            invalid("ttl_minutes: must not be negative")
        if request.ttl_seconds > 0:
            ttl, field = request.ttl_seconds, "ttl_seconds"
        elif request.ttl_minutes > 0:
            ttl, field = request.ttl_minutes * 60, "ttl_minutes"
        else:
            return self.core.settings.default_ttl_minutes * 60
        if ttl > self.core.settings.max_ttl_seconds:
            invalid(f"{field}: at most {self.core.settings.max_ttl_seconds // 3600} hours")
        return ttl

    async def _reserve(self, request: pb.ReserveStockRequest) -> pb.ReserveStockResponse:
        org = require_id(request.organization_id, "organization_id")
        order_id = require_id(request.order_id, "order_id")
        self._check_count(len(request.items))
        ttl = self._ttl_seconds(request)
        merged: dict[tuple[str, str], int] = {}
        for i, item in enumerate(request.items):
            require_id(item.variant_id, f"items[{i}].variant_id")
            if item.quantity <= 0:
                invalid(f"items[{i}].quantity: must be positive")
            if item.warehouse_id and not self.core.warehouses.known(org, item.warehouse_id):
                await self.core.require_warehouse(org, item.warehouse_id, f"items[{i}].warehouse_id")
            key = (item.variant_id, item.warehouse_id)
            merged[key] = merged.get(key, 0) + item.quantity
            if merged[key] > MAX_QUANTITY:
                invalid(f"items[{i}].quantity: total for variant {item.variant_id} exceeds int32")
        result = await reserve(self.core, org, order_id, merged, time.time() + ttl)
        return pb.ReserveStockResponse(
            success=True, reservation_id=result.reservation_id, expires_at=iso(result.expires_at),
            lines=[pb.ReservedLine(variant_id=ln.variant_id, warehouse_id=ln.warehouse_id, quantity=ln.quantity)
                   for ln in result.lines])

    # ------------------------------------------------------------ release / confirm

    async def _release(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        org = require_id(request.organization_id, "organization_id")
        rid = require_id(request.reservation_id, "reservation_id")
        if len(request.reason) > 1000 or "\x00" in request.reason:
            invalid("reason: longer than 1000 characters or contains NUL")
        await release(self.core, org, rid, request.reason or "released")
        return pb.ReleaseResponse(success=True)

    async def _confirm(self, request: pb.ConfirmRequest) -> pb.ConfirmResponse:
        org = require_id(request.organization_id, "organization_id")
        rid = require_id(request.reservation_id, "reservation_id")
        await confirm(self.core, org, rid)
        return pb.ConfirmResponse(success=True)


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
            raise unavailable(e) from None

    async def _upsert_warehouse(self, request: pb.Warehouse) -> pb.Warehouse:
        org = require_id(request.organization_id, "organization_id")
        wid = require_id(request.warehouse_id, "warehouse_id")
        if len(request.name) > 500 or "\x00" in request.name:
            invalid("name: longer than 500 characters or contains NUL")
        row, written_at = await self._db(queries.upsert_warehouse(
            self.core.pool, queries.WarehouseRow(org, wid, request.name, request.active)))
        self.core.warehouses.forget(org)
        # Resident stocks learn the new state at once; stocks activated later read it from Postgres.
        # A shard that did not take it would go on with the old one: the call fails (unavailable)
        # and a retry (an upsert is idempotent) tells every shard again.
        shards = range(self.core.bridge.shard_count)
        replies = await self.core.bridge.call_many(
            [(s, SetWarehouseActive(org, wid, row.active, written_at)) for s in shards])
        missed = [s for s, r in zip(shards, replies) if isinstance(r, Rejected)]
        if missed:
            raise FlowError("unavailable", f"warehouse {wid} saved, but shards {', '.join(map(str, missed))} did not "
                                           "take its active state; retry")
        return pb.Warehouse(organization_id=row.organization_id, warehouse_id=row.warehouse_id,
                            name=row.name, active=row.active)

    async def _list_warehouses(self, request: pb.ListWarehousesRequest) -> pb.ListWarehousesResponse:
        org = require_id(request.organization_id, "organization_id")
        rows = await self._db(queries.list_warehouses(self.core.pool, org))
        return pb.ListWarehousesResponse(warehouses=[
            pb.Warehouse(organization_id=r.organization_id, warehouse_id=r.warehouse_id, name=r.name,
                         active=r.active) for r in rows])

    async def _record_movement(self, request: pb.MovementRequest) -> pb.MovementResponse:
        org = require_id(request.organization_id, "organization_id")
        variant = require_id(request.variant_id, "variant_id")
        kind = MOVEMENT_KIND.get(request.type)
        if kind is None:
            invalid("type: must be RECEIPT, ISSUE, ADJUSTMENT or RETURN")
        if kind == "adjustment":
            if request.quantity == 0:
                invalid("quantity: an adjustment must not be zero")
        elif request.quantity <= 0:
            invalid("quantity: must be positive")
        await self.core.require_warehouse(org, request.warehouse_id, "warehouse_id")
        if len(request.reason) > 1000 or len(request.reference_id) > MAX_ID_LENGTH:
            invalid("reason/reference_id: too long")
        if "\x00" in request.reason or "\x00" in request.reference_id:
            invalid("reason/reference_id: must not contain NUL")
        if request.idempotency_key:
            require_id(request.idempotency_key, "idempotency_key")
        source = await self.core.check_variant(org, variant)
        reply = await self.core.ask_ok(org, variant, RecordMovement(
            org, variant, request.warehouse_id, kind, request.quantity, request.reason, request.reference_id,
            request.idempotency_key, create_if_missing=kind == "receipt", source=source))
        assert isinstance(reply, DoneResult)
        return pb.MovementResponse(stock=_level_pb(reply.levels[0]))

    async def _set_policy(self, request: pb.StockPolicyRequest) -> pb.StockPolicyResponse:
        org = require_id(request.organization_id, "organization_id")
        variant = require_id(request.variant_id, "variant_id")
        require_id(request.warehouse_id, "warehouse_id")
        reply = await self.core.ask_ok(org, variant, SetStockPolicy(
            org, variant, request.warehouse_id, request.min_stock, request.max_stock, request.reorder_point))
        assert isinstance(reply, DoneResult)
        return pb.StockPolicyResponse(stock=_level_pb(reply.levels[0]))

    async def _get_stock(self, request: pb.GetStockRequest) -> pb.GetStockResponse:
        org = require_id(request.organization_id, "organization_id")
        variant = require_id(request.variant_id, "variant_id")
        reply = await self.core.ask_ok(org, variant, ReadStock(org, variant, request.warehouse_id))
        assert isinstance(reply, StockLevelsResult)
        if request.warehouse_id and not reply.levels:
            raise FlowError("not_found",
                         f"no stock of variant {variant} in warehouse {request.warehouse_id}")
        return pb.GetStockResponse(levels=[_level_pb(lv) for lv in reply.levels])

    async def _list_movements(self, request: pb.ListMovementsRequest) -> pb.ListMovementsResponse:
        org = require_id(request.organization_id, "organization_id")
        variant = require_id(request.variant_id, "variant_id")
        if "\x00" in request.warehouse_id:
            invalid("warehouse_id: must not contain NUL")
        size = request.page_size or 50
        if not 1 <= size <= 500:
            invalid("page_size: between 1 and 500")
        before: int | None = None
        if request.page_token:
            token = request.page_token
            if not (token.isascii() and token.isdigit() and len(token) <= 18):
                invalid("page_token: not a token from a previous page")
            before = int(token)
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
        org = require_id(request.organization_id, "organization_id")
        variant = require_id(request.variant_id, "variant_id")
        await self.core.require_warehouse(org, request.from_warehouse_id, "from_warehouse_id")
        await self.core.require_warehouse(org, request.to_warehouse_id, "to_warehouse_id")
        if request.from_warehouse_id == request.to_warehouse_id:
            invalid("to_warehouse_id: must differ from from_warehouse_id")
        if request.quantity <= 0:
            invalid("quantity: must be positive")
        if len(request.reason) > 1000 or "\x00" in request.reason:
            invalid("reason: longer than 1000 characters or contains NUL")
        transfer_id = request.transfer_id or str(uuid.uuid4())
        require_id(transfer_id, "transfer_id")
        source = await self.core.check_variant(org, variant)
        reply = await self.core.ask_ok(org, variant, ShipTransfer(
            org, variant, request.from_warehouse_id, request.to_warehouse_id, request.quantity, transfer_id,
            request.reason, create_if_missing=True, source=source))
        assert isinstance(reply, DoneResult)
        return pb.TransferResponse(transfer_id=transfer_id, source=_level_pb(reply.levels[0]),
                                   destination=_level_pb(reply.levels[1]))

    async def _receive_transfer(self, request: pb.ReceiveTransferRequest) -> pb.TransferResponse:
        org = require_id(request.organization_id, "organization_id")
        transfer_id = require_id(request.transfer_id, "transfer_id")
        found = await self._db(queries.transfer_in_transit(self.core.pool, org, transfer_id))
        if found is None:
            raise FlowError("not_found", f"transfer {transfer_id} not found")
        variant, warehouse, quantity = found
        reply = await self.core.ask_ok(org, variant, ReceiveTransfer(org, variant, warehouse, quantity, transfer_id))
        assert isinstance(reply, DoneResult)
        return pb.TransferResponse(transfer_id=transfer_id, destination=_level_pb(reply.levels[0]))


