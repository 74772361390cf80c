"""The outbox relay on the real Postgres and RabbitMQ: order, confirms, one active relay, final flush.

The relay publishes every unsent row of its database, so these tests run on a database
of their own (`inv_events_it`, shared only with the consumer tests, which write no outbox
rows) and each on its own exchange prefix. Each test starts by marking what earlier runs
left unsent as sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from conftest import eventually

from actors.messages import ThresholdCrossed
from actors.stock import StockState
from gateway import amqp
from gateway.config import Settings
from gateway.relay import OutboxRelay
from persistence import outbox
from persistence.migrate import migrate

AMQP_URL = os.environ.get("INVENTORY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
TEST_DATABASE_URL = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
DATABASE = "inv_events_it"
T = TypeVar("T")


def _url_for(name: str) -> str:
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    return f"{base}/{name}"


DSN = _url_for(DATABASE)


async def until(probe: Callable[[], Awaitable[T | None]], timeout: float = 10.0, what: str = "condition") -> T:
    return await eventually(probe, timeout=timeout, interval=0.02, what=what)


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(TEST_DATABASE_URL)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    await migrate(DSN)
    p = await asyncpg.create_pool(DSN, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def broker() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


class Tap:
    """A queue of the test's own bound to <prefix>inventory_events, collecting what arrives."""

    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []

    async def start(self, broker: AbstractRobustConnection, prefix: str) -> None:
        self.channel = await broker.channel()
        exchange = await amqp.declare_inventory_exchange(self.channel, prefix)
        self.queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.queue.bind(exchange, "#")
        await self.queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)

    def events(self, org: str) -> list[dict[str, Any]]:
        found = [json.loads(m.body) for m in self.messages]
        return [e for e in found if e["organization_id"] == org]

    async def close(self) -> None:
        await self.channel.close()


@pytest.fixture
async def prefix(broker: AbstractRobustConnection, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await pool.execute("UPDATE outbox SET sent_at = now() WHERE sent_at IS NULL")
    p = f"it-{uuid.uuid4().hex[:10]}."
    yield p
    channel = await broker.channel()
    await channel.exchange_delete(p + amqp.INVENTORY_EXCHANGE)
    await channel.close()


@pytest.fixture
async def tap(broker: AbstractRobustConnection, prefix: str) -> AsyncIterator[Tap]:
    t = Tap()
    await t.start(broker, prefix)
    yield t
    await t.close()


def relay_for(prefix: str, **overrides: Any) -> OutboxRelay:
    settings: dict[str, Any] = {"amqp_url": AMQP_URL, "amqp_prefix": prefix, "database_url": DSN,
                                "relay_poll_seconds": 0.02}
    return OutboxRelay(Settings(**{**settings, **overrides}))


async def write_events(pool: asyncpg.Pool, org: str, n: int, start: int = 0) -> None:
    rows = [outbox.envelope("inventory.stock.updated", org, {"n": i, "variant_id": "v"}, time.time(), sequence=i)
            for i in range(start, start + n)]
    async with pool.acquire() as conn:
        for i in range(0, n, 200):  # several transactions, as shards write them
            await outbox.insert(conn, rows[i:i + 200])


async def test_the_relay_publishes_every_row_in_id_order_with_its_envelope_and_marks_it_sent(
        pool: asyncpg.Pool, tap: Tap, prefix: str) -> None:
    org = str(uuid.uuid4())
    await write_events(pool, org, 1_200)  # more than two batches of 500
    relay = relay_for(prefix)
    relay.start()
    try:
        await until(lambda: _async(len(tap.events(org)) >= 1_200), what="1,200 events published")
        await until(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE organization_id = $1"
                                          " AND sent_at IS NULL", org), what="all marked sent")
        assert relay.stats.published >= 1_200 and relay.stats.active
    finally:
        await relay.stop()
    events = tap.events(org)
    assert [e["data"]["n"] for e in events] == list(range(1_200))  # in order, once each
    first = next(m for m in tap.messages if json.loads(m.body)["organization_id"] == org)
    row = await pool.fetchrow("SELECT event_id::text, payload FROM outbox WHERE organization_id = $1 ORDER BY id"
                              " LIMIT 1", org)
    assert first.message_id == row["event_id"] and first.routing_key == "inventory.stock.updated"
    assert first.content_type == "application/json"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert json.loads(first.body) == json.loads(row["payload"])
    assert set(json.loads(first.body)) == {"event", "event_id", "occurred_at", "organization_id", "sequence", "data"}


