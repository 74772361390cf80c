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
