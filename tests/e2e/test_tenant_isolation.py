"""Tenant isolation, end to end: organization B, holding organization A's ids (variant, warehouse,
order, reservation and transfer ids, even warehouses of the same names), can neither see nor touch
A's stock through any RPC. A's rows in Postgres are compared before and after.

The delete validation (catalog.variant.deleted: archive the variant's stocks, or refuse with
inventory.stock.validation_failed while any holds stock) is event-driven: it runs on a service of its
own with RabbitMQ (own database inv_sec2_tenant, own exchange/queue prefix). B deleting A's variants
neither archives A's stocks nor is refused because of A's stock, and A's validation counts A's stock
only.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import grpc
import pytest
from conftest import (
    TEST_DATABASE_URL,
    Service,
    Shop,
    clients_for,
    database_url_named,
    drop_database,
    ensure_database,
    eventually,
    free_port,
    running,
)

from actors.keys import stock_id
from gateway import amqp
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


# ---------------------------------------------------------------- the delete validation, through catalog events

EVENTS_DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_sec2_tenant")


@dataclass
class EventsService(Service):
    """`inventory serve` consuming the catalog's events from the machine's RabbitMQ, on a prefix of its own."""

    prefix: str = field(default_factory=lambda: f"tenant-{uuid.uuid4().hex[:10]}.")

    def env(self) -> dict[str, str]:
        return dict(super().env(), INVENTORY_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/",
                    INVENTORY_AMQP_PREFIX=self.prefix, INVENTORY_RELAY_POLL_SECONDS="0.02")


@dataclass
class Catalog:
    """The Catalog's side of the broker: publishes its events; knows when the service handled one."""

    service: EventsService
    channel: aio_pika.abc.AbstractChannel
    db: asyncpg.Pool

    async def publish(self, org: str, event: str, **data: Any) -> None:
        event_id = str(uuid.uuid4())
        exchange = await self.channel.get_exchange(self.service.prefix + amqp.CATALOG.exchange)
        await exchange.publish(aio_pika.Message(json.dumps(
            {"event": event, "event_id": event_id, "organization_id": org, "data": data}).encode(),
            content_type="application/json"), routing_key=event)

        async def handled() -> bool:
            return await self.db.fetchval("SELECT status FROM inbox WHERE message_key = $1",
                                          f"{org}:{event}:{event_id}") == "done"

        await eventually(handled, timeout=20, what=f"{event} for {org} handled")

    async def answers(self, org: str) -> list[tuple[str, dict[str, Any]]]:
        """The catalog lifecycle answers written for `org`, in order."""
        rows = await self.db.fetch(
            "SELECT event_name, payload::text FROM outbox WHERE organization_id = $1 AND event_name IN"
            " ('inventory.stock.archived', 'inventory.stock.validation_failed', 'inventory.stock.initialized')"
            " ORDER BY id", org)
        return [(r[0], json.loads(r[1])["data"]) for r in rows]


@pytest.fixture(scope="module")
async def catalog(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Catalog]:
    await drop_database(EVENTS_DATABASE_URL)
    await ensure_database(EVENTS_DATABASE_URL)
    svc = EventsService(EVENTS_DATABASE_URL, tmp_path_factory.mktemp("tenant-events"),
                        grpc_port=free_port(range(50700, 50800)), actor_port=free_port(range(20400, 20500)))
    connection = await aio_pika.connect_robust("amqp://guest:guest@127.0.0.1:5672/")
    try:
        async with running(svc):
            channel = await connection.channel(publisher_confirms=True)
            queue = svc.prefix + amqp.CATALOG.queue

            async def consumed() -> bool:
                probe = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                    declared = await probe.declare_queue(queue, passive=True)
                    await probe.close()
                    return bool(declared.declaration_result.consumer_count)
                return False

            await eventually(consumed, timeout=30, interval=0.1, what="the catalog consumer")
            pool = await asyncpg.create_pool(EVENTS_DATABASE_URL, min_size=1, max_size=2)
            try:
                yield Catalog(svc, channel, pool)
            finally:
                await pool.close()
    finally:
        channel = await connection.channel()
        names = amqp.Names.of(amqp.CATALOG, svc.prefix)  # the default first retry
        for q in names.all_queues():
            await channel.queue_delete(q)
        for x in (names.exchange, names.dead_letter_exchange, svc.prefix + amqp.INVENTORY_EXCHANGE):
            await channel.exchange_delete(x)
        await connection.close()
        await drop_database(EVENTS_DATABASE_URL)


