"""Issue 3 end to end: a real `inventory serve` consuming and publishing over the real RabbitMQ.

One service for the module, on a database of its own (`inv_events`) and its own ports,
with an exchange/queue prefix of its own (INVENTORY_AMQP_PREFIX), so nothing here meets
another run or another engineer's service. The service reaches RabbitMQ through a TCP
proxy of this module: cutting the proxy is a broker outage for the service (the machine's
RabbitMQ keeps running), restoring it is the broker coming back.

The test side publishes the Catalog's, Order Service's and Purchasing's events to their
exchanges and listens to `inventory_events` with a queue of its own; each test uses its own
organization id and looks only at its events. A message with an `event_id` is known to be
handled when the service's inbox says so; a copy of a handled message is known to be
handled when a later message for the same order/variant/purchase order is (the consumer
handles one entity's messages in delivery order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import asyncpg
import grpc
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from conftest import eventually
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tcp_proxy import TcpProxy

from actors.keys import reservation_id, shard_of, stock_id
from gateway import amqp
from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg

AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
AMQP_URL = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/"
TEST_DATABASE_URL = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
DATABASE = "inv_events"
SHARDS = 2
RETRY_SECONDS = 0.1  # the first retry delay of the service under test
INVENTORY = Path(sys.executable).with_name("inventory")
T = TypeVar("T")

pytestmark = pytest.mark.timeout(120)


def _url_for(name: str) -> str:
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    return f"{base}/{name}"


DSN = _url_for(DATABASE)


async def until(probe: Callable[[], Awaitable[T | None]], timeout: float = 15.0, what: str = "condition") -> T:
    return await eventually(probe, timeout=timeout, interval=0.02, what=what)


async def _value(value: T) -> T:
    return value


def free_port(ports: range) -> int:
    candidates = list(ports)
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports}")


# ---------------------------------------------------------------- a broker outage on demand


# ---------------------------------------------------------------- the service


def service_pids(actor_port: int) -> list[int]:
    marker = f"INVENTORY_ACTOR_PORT={actor_port}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"gateway.cli" not in cmdline and b"inventory\x00serve" not in cmdline:
                continue
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


class EventsService:
    """`inventory serve` with AMQP through the proxy, and the test's side of the broker."""

    def __init__(self, proxy: TcpProxy, log_dir: Path) -> None:
        self.proxy = proxy
        self.prefix = f"e2e-{uuid.uuid4().hex[:10]}."
        self.grpc_port = free_port(range(50400, 50500))
        self.actor_port = free_port(range(20100, 20200))
        self.http_port = free_port(range(8400, 8500))
        self.out, self.err = log_dir / "serve.out", log_dir / "serve.err"
        self.process: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []  # everything published on <prefix>inventory_events

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            INVENTORY_DATABASE_URL=DSN,
            INVENTORY_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{self.proxy.port}/",
            INVENTORY_AMQP_PREFIX=self.prefix,
            INVENTORY_AMQP_RETRY_SECONDS=str(RETRY_SECONDS),
            INVENTORY_AMQP_MAX_ATTEMPTS="6",
            INVENTORY_RELAY_POLL_SECONDS="0.02",
            INVENTORY_GRPC_PORT=str(self.grpc_port),
            INVENTORY_ACTOR_PORT=str(self.actor_port),
            INVENTORY_HTTP_PORT=str(self.http_port),
            INVENTORY_SHARDS=str(SHARDS),
            INVENTORY_LOG_LEVEL="INFO",
            INVENTORY_LOG_JSON="false",
        )

    def log_tail(self, lines: int = 40) -> str:
        text = "".join(p.read_text(errors="replace") for p in (self.out, self.err) if p.exists())
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, broker: AbstractRobustConnection) -> None:
        with self.out.open("wb") as stdout, self.err.open("wb") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                str(INVENTORY), "serve", env=self.env(), stdout=stdout, stderr=stderr, stdin=asyncio.subprocess.DEVNULL)
        announcement = f"inventory serving gRPC on port {self.grpc_port}".encode()

        async def announced() -> bool:
            assert self.process is not None
            if self.process.returncode is not None:
                raise RuntimeError(f"inventory serve exited with {self.process.returncode}:\n{self.log_tail()}")
            return announcement in self.out.read_bytes()

        await until(announced, 60, "inventory serve announced itself")
        self.broker = broker
        self.channel = await broker.channel(publisher_confirms=True)
        self.tap = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.tap.bind(await amqp.declare_inventory_exchange(self.channel, self.prefix), "#")
        await self.tap.consume(self._on_event, no_ack=True)
        self.grpc = grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.inventory = pbg.InventoryServiceStub(self.grpc)
        self.admin = pbg.InventoryAdminServiceStub(self.grpc)
        health = health_pb2_grpc.HealthStub(self.grpc)

        async def serving() -> bool:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        await until(serving, 30, "health SERVING")
        for spec in amqp.CONSUMED:  # the consumers are up once each queue has one
            await until(lambda spec=spec: self.consumers_on(self.prefix + spec.queue), 30, f"consumer on {spec.queue}")
        self.db = await asyncpg.create_pool(DSN, min_size=1, max_size=4)

    async def queue_state(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, None if it does not exist (on a channel of its own:
        a passive declaration of a missing queue closes the channel)."""
        channel = await self.broker.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def consumers_on(self, queue: str) -> bool:
        state = await self.queue_state(queue)
        return state is not None and state[1] > 0

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        event["_routing_key"] = message.routing_key
        event["_message_id"] = message.message_id
        self.events.append(event)

    async def stop(self) -> None:
        for closing in ("grpc", "db"):
            if hasattr(self, closing):
                await getattr(self, closing).close()
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), 40)
        except TimeoutError:
            self.kill()
            raise AssertionError(f"inventory serve ignored SIGTERM:\n{self.log_tail()}") from None
        await until(lambda: _value(not service_pids(self.actor_port)), 10, "no process of the service left")
        assert code in (0, 130, -signal.SIGTERM), f"exit code {code}:\n{self.log_tail()}"

    def kill(self) -> None:
        """Last resort after a failed start or stop: SIGKILL what is left of this service (ours only)."""
        for pid in service_pids(self.actor_port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def delete_topology(self, broker: AbstractRobustConnection) -> None:
        channel = await broker.channel()
        for spec in amqp.CONSUMED:
            names = amqp.Names.of(spec, self.prefix, RETRY_SECONDS)
            for q in names.all_queues():
                await channel.queue_delete(q)
            for x in (names.exchange, names.dead_letter_exchange):
                await channel.exchange_delete(x)
        await channel.exchange_delete(self.prefix + amqp.INVENTORY_EXCHANGE)
        await channel.close()

    # ------------------------------------------------------------ publishing and watching

    async def publish(self, exchange: str, event: str, data: dict[str, Any], org: str, *,
                      event_id: str | None = None, raw: bytes | None = None,
                      occurred_at: str = "2026-11-28T05:00:00Z", **props: Any) -> str:
        """Publish one envelope (or `raw` bytes) to <prefix><exchange>; returns its event_id."""
        event_id = event_id or str(uuid.uuid4())
        body = raw if raw is not None else json.dumps(
            {"event": event, "event_id": event_id, "occurred_at": occurred_at, "organization_id": org,
             "data": data}).encode()
        x = await self.channel.get_exchange(self.prefix + exchange)
        await x.publish(aio_pika.Message(body, content_type="application/json", **props), routing_key=event)
        return event_id

    async def handled(self, event: str, event_id: str, timeout: float = 15.0) -> str:
        """Wait until the service's inbox says the message was handled; returns its outcome."""
        async def probe() -> str | None:
            row = await self.db.fetchrow("SELECT status, outcome FROM inbox WHERE message_key LIKE $1",
                                         f"%:{event}:{event_id}")  # (keys begin with the organization)
            return row["outcome"] if row and row["status"] == "done" else None

        return await until(probe, timeout, f"{event} {event_id} handled")

    def of(self, org: str, name: str | None = None, **data: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["organization_id"] == org and (name is None or e["event"] == name)
                and all(e["data"].get(k) == v for k, v in data.items())]

    async def wait_for(self, org: str, name: str, n: int = 1, timeout: float = 15.0, **data: Any) -> list[dict[str, Any]]:
        return await until(lambda: _value(len(self.of(org, name, **data)) >= n and self.of(org, name, **data)),
                           timeout, f"{n} x {name} {data}")

    async def drained(self, org: str) -> None:
        """Every outbox row of `org` has been published and has arrived at the tap."""
        await until(lambda: self.db.fetchval("SELECT count(*) = 0 FROM outbox WHERE organization_id = $1"
                                             " AND sent_at IS NULL", org), 15, "outbox drained")
        total = await self.db.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1", org)
        await until(lambda: _value(len(self.of(org)) >= total), 15, f"{total} events at the tap")

    # ------------------------------------------------------------ gRPC

    async def warehouse(self, org: str, warehouse_id: str, active: bool = True) -> None:
        await self.admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id=warehouse_id,
                                                      name=f"Bodega {warehouse_id}", active=active))

    async def receive(self, org: str, variant: str, warehouse: str, quantity: int) -> pb.StockLevel:
        reply = await self.admin.RecordMovement(pb.MovementRequest(
            organization_id=org, variant_id=variant, warehouse_id=warehouse, type=pb.MOVEMENT_TYPE_RECEIPT,
            quantity=quantity))
        return reply.stock

    async def levels(self, org: str, variant: str) -> dict[str, pb.StockLevel]:
        reply = await self.admin.GetStock(pb.GetStockRequest(organization_id=org, variant_id=variant))
        return {lv.warehouse_id: lv for lv in reply.levels}

    async def line_statuses(self, org: str, order_id: str) -> list[str]:
        rows = await self.db.fetch("SELECT status FROM reservation_lines WHERE organization_id = $1"
                                   " AND reservation_id = $2 ORDER BY variant_id", org, reservation_id(org, order_id))
        return [r["status"] for r in rows]