async def test_a_row_the_broker_did_not_confirm_stays_unsent_until_it_is_confirmed(
        broker: AbstractRobustConnection, pool: asyncpg.Pool, tap: Tap, prefix: str) -> None:
    """A queue that refuses new messages (overflow reject-publish) makes the broker nack the publish:
    with confirms ignored, the relay would mark the row sent and the event would be lost."""
    channel = await broker.channel()
    exchange = await amqp.declare_inventory_exchange(channel, prefix)
    full = await channel.declare_queue(f"{prefix}full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    await full.bind(exchange, "#")
    org = str(uuid.uuid4())
    await write_events(pool, org, 3)
    relay = relay_for(prefix)
    relay.start()
    try:
        await until(lambda: _async(relay.stats.failures >= 2), what="the publish nacked, twice")
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1 AND sent_at IS NULL",
                                   org) == 3
        await full.delete(if_unused=False, if_empty=False)  # the broker accepts again
        await until(lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE organization_id = $1"
                                          " AND sent_at IS NULL", org), what="sent after the confirm")
        await until(lambda: _async(len(tap.events(org)) >= 3), what="the events arrived")
    finally:
        await relay.stop()
        await channel.close()
    assert [e["data"]["n"] for e in tap.events(org)][-3:] == [0, 1, 2]


async def test_of_two_relays_one_publishes_and_the_other_takes_over_when_it_stops(
        pool: asyncpg.Pool, tap: Tap, prefix: str) -> None:
    org = str(uuid.uuid4())
    first, second = relay_for(prefix), relay_for(prefix)
    first.start()
    await until(lambda: _async(first.stats.active), what="the first relay active")
    second.start()
    try:
        await write_events(pool, org, 300)
        await until(lambda: _async(len(tap.events(org)) >= 300), what="300 events")
        assert not second.stats.active and second.stats.published == 0
        await first.stop()
        await write_events(pool, org, 300, start=300)
        await until(lambda: _async(len(tap.events(org)) >= 600), what="600 events", timeout=15)
        assert second.stats.active
    finally:
        await first.stop()
        await second.stop()
    assert [e["data"]["n"] for e in tap.events(org)] == list(range(600))  # no duplicate, no gap


async def test_stopping_flushes_what_was_written_just_before(pool: asyncpg.Pool, tap: Tap, prefix: str) -> None:
    org = str(uuid.uuid4())
    relay = relay_for(prefix, relay_poll_seconds=30.0)  # it would not look again on its own for 30 s
    relay.start()
    await until(lambda: _async(relay.stats.active and relay.stats.rounds >= 1), what="active")
    await write_events(pool, org, 10)
    await relay.stop()
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1 AND sent_at IS NULL", org) == 0
    await until(lambda: _async(len(tap.events(org)) == 10), what="10 events")


async def test_a_relay_whose_broker_is_unreachable_leaves_the_rows_and_says_so(pool: asyncpg.Pool,
                                                                               prefix: str) -> None:
    org = str(uuid.uuid4())
    await write_events(pool, org, 5)
    relay = OutboxRelay(Settings(amqp_url="amqp://guest:guest@127.0.0.1:1/", amqp_prefix=prefix, database_url=DSN))
    relay.start()
    try:
        await until(lambda: _async(relay.stats.failures >= 2), what="two failed attempts")
        assert "Connection" in relay.stats.last_error or "connect" in relay.stats.last_error.lower()
    finally:
        await relay.stop()
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1 AND sent_at IS NULL", org) == 5
    await pool.execute("UPDATE outbox SET sent_at = now() WHERE organization_id = $1", org)


async def _async(value: T) -> T:
    return value


async def test_the_relay_runs_as_a_process_of_its_own_and_flushes_on_sigterm(pool: asyncpg.Pool, tap: Tap,
                                                                             prefix: str) -> None:
    org = str(uuid.uuid4())
    env = dict(os.environ, INVENTORY_DATABASE_URL=DSN, INVENTORY_AMQP_URL=AMQP_URL, INVENTORY_AMQP_PREFIX=prefix,
               INVENTORY_RELAY_POLL_SECONDS="0.02", INVENTORY_LOG_LEVEL="WARNING")
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.relay", env=env,
                                                   stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line.decode().startswith(f"inventory relay publishing to {prefix}inventory_events")
        await write_events(pool, org, 50)
        await until(lambda: _async(len(tap.events(org)) >= 50), what="50 events from the relay process")
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert [e["data"]["n"] for e in tap.events(org)] == list(range(50))


async def test_published_rows_are_forgotten_after_the_retention_and_unsent_ones_never(pool: asyncpg.Pool,
                                                                                      prefix: str) -> None:
    from persistence import queries

    org = str(uuid.uuid4())
    await write_events(pool, org, 6)
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM outbox WHERE organization_id = $1 ORDER BY id", org)]
    await pool.execute("UPDATE outbox SET sent_at = now() - interval '8 days' WHERE id = ANY($1::bigint[])", ids[:2])
    await pool.execute("UPDATE outbox SET sent_at = now() - interval '1 day' WHERE id = ANY($1::bigint[])", ids[2:4])
    async with pool.acquire() as conn:
        assert await queries.outbox_prune(conn, 7 * 24 * 3600.0) >= 2
    left = [r["id"] for r in await pool.fetch("SELECT id FROM outbox WHERE organization_id = $1 ORDER BY id", org)]
    assert left == ids[2:]  # recent published rows and the unsent ones stay
    await pool.execute("UPDATE outbox SET sent_at = now() WHERE organization_id = $1", org)


