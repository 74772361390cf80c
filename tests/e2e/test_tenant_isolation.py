"""Tenant isolation, end to end: organization B, holding organization A's ids (variant, warehouse,
order, reservation and transfer ids, even warehouses of the same names), can neither see nor touch
A's stock through any RPC. A's rows in Postgres are compared before and after.

catalog.variant.deleted (the delete validation) is event-driven and not covered here.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc

from gateway.pb import inventory_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND

TABLES = {
    "stocks": "SELECT * FROM stocks WHERE organization_id = $1 ORDER BY variant_id, warehouse_id",
    "reservations": "SELECT * FROM reservations WHERE organization_id = $1 ORDER BY reservation_id",
    "reservation_lines": "SELECT * FROM reservation_lines WHERE organization_id = $1 "
                         "ORDER BY reservation_id, variant_id, warehouse_id",
    "movements": "SELECT * FROM movements WHERE organization_id = $1 ORDER BY movement_id",
    "warehouses": "SELECT * FROM warehouses WHERE organization_id = $1 ORDER BY warehouse_id",
    "outbox": "SELECT event_id, event_name, payload FROM outbox WHERE organization_id = $1 ORDER BY id",
    "idempotency": "SELECT key, reply FROM idempotency WHERE organization_id = $1 ORDER BY key",
}


async def snapshot(db: Any, org: str) -> dict[str, list[tuple[Any, ...]]]:
    async with db.acquire() as conn:
        return {name: [tuple(r.values()) for r in await conn.fetch(sql, org)] for name, sql in TABLES.items()}


async def refused(call: Any) -> grpc.StatusCode:
    """The status of a call that must fail."""
    try:
        reply = await call
    except grpc.aio.AioRpcError as e:
        assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), e.details()
        return e.code()
    raise AssertionError(f"expected an error, got {reply!r}")


async def test_another_organization_can_neither_see_nor_touch_a_stock(shop, shop_on, clients, db, grpc_error):
    a = shop
    variant, w1, w2 = f"v-{uuid.uuid4()}", "w1", "w2"
    await a.receive(variant, w1, 10)
    await a.warehouse(w2)
    reserved = await a.reserve("order-1", (variant, 3, w1))
    confirmed = await a.reserve("order-2", (variant, 2, w1))
    await a.confirm(confirmed.reservation_id)
    transfer = await a.admin.TransferStock(pb.TransferRequest(
        organization_id=a.org, variant_id=variant, from_warehouse_id=w1, to_warehouse_id=w2, quantity=1,
        transfer_id=f"t-{uuid.uuid4()}"))
    before = await snapshot(db, a.org)
    assert len(before["stocks"]) == 2 and len(before["reservation_lines"]) == 2

    b = shop_on(clients, f"b-{uuid.uuid4()}")
    inv, adm = b.inventory, b.admin

    # ---- before B has any warehouse of its own
    assert (await adm.GetStock(pb.GetStockRequest(organization_id=b.org, variant_id=variant))).levels == []
    await grpc_error(adm.GetStock(pb.GetStockRequest(organization_id=b.org, variant_id=variant, warehouse_id=w1)),
                     NOT_FOUND)
    assert (await adm.ListMovements(pb.ListMovementsRequest(
        organization_id=b.org, variant_id=variant))).movements == []
    assert (await adm.ListWarehouses(pb.ListWarehousesRequest(organization_id=b.org))).warehouses == []
    check = await inv.CheckAvailability(pb.AvailabilityRequest(
        organization_id=b.org, items=[pb.AvailabilityItem(variant_id=variant, quantity=1)],
        preferred_warehouse_id=w1))
    assert not check.all_available and check.results[0].available == 0, check
    await grpc_error(inv.ReleaseReservation(pb.ReleaseRequest(
        organization_id=b.org, reservation_id=reserved.reservation_id)), NOT_FOUND)
    await grpc_error(inv.ConfirmReservation(pb.ConfirmRequest(
        organization_id=b.org, reservation_id=reserved.reservation_id)), NOT_FOUND)
    await grpc_error(inv.ReleaseReservation(pb.ReleaseRequest(
        organization_id=b.org, reservation_id=confirmed.reservation_id)), NOT_FOUND)
    await grpc_error(adm.ReceiveTransfer(pb.ReceiveTransferRequest(
        organization_id=b.org, transfer_id=transfer.transfer_id)), NOT_FOUND)
    # A's warehouse ids are unknown to B.
    await refused(inv.ReserveStock(pb.ReserveStockRequest(
        organization_id=b.org, order_id="order-1", items=[pb.ReserveItem(variant_id=variant, quantity=1,
                                                                         warehouse_id=w1)])))
    await refused(inv.ReserveStock(pb.ReserveStockRequest(
        organization_id=b.org, order_id="order-3", items=[pb.ReserveItem(variant_id=variant, quantity=1)])))
    for kind in (pb.MOVEMENT_TYPE_ISSUE, pb.MOVEMENT_TYPE_ADJUSTMENT, pb.MOVEMENT_TYPE_RECEIPT):
        await refused(adm.RecordMovement(pb.MovementRequest(
            organization_id=b.org, variant_id=variant, warehouse_id=w1, type=kind, quantity=-1
            if kind == pb.MOVEMENT_TYPE_ADJUSTMENT else 1)))
    await refused(adm.SetStockPolicy(pb.StockPolicyRequest(
        organization_id=b.org, variant_id=variant, warehouse_id=w1, min_stock=5, max_stock=50)))
    await refused(adm.TransferStock(pb.TransferRequest(
        organization_id=b.org, variant_id=variant, from_warehouse_id=w1, to_warehouse_id=w2, quantity=1)))
    assert await snapshot(db, a.org) == before

    # ---- B now has warehouses of the same ids (one deactivated): still its own, not A's
    await b.warehouse(w1, active=False)
    await b.warehouse(w1)
    await b.warehouse(w2)
    assert (await adm.GetStock(pb.GetStockRequest(organization_id=b.org, variant_id=variant))).levels == []
    await refused(adm.RecordMovement(pb.MovementRequest(
        organization_id=b.org, variant_id=variant, warehouse_id=w1, type=pb.MOVEMENT_TYPE_ISSUE, quantity=1)))
    await refused(adm.RecordMovement(pb.MovementRequest(
        organization_id=b.org, variant_id=variant, warehouse_id=w1, type=pb.MOVEMENT_TYPE_ADJUSTMENT,
        quantity=-1)))
    await refused(adm.TransferStock(pb.TransferRequest(
        organization_id=b.org, variant_id=variant, from_warehouse_id=w1, to_warehouse_id=w2, quantity=1)))
    await refused(inv.ReserveStock(pb.ReserveStockRequest(
        organization_id=b.org, order_id="order-1", items=[pb.ReserveItem(variant_id=variant, quantity=1,
                                                                         warehouse_id=w1)])))
    await grpc_error(adm.ReceiveTransfer(pb.ReceiveTransferRequest(
        organization_id=b.org, transfer_id=transfer.transfer_id)), NOT_FOUND)
    assert await snapshot(db, a.org) == before

    # ---- B receives stock of the same variant in its "w1": B's record, A's untouched
    mine = await b.receive(variant, w1, 4)
    assert (mine.organization_id, mine.on_hand, mine.reserved) == (b.org, 4, 0)
    b_levels = await b.levels(variant)
    assert {w: (lv.on_hand, lv.reserved, lv.in_transit) for w, lv in b_levels.items()} == {w1: (4, 0, 0)}
    same_order = await b.reserve("order-1", (variant, 4, w1))
    assert same_order.reservation_id != reserved.reservation_id
    await b.release(same_order.reservation_id)
    assert await snapshot(db, a.org) == before

    # ---- and A still sees exactly its own
    levels = await a.levels(variant)
    assert {w: (lv.on_hand, lv.reserved, lv.in_transit) for w, lv in levels.items()} == {
        w1: (9, 5, 0), w2: (0, 0, 1)}
    a_warehouses = await a.admin.ListWarehouses(pb.ListWarehousesRequest(organization_id=a.org))
    assert {(w.warehouse_id, w.active) for w in a_warehouses.warehouses} == {(w1, True), (w2, True)}
    await a.release(reserved.reservation_id)
    assert (await a.level(variant, w1)).reserved == 2