@pytest.fixture(scope="module")
async def broker() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def svc(broker: AbstractRobustConnection, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EventsService]:
    conn = await asyncpg.connect(TEST_DATABASE_URL)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    async with TcpProxy(AMQP_HOST, AMQP_PORT) as proxy:
        service = EventsService(proxy, tmp_path_factory.mktemp("events"))
        try:
            await service.start(broker)
            yield service
        finally:
            try:
                if service.process is not None and service.process.returncode is None:
                    await service.stop()
            except BaseException:
                service.kill()
                raise
            finally:
                with contextlib.suppress(Exception):
                    await service.delete_topology(broker)


@pytest.fixture
def org() -> str:
    return str(uuid.uuid4())


def variants_in_both_shards(org: str) -> tuple[str, str]:
    found: dict[int, str] = {}
    n = 0
    while len(found) < SHARDS:
        found.setdefault(shard_of(org, f"sku-{n}", SHARDS), f"sku-{n}")
        n += 1
    return found[0], found[1]


# ---------------------------------------------------------------- the service says what it does at start


async def test_the_service_declares_the_topology_and_says_events_are_on(svc: EventsService) -> None:
    for spec in amqp.CONSUMED:
        names = amqp.Names.of(spec, svc.prefix, RETRY_SECONDS)
        assert await svc.queue_state(names.queue) == (0, 1)
        assert await svc.queue_state(names.dead_letter_queue) is not None
        for retry_queue in names.retry_queues:
            assert await svc.queue_state(retry_queue) == (0, 0)
    assert "consuming from RabbitMQ and publishing the outbox" in svc.log_tail(200)