# ---------------------------------------------------------------- payloads the relay completes

REDIS_URL = "redis://127.0.0.1:6379/0"


async def write_thresholds(pool: asyncpg.Pool, org: str, kind: str, variants: list[str],
                           warehouse: str = "wh_101") -> None:
    """Threshold rows as a shard writes them (persistence.outbox.threshold): no names, no supplier."""
    rows = [outbox.threshold((org, v, warehouse), ThresholdCrossed(kind=kind, available=4),
                             StockState(org, v, warehouse, on_hand=10, reserved=6, min_stock=5, max_stock=50,
                                        reorder_point=8, version=3), time.time())
            for v in variants]
    async with pool.acquire() as conn:
        await outbox.insert(conn, rows)


async def test_low_level_gets_the_variant_s_sku_and_name_from_the_catalog_once_then_from_the_cache(
        pool: asyncpg.Pool, tap: Tap, prefix: str) -> None:
    from catalog_double import catalog_double

    org = str(uuid.uuid4())
    await pool.execute("INSERT INTO warehouses (organization_id, warehouse_id, name) VALUES ($1, 'wh_101',"
                       " 'Bodega Principal')", org)
    async with catalog_double() as catalog:
        catalog.double.add(org, "var_789", sku="CAM-ROJA-M", product_name="Camiseta Roja M")
        relay = relay_for(prefix, catalog_host="127.0.0.1", catalog_port=catalog.port, redis_url=REDIS_URL)
        relay.start()
        try:
            await write_thresholds(pool, org, "low_level", ["var_789", "unknown"])
            await until(lambda: _async(len(tap.events(org)) == 2), what="2 low_level events")
            asked = catalog.double.calls
            await write_thresholds(pool, org, "low_level", ["var_789"])  # a later batch: from the cache
            await until(lambda: _async(len(tap.events(org)) == 3), what="3 low_level events")
        finally:
            await relay.stop()
    first, unknown, again = (e["data"] for e in tap.events(org))
    assert (first["sku"], first["product_name"], first["warehouse_name"]) == \
        ("CAM-ROJA-M", "Camiseta Roja M", "Bodega Principal")
    assert (unknown["sku"], unknown["product_name"], unknown["warehouse_name"]) == ("", "", "Bodega Principal")
    assert (again["sku"], again["product_name"]) == ("CAM-ROJA-M", "Camiseta Roja M")
    assert asked == 2 and catalog.double.calls == 2  # once per variant; the third from Redis
    assert first["shortage"] == 1 and first["available_quantity"] == 4  # the shard's fields untouched


async def test_a_catalog_that_does_not_answer_is_not_waited_on_for_every_low_level_event(
        pool: asyncpg.Pool, tap: Tap, prefix: str) -> None:
    from catalog_double import catalog_double

    org = str(uuid.uuid4())
    async with catalog_double() as catalog:
        catalog.double.hang(health=False)
        relay = relay_for(prefix, catalog_host="127.0.0.1", catalog_port=catalog.port, catalog_timeout_seconds=0.5)
        relay.start()
        try:
            await write_thresholds(pool, org, "low_level", [f"v{i}" for i in range(20)])
            await until(lambda: _async(len(tap.events(org)) == 20), timeout=20, what="20 low_level events")
        finally:
            catalog.double.resume()
            await relay.stop()
    assert all(e["data"]["sku"] == "" and e["data"]["product_name"] == "" for e in tap.events(org))
    assert catalog.double.calls <= 3  # the first variant's call (with its retries), then none for 30 s


async def test_a_slow_catalog_is_asked_only_while_the_batch_s_time_for_names_lasts(
        pool: asyncpg.Pool, tap: Tap, prefix: str) -> None:
    """A Catalog that answers, slowly, never opens the quiet period: asked for every variant, 500
    rows would hold every event (stock.updated too) for minutes. NAMES_BUDGET bounds it."""
    from catalog_double import catalog_double

    org = str(uuid.uuid4())
    async with catalog_double() as catalog:
        variants = [f"v{i}" for i in range(10)]
        for v in variants:
            catalog.double.add(org, v, sku=f"SKU-{v}", product_name=f"Product {v}")
        catalog.double.delay = 0.6  # each call; the relay's call timeout is 2 s, its budget 3 s per batch
        relay = relay_for(prefix, catalog_host="127.0.0.1", catalog_port=catalog.port)
        await write_thresholds(pool, org, "low_level", variants)
        relay.start()
        try:
            await until(lambda: _async(len(tap.events(org)) == 10), timeout=20, what="10 low_level events")
        finally:
            await relay.stop()
    named = [e["data"]["sku"] for e in tap.events(org) if e["data"]["sku"]]
    assert 1 <= catalog.double.calls <= 2 and len(named) == catalog.double.calls, (catalog.double.calls, named)