async def test_another_organization_cannot_delete_validate_or_archive_a_stock_through_catalog_events(catalog):
    org_a, org_b = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    held, empty, theirs, both = "v-held", "v-empty", "v-theirs", "v-both"  # variant ids both organizations use
    async with grpc.aio.insecure_channel(catalog.service.target) as channel:
        clients = clients_for(channel)
        a, b = Shop(org_a, clients.inventory, clients.admin), Shop(org_b, clients.inventory, clients.admin)
        # A holds `held` (10 on hand, 3 reserved) and `both` (10); `empty` and `theirs` are created at 0.
        await a.receive(held, "w1", 10)
        await a.reserve("order-1", (held, 3, "w1"))
        await a.receive(both, "w1", 10)
        await catalog.publish(org_a, "catalog.variant.created", variant_id=empty, track_inventory=True)
        await catalog.publish(org_a, "catalog.variant.created", variant_id=theirs, track_inventory=True)
        # B, with a warehouse of the same id: `held` at 0 (created by its Catalog), `theirs` 7, `both` 5.
        await b.warehouse("w1")
        await catalog.publish(org_b, "catalog.variant.created", variant_id=held, track_inventory=True)
        await b.receive(theirs, "w1", 7)
        await b.receive(both, "w1", 5)
        a_before, b_before = await snapshot(catalog.db, org_a), await snapshot(catalog.db, org_b)
        assert len(a_before["stocks"]) == 4 and len(b_before["stocks"]) == 3

        # ---- B deletes `held`: its own zero stock is archived; A's 10 neither refuse it nor get archived.
        await catalog.publish(org_b, "catalog.variant.deleted", variant_id=held)
        # ---- B deletes `empty`, a variant only A has: nothing of A's is archived.
        await catalog.publish(org_b, "catalog.variant.deleted", variant_id=empty)
        assert await catalog.answers(org_b) == [
            ("inventory.stock.initialized", {"variant_id": held, "status": "success", "warehouses": [
                {"warehouse_id": "w1", "stock_id": stock_id((org_b, held, "w1")), "initial_quantity": 0}]}),
            ("inventory.stock.archived", {"variant_id": held, "warehouses": [
                {"warehouse_id": "w1", "stock_id": stock_id((org_b, held, "w1"))}]}),
            ("inventory.stock.archived", {"variant_id": empty, "warehouses": []}),
        ]
        assert await snapshot(catalog.db, org_a) == a_before  # byte for byte
        assert (await a.level(empty, "w1")).status != "archived"
        assert (await a.reserve("order-2", (held, 1, "w1"))).success  # A's stock still serves reservations

        # ---- A deletes `theirs`: A's zero stock is archived, B's 7 neither refuse it nor get archived.
        b_before = await snapshot(catalog.db, org_b)
        await catalog.publish(org_a, "catalog.variant.deleted", variant_id=theirs)
        # ---- A deletes `both`: refused on A's 10 alone (B's 5 are not counted, not listed).
        await catalog.publish(org_a, "catalog.variant.deleted", variant_id=both)
        answers = [x for x in await catalog.answers(org_a) if x[0] != "inventory.stock.initialized"]
        assert answers == [
            ("inventory.stock.archived", {"variant_id": theirs, "warehouses": [
                {"warehouse_id": "w1", "stock_id": stock_id((org_a, theirs, "w1"))}]}),
            ("inventory.stock.validation_failed", {
                "variant_id": both, "reason": "stock_not_zero",
                "details": {"total_stock": 10, "warehouses_affected": [{"warehouse_id": "w1", "quantity": 10}]},
                "action_required": "Clear all stock before deleting variant"}),
        ]
        assert await snapshot(catalog.db, org_b) == b_before
        assert (await b.level(theirs, "w1")).on_hand == 7
        assert (await b.reserve("order-1", (theirs, 7, "w1"))).success