# ---------------------------------------------------------------- catalog


async def test_a_created_variant_gets_stock_in_every_active_warehouse_then_initialized_once(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.warehouse(org, "wh_102")
    await svc.warehouse(org, "wh_closed", active=False)
    data = {"variant_id": "var_789", "product_id": "prod_456", "sku": "PROD-001-RED-M", "track_inventory": True,
            "default_min_stock": 20, "default_max_stock": 200}
    event_id = await svc.publish("catalog_events", "catalog.variant.created", data, org)

    (initialized,) = await svc.wait_for(org, "inventory.stock.initialized")
    assert initialized["data"] == {"variant_id": "var_789", "status": "success", "warehouses": [
        {"warehouse_id": "wh_101", "stock_id": stock_id((org, "var_789", "wh_101")), "initial_quantity": 0},
        {"warehouse_id": "wh_102", "stock_id": stock_id((org, "var_789", "wh_102")), "initial_quantity": 0}]}
    assert initialized["_routing_key"] == "inventory.stock.initialized"
    assert initialized["_message_id"] == initialized["event_id"]
    levels = await svc.levels(org, "var_789")
    assert sorted(levels) == ["wh_101", "wh_102"]
    assert all((lv.min_stock, lv.max_stock, lv.on_hand) == (20, 200, 0) for lv in levels.values())

    # The same message again, then another for the same variant: the copy changed nothing.
    await svc.publish("catalog_events", "catalog.variant.created", data, org, event_id=event_id)
    fence = await svc.publish("catalog_events", "catalog.variant.updated", {"variant_id": "var_789"}, org)
    assert await svc.handled("catalog.variant.updated", fence) == "cache invalidated"
    await svc.drained(org)
    assert len(svc.of(org, "inventory.stock.initialized")) == 1


async def test_a_variant_that_does_not_track_inventory_is_acknowledged_and_gets_no_stock(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    event_id = await svc.publish("catalog_events", "catalog.variant.created",
                                 {"variant_id": "service-fee", "track_inventory": False}, org)
    assert await svc.handled("catalog.variant.created", event_id) == "ignored: track_inventory is false"
    assert await svc.levels(org, "service-fee") == {}
    await svc.drained(org)
    assert svc.of(org) == []


async def test_deleting_a_variant_that_holds_stock_publishes_validation_failed_and_archives_nothing(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.warehouse(org, "wh_102")
    await svc.receive(org, "var_789", "wh_101", 30)
    await svc.receive(org, "var_789", "wh_102", 15)
    event_id = await svc.publish("catalog_events", "catalog.variant.deleted", {"variant_id": "var_789"}, org)

    (failed,) = await svc.wait_for(org, "inventory.stock.validation_failed")
    assert failed["data"] == {
        "variant_id": "var_789", "reason": "stock_not_zero",
        "details": {"total_stock": 45, "warehouses_affected": [{"warehouse_id": "wh_101", "quantity": 30},
                                                               {"warehouse_id": "wh_102", "quantity": 15}]},
        "action_required": "Clear all stock before deleting variant"}
    assert await svc.handled("catalog.variant.deleted", event_id) == \
        "refused: stock_not_zero (inventory.stock.validation_failed written)"
    assert {lv.status for lv in (await svc.levels(org, "var_789")).values()} == {"active"}

    # A duplicate (same event_id) answers nothing more; a new request is answered again.
    await svc.publish("catalog_events", "catalog.variant.deleted", {"variant_id": "var_789"}, org, event_id=event_id)
    again = await svc.publish("catalog_events", "catalog.variant.deleted", {"variant_id": "var_789"}, org)
    await svc.handled("catalog.variant.deleted", again)
    await svc.drained(org)
    assert len(svc.of(org, "inventory.stock.validation_failed")) == 2


async def test_deleting_a_variant_without_stock_archives_it_and_archived_stock_refuses_changes(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.publish("catalog_events", "catalog.variant.created",
                      {"variant_id": "old-sku", "track_inventory": True}, org)
    await svc.wait_for(org, "inventory.stock.initialized")
    await svc.publish("catalog_events", "catalog.variant.deleted", {"variant_id": "old-sku"}, org)

    (archived,) = await svc.wait_for(org, "inventory.stock.archived")
    assert archived["data"] == {"variant_id": "old-sku", "warehouses": [
        {"warehouse_id": "wh_101", "stock_id": stock_id((org, "old-sku", "wh_101"))}]}
    assert (await svc.levels(org, "old-sku"))["wh_101"].status == "archived"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await svc.receive(org, "old-sku", "wh_101", 1)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "archived" in refused.value.details()
    placed = await svc.publish("order_events", "order.placed",
                               {"order_id": "late", "items": [{"variant_id": "old-sku", "quantity": 1}]}, org)
    assert await svc.handled("order.placed", placed) == "reservation failed: archived"
    (failed,) = await svc.wait_for(org, "inventory.reservation.failed")
    assert failed["data"]["reason"] == "archived"


# ---------------------------------------------------------------- orders


async def test_an_order_is_reserved_confirmed_shipped_and_returned_through_its_events(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "shirt", "wh_101", 10)
    placed = await svc.publish("order_events", "order.placed", {
        "order_id": "order_1", "ttl_minutes": 15, "items": [{"variant_id": "shirt", "quantity": 3}]}, org)
    assert await svc.handled("order.placed", placed) == "reserved"
    level = (await svc.levels(org, "shirt"))["wh_101"]
    assert (level.on_hand, level.reserved, level.available) == (10, 3, 7)
    await svc.wait_for(org, "inventory.stock.updated", reserved=3, available=7)

    confirmed = await svc.publish("order_events", "order.confirmed", {"order_id": "order_1"}, org)
    assert await svc.handled("order.confirmed", confirmed) == "confirmed"
    assert await svc.line_statuses(org, "order_1") == ["confirmed"]

    shipped = await svc.publish("order_events", "order.shipped", {"order_id": "order_1"}, org)
    assert await svc.handled("order.shipped", shipped) == "shipped"
    (out,) = await svc.wait_for(org, "inventory.movement.out")
    assert out["data"]["quantity"] == 3 and out["data"]["order_id"] == "order_1" and out["data"]["on_hand"] == 7
    level = (await svc.levels(org, "shirt"))["wh_101"]
    assert (level.on_hand, level.reserved, level.available) == (7, 0, 7)

    returned = await svc.publish("order_events", "order.returned", {
        "order_id": "order_1", "items": [{"variant_id": "shirt", "quantity": 1}]}, org)  # back where reserved
    assert await svc.handled("order.returned", returned) == "returned (1 stocks)"
    (back,) = await svc.wait_for(org, "inventory.movement.in", movement_type="return")
    assert back["data"]["quantity"] == 1 and back["data"]["reference_id"] == "order_1"
    assert (await svc.levels(org, "shirt"))["wh_101"].on_hand == 8

    # Copies of every one of them (same event_id, or the same content under a new id) change nothing.
    for event, event_id in (("order.placed", placed), ("order.confirmed", confirmed), ("order.shipped", shipped),
                            ("order.returned", returned)):
        data = {"order_id": "order_1", "items": [{"variant_id": "shirt", "quantity": 3 if event == "order.placed"
                                                  else 1}]}
        await svc.publish("order_events", event, data, org, event_id=event_id)
    shipped_again = await svc.publish("order_events", "order.shipped", {"order_id": "order_1"}, org)
    assert await svc.handled("order.shipped", shipped_again) == "already shipped"
    level = (await svc.levels(org, "shirt"))["wh_101"]
    assert (level.on_hand, level.reserved, level.available) == (8, 0, 8)
    await svc.drained(org)
    assert len(svc.of(org, "inventory.movement.out")) == 1
    assert len(svc.of(org, "inventory.movement.in", movement_type="return")) == 1


async def test_an_order_that_cannot_be_reserved_publishes_reservation_failed_once_with_the_short_items(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "plenty", "wh_101", 50)
    await svc.receive(org, "scarce", "wh_101", 2)
    data = {"order_id": "order_2", "items": [{"variant_id": "plenty", "quantity": 5},
                                             {"variant_id": "scarce", "quantity": 3}]}
    first = await svc.publish("order_events", "order.placed", data, org)
    assert await svc.handled("order.placed", first) == "reservation failed: insufficient_stock"
    (failed,) = await svc.wait_for(org, "inventory.reservation.failed")
    assert failed["data"]["order_id"] == "order_2"
    assert failed["data"]["reservation_id"] == reservation_id(org, "order_2")
    assert failed["data"]["reason"] == "insufficient_stock"
    assert failed["data"]["items"] == [{"variant_id": "scarce", "warehouse_id": "wh_101", "requested": 3,
                                        "available": 2}]
    levels = {v: (await svc.levels(org, v))["wh_101"].reserved for v in ("plenty", "scarce")}
    assert levels == {"plenty": 0, "scarce": 0}  # all or nothing

    # The Order Service publishes it again under a new id: still one answer.
    second = await svc.publish("order_events", "order.placed", data, org)
    assert await svc.handled("order.placed", second) == "reservation failed: insufficient_stock"
    await svc.drained(org)
    assert len(svc.of(org, "inventory.reservation.failed")) == 1


async def test_order_placed_after_the_order_service_reserved_over_grpc_is_a_no_op(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "mug", "wh_101", 10)
    reply = await svc.inventory.ReserveStock(pb.ReserveStockRequest(
        organization_id=org, order_id="order_3", items=[pb.ReserveItem(variant_id="mug", quantity=4)]))
    placed = await svc.publish("order_events", "order.placed",
                               {"order_id": "order_3", "items": [{"variant_id": "mug", "quantity": 4}]}, org)
    assert await svc.handled("order.placed", placed) == "already reserved"
    assert reply.reservation_id == reservation_id(org, "order_3")
    assert (await svc.levels(org, "mug"))["wh_101"].reserved == 4


async def test_a_cancelled_order_is_released_and_stock_released_is_published(svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "cap", "wh_101", 5)
    await svc.publish("order_events", "order.placed",
                      {"order_id": "order_4", "items": [{"variant_id": "cap", "quantity": 2}]}, org)
    cancelled = await svc.publish("order_events", "order.cancelled", {"order_id": "order_4"}, org)
    assert await svc.handled("order.cancelled", cancelled) == "released"
    (released,) = await svc.wait_for(org, "inventory.stock.released")
    assert released["data"] == {"reservation_id": reservation_id(org, "order_4"), "reason": "order cancelled",
                                "lines": [{"variant_id": "cap", "warehouse_id": "wh_101", "quantity": 2}]}
    level = (await svc.levels(org, "cap"))["wh_101"]
    assert (level.reserved, level.available) == (0, 5)
    nothing = await svc.publish("order_events", "order.cancelled", {"order_id": "never-placed"}, org)
    assert await svc.handled("order.cancelled", nothing) == "nothing reserved"


async def test_a_cancellation_that_overtakes_its_order_keeps_the_late_order_from_reserving(
        svc: EventsService, org: str) -> None:
    """order.placed failed once and was retried behind its order.cancelled (or another gateway was
    slower): the late order.placed must not hold stock for a cancelled order until its TTL."""
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "hat", "wh_101", 5)
    cancelled = await svc.publish("order_events", "order.cancelled", {"order_id": "order_9"}, org)
    assert await svc.handled("order.cancelled", cancelled) == "nothing reserved"
    placed = await svc.publish("order_events", "order.placed",
                               {"order_id": "order_9", "items": [{"variant_id": "hat", "quantity": 2}]}, org)
    assert (await svc.handled("order.placed", placed)).startswith("nothing to do: reservation")
    assert (await svc.levels(org, "hat"))["wh_101"].reserved == 0
    assert await svc.line_statuses(org, "order_9") == []


async def test_a_confirmation_that_overtakes_its_order_is_retried_until_the_reservation_exists(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "sock", "wh_101", 5)
    confirmed = await svc.publish("order_events", "order.confirmed", {"order_id": "order_5"}, org)
    await svc.publish("order_events", "order.placed",
                      {"order_id": "order_5", "items": [{"variant_id": "sock", "quantity": 1}]}, org)
    assert await svc.handled("order.confirmed", confirmed) == "confirmed"
    assert await svc.line_statuses(org, "order_5") == ["confirmed"]


async def test_a_reservation_across_both_shards_expires_with_exactly_one_event(svc: EventsService, org: str) -> None:
    left, right = variants_in_both_shards(org)
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, left, "wh_101", 5)
    await svc.receive(org, right, "wh_101", 5)
    placed = await svc.publish("order_events", "order.placed", {
        "order_id": "order_6", "ttl_seconds": 1,
        "items": [{"variant_id": left, "quantity": 2}, {"variant_id": right, "quantity": 3}]}, org)
    assert await svc.handled("order.placed", placed) == "reserved"

    (expired,) = await svc.wait_for(org, "inventory.reservation.expired", timeout=20)
    assert expired["data"]["reservation_id"] == reservation_id(org, "order_6")
    assert expired["data"]["order_id"] == "order_6"
    assert sorted((ln["variant_id"], ln["quantity"]) for ln in expired["data"]["lines"]) == \
        sorted([(left, 2), (right, 3)])
    await until(lambda: svc.line_statuses(org, "order_6"), what="lines listed")
    assert await svc.line_statuses(org, "order_6") == ["expired", "expired"]
    await svc.drained(org)
    assert len(svc.of(org, "inventory.reservation.expired")) == 1
    assert await svc.db.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1"
                                 " AND event_name = 'inventory.reservation.expired'", org) == 1
    # and, for an Order Service that follows the spec's list (stock.released: "Reservation
    # expired/released"), one inventory.stock.released per shard's part, reason "expired"
    released = svc.of(org, "inventory.stock.released")
    assert sorted((ln["variant_id"], ln["quantity"]) for e in released for ln in e["data"]["lines"]) == \
        sorted([(left, 2), (right, 3)])
    assert {e["data"]["reason"] for e in released} == {"expired"}
    assert {e["data"]["reservation_id"] for e in released} == {reservation_id(org, "order_6")}


# ---------------------------------------------------------------- stock events


async def test_every_change_publishes_stock_updated_one_per_stock_per_batch_in_sequence(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "hot", "wh_101", 1_000)
    ids = [await svc.publish("order_events", "order.placed",
                             {"order_id": f"flash-{i}", "items": [{"variant_id": "hot", "quantity": 1}]}, org)
           for i in range(60)]
    for event_id in ids:
        await svc.handled("order.placed", event_id)
    await svc.drained(org)
    updates = svc.of(org, "inventory.stock.updated", variant_id="hot")
    sequences = [e["sequence"] for e in updates]
    assert sequences == sorted(set(sequences))  # in order, at most one per stock per committed batch
    assert all(e["sequence"] == e["data"]["version"] for e in updates)
    last = updates[-1]["data"]
    assert (last["on_hand"], last["reserved"], last["available"]) == (1_000, 60, 940)
    assert updates[0]["data"]["on_hand"] == 1_000 and updates[0]["data"]["reserved"] == 0
    for e in svc.of(org):
        assert {"event", "event_id", "occurred_at", "organization_id", "data"} <= set(e)


async def test_threshold_events_fire_once_on_the_crossing_and_rearm_when_the_stock_recovers(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "lamp", "wh_101", 10)
    await svc.admin.SetStockPolicy(pb.StockPolicyRequest(organization_id=org, variant_id="lamp", warehouse_id="wh_101",
                                                         min_stock=5, max_stock=20, reorder_point=8))

    async def place(order: str, quantity: int) -> None:
        event_id = await svc.publish("order_events", "order.placed",
                                     {"order_id": order, "items": [{"variant_id": "lamp", "quantity": quantity}]}, org)
        assert await svc.handled("order.placed", event_id) == "reserved"

    async def cancel(order: str) -> None:
        event_id = await svc.publish("order_events", "order.cancelled", {"order_id": order}, org)
        assert await svc.handled("order.cancelled", event_id) == "released"

    await place("t1", 3)  # available 7: at or below the reorder point 8
    (reorder,) = await svc.wait_for(org, "inventory.stock.reorder_needed")
    assert reorder["data"]["current_stock"] == 7 and reorder["data"]["suggested_order_quantity"] == 13
    assert reorder["data"]["reorder_point"] == 8 and reorder["data"]["max_stock"] == 20
    await place("t2", 1)  # 6: nothing new
    await place("t3", 2)  # 4: at or below min_stock 5
    (low,) = await svc.wait_for(org, "inventory.stock.low_level")
    assert low["data"]["shortage"] == 1 and low["data"]["alert_level"] == "warning"
    assert low["data"]["min_stock"] == 5 and low["data"]["reorder_point"] == 8
    assert {"warehouse_name", "available_quantity", "stock_id"} <= set(low["data"])
    assert low["data"]["warehouse_name"] == "Bodega wh_101"  # (filled in by the relay: shards keep no names)
    assert low["notification_config"]["channels"] == ["email", "in_app"]
    await place("t4", 4)  # 0: depleted
    (depleted,) = await svc.wait_for(org, "inventory.stock.depleted")
    assert depleted["data"]["available_quantity"] == 0
    await cancel("t4")
    await cancel("t3")  # 6: above min_stock again (re-armed), still at or below the reorder point
    await place("t5", 2)  # 4: low again
    await svc.wait_for(org, "inventory.stock.low_level", n=2)
    await svc.drained(org)
    counts = {name: len(svc.of(org, f"inventory.stock.{name}")) for name in ("reorder_needed", "low_level", "depleted")}
    assert counts == {"reorder_needed": 1, "low_level": 2, "depleted": 1}


# ---------------------------------------------------------------- purchasing


async def test_a_purchase_order_is_in_transit_when_created_and_on_hand_when_received(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    po = {"purchase_order_id": "po_1", "warehouse_id": "wh_101", "supplier_id": "sup_456",
          "items": [{"variant_id": "chair", "quantity": 50}]}
    created = await svc.publish("purchasing_events", "purchase_order.created", po, org)
    assert await svc.handled("purchase_order.created", created) == "purchase_ordered (1 stocks)"
    level = (await svc.levels(org, "chair"))["wh_101"]
    assert (level.on_hand, level.in_transit, level.status) == (0, 50, "pending_purchase")
    again = await svc.publish("purchasing_events", "purchase_order.created", po, org)  # republished, new id
    await svc.handled("purchase_order.created", again)
    assert (await svc.levels(org, "chair"))["wh_101"].in_transit == 50

    received = await svc.publish("purchasing_events", "purchase_order.received", po, org)
    assert await svc.handled("purchase_order.received", received) == "purchase_received (1 stocks)"
    await svc.publish("purchasing_events", "purchase_order.received", po, org, event_id=received)  # a copy
    fence = await svc.publish("purchasing_events", "purchase_order.created", po, org)
    await svc.handled("purchase_order.created", fence)
    level = (await svc.levels(org, "chair"))["wh_101"]
    assert (level.on_hand, level.in_transit, level.status) == (50, 0, "active")
    await svc.wait_for(org, "inventory.stock.updated", on_hand=50, in_transit=0)


async def test_a_purchase_order_created_after_its_receipt_puts_in_transit_only_what_has_not_arrived(
        svc: EventsService, org: str) -> None:
    """purchase_order.created failed once and was retried behind its .received: what arrived
    must not stay in transit (nor the stock pending_purchase) for good."""
    await svc.warehouse(org, "wh_101")
    delivered = {"purchase_order_id": "po_2", "warehouse_id": "wh_101",
                 "items": [{"variant_id": "desk", "quantity": 20}, {"variant_id": "lamp", "quantity": 5}]}
    received = await svc.publish("purchasing_events", "purchase_order.received", delivered, org)
    assert await svc.handled("purchase_order.received", received) == "purchase_received (2 stocks)"
    ordered = {**delivered, "items": [{"variant_id": "desk", "quantity": 50}, {"variant_id": "lamp", "quantity": 5}]}
    created = await svc.publish("purchasing_events", "purchase_order.created", ordered, org)
    await svc.handled("purchase_order.created", created)
    desk = (await svc.levels(org, "desk"))["wh_101"]
    lamp = (await svc.levels(org, "lamp"))["wh_101"]
    assert (desk.on_hand, desk.in_transit, desk.status) == (20, 30, "pending_purchase")
    assert (lamp.on_hand, lamp.in_transit, lamp.status) == (5, 0, "active")
    # Another order's units in transit: a receipt ahead of its order takes from them, so its late
    # order puts all of its own in transit again (in_transit stays right).
    first = {"purchase_order_id": "po_3", "warehouse_id": "wh_101", "items": [{"variant_id": "lamp", "quantity": 10}]}
    await svc.handled("purchase_order.created", await svc.publish("purchasing_events", "purchase_order.created",
                                                                  first, org))
    second = {"purchase_order_id": "po_4", "warehouse_id": "wh_101", "items": [{"variant_id": "lamp", "quantity": 6}]}
    await svc.handled("purchase_order.received", await svc.publish("purchasing_events", "purchase_order.received",
                                                                   second, org))
    await svc.handled("purchase_order.created", await svc.publish("purchasing_events", "purchase_order.created",
                                                                  second, org))
    lamp = (await svc.levels(org, "lamp"))["wh_101"]
    assert (lamp.on_hand, lamp.in_transit) == (11, 10)  # po_3's 10 still to come


async def test_a_purchase_receipt_takes_out_of_in_transit_only_what_its_order_has_there(
        svc: EventsService, org: str) -> None:
    """in_transit holds a transfer's units and several orders' units at once: an over-delivery, or
    a delivery of an order never announced, must not take theirs (they would arrive twice)."""
    await svc.warehouse(org, "wh_a")
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "rug", "wh_a", 30)
    await svc.admin.TransferStock(pb.TransferRequest(organization_id=org, variant_id="rug", from_warehouse_id="wh_a",
                                                     to_warehouse_id="wh_101", quantity=10, transfer_id="tr-1"))
    po = {"purchase_order_id": "po_8", "warehouse_id": "wh_101", "items": [{"variant_id": "rug", "quantity": 20}]}
    await svc.handled("purchase_order.created", await svc.publish("purchasing_events", "purchase_order.created",
                                                                  po, org))
    assert (await svc.levels(org, "rug"))["wh_101"].in_transit == 30  # the transfer's 10, the order's 20
    over = {**po, "items": [{"variant_id": "rug", "quantity": 25}]}  # 5 more than ordered
    await svc.handled("purchase_order.received", await svc.publish("purchasing_events", "purchase_order.received",
                                                                   over, org))
    level = (await svc.levels(org, "rug"))["wh_101"]
    assert (level.on_hand, level.in_transit) == (25, 10)  # the transfer's 10 still on their way
    unknown = {"purchase_order_id": "po_never_seen", "warehouse_id": "wh_101",
               "items": [{"variant_id": "rug", "quantity": 4}]}
    await svc.handled("purchase_order.received", await svc.publish("purchasing_events", "purchase_order.received",
                                                                   unknown, org))
    level = (await svc.levels(org, "rug"))["wh_101"]
    assert (level.on_hand, level.in_transit) == (29, 10)
    await svc.admin.ReceiveTransfer(pb.ReceiveTransferRequest(organization_id=org, transfer_id="tr-1"))
    level = (await svc.levels(org, "rug"))["wh_101"]
    assert (level.on_hand, level.in_transit, level.status) == (39, 0, "active")


async def test_reorder_needed_names_the_last_supplier_and_the_lead_time_of_the_stock_s_purchase_orders(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    po = {"purchase_order_id": "po_7", "warehouse_id": "wh_101", "supplier_id": "sup_456",
          "items": [{"variant_id": "stool", "quantity": 50}]}
    created = await svc.publish("purchasing_events", "purchase_order.created", po, org,
                                occurred_at="2026-11-01T10:00:00Z")
    await svc.handled("purchase_order.created", created)
    receipt = {k: v for k, v in po.items() if k != "supplier_id"}  # a receipt need not name the supplier
    received = await svc.publish("purchasing_events", "purchase_order.received", receipt, org,
                                 occurred_at="2026-11-08T10:00:00+00:00")
    await svc.handled("purchase_order.received", received)
    await svc.admin.SetStockPolicy(pb.StockPolicyRequest(organization_id=org, variant_id="stool", warehouse_id="wh_101",
                                                         min_stock=5, max_stock=200, reorder_point=45))
    placed = await svc.publish("order_events", "order.placed",
                               {"order_id": "o-stool", "items": [{"variant_id": "stool", "quantity": 10}]}, org)
    assert await svc.handled("order.placed", placed) == "reserved"
    (reorder,) = await svc.wait_for(org, "inventory.stock.reorder_needed")
    assert reorder["data"]["current_stock"] == 40 and reorder["data"]["suggested_order_quantity"] == 160
    assert (reorder["data"]["last_supplier_id"], reorder["data"]["average_lead_time_days"]) == ("sup_456", 7)


async def test_a_received_purchase_order_publishes_a_receipt_movement(svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    po = {"purchase_order_id": "po_2", "warehouse_id": "wh_101", "items": [{"variant_id": "desk", "quantity": 4}]}
    await svc.publish("purchasing_events", "purchase_order.created", po, org)
    received = await svc.publish("purchasing_events", "purchase_order.received", po, org)
    await svc.handled("purchase_order.received", received)
    await svc.drained(org)
    assert [e["data"]["quantity"] for e in svc.of(org, "inventory.movement.in")] == [4]


# ---------------------------------------------------------------- malformed messages


async def test_a_malformed_message_is_dead_lettered_with_its_reason_and_the_next_one_is_handled(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.receive(org, "pen", "wh_101", 5)
    bad_id = str(uuid.uuid4())
    await svc.publish("order_events", "order.placed", {}, org, raw=b'{"event": "order.placed", "data": {"order_id": "x",'
                      b' "items": [{"variant_id": "pen", "quantity": -1}]}}', message_id=bad_id)
    good = await svc.publish("order_events", "order.placed",
                             {"order_id": "order_7", "items": [{"variant_id": "pen", "quantity": 1}]}, org)
    assert await svc.handled("order.placed", good) == "reserved"
    dlq = await svc.channel.get_queue(svc.prefix + "inventory_order_consumer.dlq")

    async def dead_letter() -> AbstractIncomingMessage | None:
        message = await dlq.get(fail=False)
        if message is None:
            return None
        await message.ack()
        return message if message.message_id == bad_id else None

    dead = await until(dead_letter, what="the malformed message in the dead-letter queue")
    assert dead.headers["x-inventory-error"] == \
        "malformed: data: Expected `int` >= 1 - at `data.items[0].quantity`"
    assert await svc.queue_state(svc.prefix + "inventory_order_consumer") == (0, 1)


# ---------------------------------------------------------------- RabbitMQ down


async def test_while_rabbitmq_is_down_grpc_keeps_serving_the_outbox_grows_and_drains_in_order_after(
        svc: EventsService, org: str) -> None:
    await svc.warehouse(org, "wh_101")
    await svc.proxy.down()
    try:
        for _ in range(20):
            await svc.receive(org, "bolt", "wh_101", 1)  # gRPC answers while the broker is unreachable
        unsent = await svc.db.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1 AND sent_at IS NULL",
                                       org)
        assert unsent >= 40  # 20 x (stock.updated + movement.in), waiting
        assert svc.of(org) == []
    finally:
        await svc.proxy.up()
    await svc.drained(org)
    updates = [e["data"]["on_hand"] for e in svc.of(org, "inventory.stock.updated")]
    assert updates == list(range(1, 21))  # every one, in order
    # The consumers are back too.
    placed = await svc.publish("order_events", "order.placed",
                               {"order_id": "after-outage", "items": [{"variant_id": "bolt", "quantity": 2}]}, org)
    assert await svc.handled("order.placed", placed, timeout=20) == "reserved"


# ---------------------------------------------------------------- metrics


async def metrics_text(svc: EventsService) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.http_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    body = await reader.read()
    writer.close()
    return body.decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_the_consumers_count_what_they_did_in_the_metrics(svc: EventsService, org: str) -> None:
    queue = svc.prefix + "inventory_catalog_consumer"
    before = await metrics_text(svc)
    acked = metric(before, "inventory_amqp_consumed_messages_total", queue=queue, outcome="ack") or 0
    dead = metric(before, "inventory_amqp_dead_lettered_messages_total", queue=queue, reason="malformed") or 0
    await svc.publish("catalog_events", "catalog.variant.created", {}, org, raw=b"[1, 2]")
    done = await svc.publish("catalog_events", "catalog.variant.updated", {"variant_id": "v"}, org)
    await svc.handled("catalog.variant.updated", done)

    async def counted() -> str | None:
        text = await metrics_text(svc)
        ok = (metric(text, "inventory_amqp_consumed_messages_total", queue=queue, outcome="ack") or 0) > acked and \
            (metric(text, "inventory_amqp_dead_lettered_messages_total", queue=queue, reason="malformed") or 0) > dead
        return text if ok else None

    text = await until(counted, what="ack and dead letter counted")
    assert metric(text, "inventory_amqp_consumer_lag_messages", queue=queue) is not None