async def test_the_purchase_order_lock_is_not_a_shard_s_lock(pool: asyncpg.Pool) -> None:
    """Both are advisory locks of two keys; a purchase order whose hash equals a shard id must not
    wait for the shard that holds its lock for as long as it serves (it did: same namespace)."""
    from persistence import queries, store

    holder = await asyncpg.connect(DSN)
    try:
        shard = await holder.fetchval("SELECT hashtext('acme:po-933500334')")
        assert shard == 2  # a purchase order id found to hash to shard 2's lock id
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1, $2)", store.SHARD_LOCK_NAMESPACE, shard)
        async with asyncio.timeout(5):
            async with queries.purchase_order_lock(pool, "acme", "po-933500334") as conn:
                assert await conn.fetchval("SELECT 1") == 1
    finally:
        await holder.close()


async def test_one_purchase_order_at_a_time_across_pools_and_others_unhindered(pool: asyncpg.Pool) -> None:
    """What keeps two gateways (two pools) from reading one purchase order's ledger at once: the
    second waits for the first to let go; another order does not wait; the lock always goes."""
    from persistence import queries

    other = await asyncpg.create_pool(DSN, min_size=1, max_size=2)  # another gateway's pool
    org = str(uuid.uuid4())
    try:
        async with queries.purchase_order_lock(pool, org, "po-1"):
            second = asyncio.ensure_future(_hold(other, org, "po-1"))
            await asyncio.sleep(0.3)
            assert not second.done()  # waiting
            async with asyncio.timeout(5):
                await _hold(other, org, "po-2")  # another order: at once
        async with asyncio.timeout(5):
            await second  # let go: the second gets it
        with pytest.raises(RuntimeError):
            async with queries.purchase_order_lock(pool, org, "po-1"):
                raise RuntimeError("a failure while holding it")
        async with asyncio.timeout(5):
            await _hold(other, org, "po-1")  # and the lock went with it
    finally:
        await other.close()


async def _hold(pool: asyncpg.Pool, org: str, purchase_order: str) -> None:
    from persistence import queries

    async with queries.purchase_order_lock(pool, org, purchase_order) as conn:
        assert await conn.fetchval("SELECT 1") == 1


async def test_reorder_needed_gets_the_last_supplier_and_the_average_lead_time_from_the_purchase_history(
        pool: asyncpg.Pool, tap: Tap, prefix: str) -> None:
    from datetime import UTC, datetime, timedelta

    from persistence import queries

    org = str(uuid.uuid4())
    day0 = datetime(2026, 1, 5, 9, tzinfo=UTC)

    async def purchase(po: str, supplier: str, ordered: int, received: int | None, variant: str = "chair") -> None:
        await queries.record_purchase(pool, org, po, "wh_101", [variant], supplier, day0 + timedelta(days=ordered),
                                      received=False)
        if received is not None:  # a receipt that names no supplier keeps the order's
            await queries.record_purchase(pool, org, po, "wh_101", [variant], "", day0 + timedelta(days=received),
                                          received=True)
            await queries.record_purchase(pool, org, po, "wh_101", [variant], "", day0 + timedelta(days=received + 3),
                                          received=True)  # a second delivery: the first one counts

    await purchase("po-1", "sup_1", 0, 7)
    await purchase("po-2", "sup_2", 10, 15)
    await purchase("po-3", "sup_3", 20, None)  # not delivered yet: the latest supplier, no lead time
    await purchase("po-4", "sup_9", 30, 31, variant="table")  # another stock
    await queries.record_purchase(pool, org, "po-3", "wh_101", ["chair"], "sup_3", day0, received=False)  # replay
    relay = relay_for(prefix)
    relay.start()
    try:
        await write_thresholds(pool, org, "reorder_needed", ["chair", "lamp"])
        await until(lambda: _async(len(tap.events(org)) == 2), what="2 reorder_needed events")
    finally:
        await relay.stop()
    chair, lamp = (e["data"] for e in tap.events(org))
    assert (chair["last_supplier_id"], chair["average_lead_time_days"]) == ("sup_3", 6)  # (7 + 5) / 2
    assert (lamp["last_supplier_id"], lamp["average_lead_time_days"]) == (None, None)  # never purchased
    assert chair["suggested_order_quantity"] == 46 and chair["current_stock"] == 4
