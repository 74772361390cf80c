"""The AMQP consumers' guarantees, on the real RabbitMQ and Postgres, with a fake handler.

The handler stands in for the business flows (the e2e tests run the real ones), so each
guarantee of the consumer machinery can be provoked on purpose: malformed messages go to
the dead-letter queue with the reason and never loop, transient failures are retried with
backoff and a bounded attempt count, duplicates (same event_id or message_id) have no
second effect, messages of one order are handled in order, and stopping gives unacked
messages back to the queue. Every test uses its own exchange/queue prefix.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, TypeVar

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from conftest import eventually

from gateway import amqp
from gateway.config import ConfigError, Settings
from gateway.events import (
    EventConsumers,
    Incoming,
    Malformed,
    OrderPlaced,
    Refused,
    Transient,
    _copy,
    _message_id,
    parse,
)
from persistence.migrate import migrate

AMQP_URL = os.environ.get("INVENTORY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
TEST_DATABASE_URL = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
DATABASE = "inv_events_it"
T = TypeVar("T")


def _url_for(name: str) -> str:
    base, _, _ = TEST_DATABASE_URL.rpartition("/")
    return f"{base}/{name}"


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
    await migrate(_url_for(DATABASE))
    p = await asyncpg.create_pool(_url_for(DATABASE), min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def broker() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


class FakeHandler:
    """Behaves by order_id: "fail-N-..." fails transiently N times, "refuse-..." is refused,
    "bad-..." is malformed, "block-..." waits for `release`; anything else succeeds."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, str]] = []  # (event, order_id) of every call
        self.done: list[tuple[str, str]] = []  # successful ones, in completion order
        self.failures: dict[str, int] = {}
        self.fixed: set[str] = set()  # orders whose simulated failure has been fixed
        self.release = asyncio.Event()
        self.running = 0
        self.max_running_per_order: dict[str, int] = {}
        self._running_per_order: dict[str, int] = {}

    def lock_key(self, msg: Incoming) -> str:
        return f"{msg.organization_id}/{msg.data.order_id}"

    async def handle(self, msg: Incoming) -> str:
        order = msg.data.order_id
        self.handled.append((msg.event, order))
        self._running_per_order[order] = self._running_per_order.get(order, 0) + 1
        self.max_running_per_order[order] = max(self.max_running_per_order.get(order, 0),
                                                self._running_per_order[order])
        try:
            if order.startswith("fail-") and order not in self.fixed:
                times = int(order.split("-")[1])
                seen = self.failures[order] = self.failures.get(order, 0) + 1
                if seen <= times:
                    raise Transient(f"database unavailable (simulated, attempt {seen})")
            if order.startswith("refuse-"):
                raise Refused("closed: reservation expired (simulated)")
            if order.startswith("bad-"):
                raise Malformed("data.items[0].warehouse_id: unknown warehouse (simulated)")
            if order.startswith("block-"):
                await self.release.wait()
            if order.startswith("slow-"):
                await asyncio.sleep(0.05)
            self.done.append((msg.event, order))
            return "ok"
        finally:
            self._running_per_order[order] -= 1


class Rig:
    """Consumers with a fake handler on a fresh prefix, and what a test needs to drive them."""

    def __init__(self, broker: AbstractRobustConnection, pool: asyncpg.Pool, **settings: Any) -> None:
        self.prefix = f"it-{uuid.uuid4().hex[:10]}."
        self.settings = replace(Settings(amqp_url=AMQP_URL, amqp_prefix=self.prefix, amqp_retry_seconds=0.05,
                                         amqp_max_attempts=4), **settings)
        self.broker = broker
        self.pool = pool
        self.handler = FakeHandler()
        self.consumers = EventConsumers(self.settings, self.handler, pool, specs=[amqp.ORDERS])
        self.names = amqp.Names.of(amqp.ORDERS, self.prefix, self.settings.amqp_retry_seconds)
        self.org = str(uuid.uuid4())

    async def start(self) -> None:
        self.consumers.start()
        await asyncio.wait_for(self.consumers.ready.wait(), 10)
        self.channel = await self.broker.channel(publisher_confirms=True)
        self.exchange = await self.channel.get_exchange(self.names.exchange)

    async def publish(self, body: bytes | dict[str, Any], routing_key: str = "order.confirmed", **props: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self.exchange.publish(aio_pika.Message(raw, content_type="application/json", **props),
                                    routing_key=routing_key)

    def event(self, name: str, order_id: str, **extra: Any) -> dict[str, Any]:
        return {"event": name, "organization_id": self.org, "data": {"order_id": order_id, **extra}}

    async def dead_letters(self, n: int, timeout: float = 10.0) -> list[AbstractIncomingMessage]:
        queue = await self.channel.get_queue(self.names.dead_letter_queue)
        got: list[AbstractIncomingMessage] = []

        async def probe() -> bool:
            message = await queue.get(fail=False, no_ack=True)
            if message is not None:
                got.append(message)
            return len(got) >= n

        await until(probe, timeout, f"{n} dead letters")
        return got

    async def queue_depth(self, name: str) -> int:
        queue = await self.channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def close(self) -> None:
        await self.consumers.stop(grace=1)
        channel = await self.broker.channel()
        for q in self.names.all_queues():
            await channel.queue_delete(q)
        for x in (self.names.exchange, self.names.dead_letter_exchange):
            await channel.exchange_delete(x)
        await channel.close()


@pytest.fixture
async def rig(broker: AbstractRobustConnection, pool: asyncpg.Pool) -> AsyncIterator[Rig]:
    r = Rig(broker, pool)
    await r.start()
    yield r
    await r.close()


# ---------------------------------------------------------------- parsing (no broker)

ORDER_EVENTS = amqp.ORDERS.routing_keys


def test_the_organization_comes_from_the_envelope_then_the_data_then_the_default() -> None:
    data = {"order_id": "o1", "items": [{"variant_id": "v", "quantity": 1}]}
    top = parse(json.dumps({"event": "order.placed", "organization_id": "top", "data": {**data,
                            "organization_id": "inner"}}).encode(), ORDER_EVENTS, "dflt")
    inner = parse(json.dumps({"event": "order.placed", "data": {**data, "organization_id": "inner"}}).encode(),
                  ORDER_EVENTS, "dflt")
    default = parse(json.dumps({"event": "order.placed", "data": data}).encode(), ORDER_EVENTS, "dflt")
    assert (top.organization_id, inner.organization_id, default.organization_id) == ("top", "inner", "dflt")
    assert isinstance(default.data, OrderPlaced) and default.data.items[0].warehouse_id == ""


def test_the_dedupe_key_is_the_organization_and_the_event_id_else_the_message_id() -> None:
    body = {"event": "order.confirmed", "data": {"order_id": "o1"}}
    assert parse(json.dumps({**body, "event_id": "e1"}).encode(), ORDER_EVENTS, "d", "m1").dedupe_key == \
        "d:order.confirmed:e1"
    assert parse(json.dumps(body).encode(), ORDER_EVENTS, "d", "m1").dedupe_key == "d:order.confirmed:m1"
    assert parse(json.dumps(body).encode(), ORDER_EVENTS, "d", None).dedupe_key == ""
    # two tenants' publishers may reuse an id: one tenant's event must not pass for the other's
    assert parse(json.dumps({**body, "organization_id": "a", "event_id": "e1"}).encode(), ORDER_EVENTS, "d").dedupe_key \
        != parse(json.dumps({**body, "organization_id": "b", "event_id": "e1"}).encode(), ORDER_EVENTS, "d").dedupe_key


@pytest.mark.parametrize(("body", "reason"), [
    (b"\x00not json", "not a JSON event envelope"),
    (b'{"event": "order.placed"}', "missing required field `data`"),
    (b'{"event": "order.exploded", "data": {}}', "unknown event 'order.exploded'"),
    (b'{"event": "order.placed", "data": {"items": [{"variant_id": "v", "quantity": 1}]}}',
     "missing required field `order_id`"),
    (b'{"event": "order.placed", "data": {"order_id": "o", "items": [{"variant_id": "v", "quantity": -2}]}}',
     "Expected `int` >= 1 - at `data.items[0].quantity`"),
    (b'{"event": "order.placed", "data": {"order_id": "o", "items": []}}', "at `data.items`"),
    (b'{"event": "order.confirmed", "data": {"order_id": "  "}}', "at `data.order_id`"),
    (b'{"event": "order.confirmed", "data": {"order_id": 7}}', "Expected `str`, got `int` - at `data.order_id`"),
])
def test_malformed_messages_are_refused_with_a_reason_naming_the_field(body: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as e:
        parse(body, ORDER_EVENTS, "d")
    assert reason in str(e.value)


def test_json_nested_deeper_than_the_decoder_goes_is_malformed_not_a_crash() -> None:
    for body in (b'{"event": "order.placed", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                 b"[" * 1_000_000,
                 b'{"event": "order.placed", "data": {"order_id": "o", "items": ' + b"[" * 100_000 + b"}}"):
        with pytest.raises(Malformed, match="nested too deeply|not a JSON|Expected `object`"):
            parse(body, ORDER_EVENTS, "d")


def test_occurred_at_is_read_when_it_is_a_time_with_a_zone_and_ignored_otherwise() -> None:
    def at(value: object) -> object:
        body = {"event": "order.confirmed", "occurred_at": value, "data": {"order_id": "o1"}}
        return parse(json.dumps(body).encode(), ORDER_EVENTS, "d").occurred_at

    assert at("2026-11-08T10:00:00Z") == datetime(2026, 11, 8, 10, tzinfo=UTC)
    assert at("2026-11-08T12:00:00+02:00") == datetime(2026, 11, 8, 10, tzinfo=UTC)
    assert at("2026-11-08T10:00:00") is None and at("yesterday") is None and at("") is None  # no zone, no time
    assert at(None) is None
    assert at("0001-01-01T00:00:00+01:00") is None  # (out of Postgres's range in UTC: ignored, not a failure)


def test_a_message_id_with_nul_is_malformed_when_it_is_the_dedupe_key() -> None:
    body = json.dumps({"event": "order.confirmed", "data": {"order_id": "o1"}}).encode()
    with pytest.raises(Malformed, match="message_id: must not contain NUL"):
        parse(body, ORDER_EVENTS, "d", "a\x00b")
    with_id = json.dumps({"event": "order.confirmed", "event_id": "e1", "data": {"order_id": "o1"}}).encode()
    assert parse(with_id, ORDER_EVENTS, "d", "a\x00b").event_id == "e1"


# ---------------------------------------------------------------- the consumer on the real broker


async def test_a_routing_key_other_than_the_event_is_dead_lettered(rig: Rig) -> None:
    """A publisher allowed to send order.confirmed (a broker permission by routing key) cannot smuggle in
    an order.placed; a retry coming back through the queue's own name is still accepted."""
    await rig.publish(rig.event("order.placed", "smuggled", items=[{"variant_id": "v", "quantity": 1}]),
                      routing_key="order.confirmed")
    (dead,) = await rig.dead_letters(1)
    assert dead.headers["x-inventory-error"] == (
        "malformed: routing key 'order.confirmed' does not match event 'order.placed'")
    assert dead.headers["x-inventory-routing-key"] == "order.confirmed"
    assert rig.handler.handled == []
    await rig.publish(rig.event("order.confirmed", "fail-1-back"))  # retried once: back with the queue's name
    await until(lambda: _async(("order.confirmed", "fail-1-back") in rig.handler.done), what="retry handled")


async def test_malformed_messages_are_dead_lettered_with_the_reason_and_the_valid_one_behind_them_is_handled(
        rig: Rig) -> None:
    await rig.publish(b"{not json", message_id="m-1")
    await rig.publish(rig.event("order.exploded", "o-1"), routing_key="order.placed")
    await rig.publish({"event": "order.placed", "organization_id": rig.org, "data": {"order_id": "o-2"}},
                      routing_key="order.placed")
    await rig.publish({"event": "order.placed", "organization_id": rig.org,
                       "data": {"order_id": "o-3", "items": [{"variant_id": "v", "quantity": -1}]}},
                      routing_key="order.placed")
    await rig.publish(rig.event("order.confirmed", "bad-4"))
    await rig.publish(rig.event("order.confirmed", "good-5"))

    dead = await rig.dead_letters(5)
    reasons = [m.headers["x-inventory-error"] for m in dead]
    assert "malformed: not a JSON event envelope" in reasons[0]
    assert "unknown event 'order.exploded'" in reasons[1]
    assert "missing required field `items`" in reasons[2]
    assert ">= 1 - at `data.items[0].quantity`" in reasons[3]
    assert "malformed: data.items[0].warehouse_id: unknown warehouse" in reasons[4]
    assert dead[0].body == b"{not json" and dead[0].message_id == "m-1"
    assert all(m.headers["x-inventory-queue"] == rig.names.queue for m in dead)
    await until(lambda: _async(("order.confirmed", "good-5") in rig.handler.done), what="valid message handled")
    assert sorted(o for _, o in rig.handler.handled) == ["bad-4", "good-5"]  # the malformed never reached it
    assert await rig.queue_depth(rig.names.queue) == 0 and all([await rig.queue_depth(q) == 0 for q in rig.names.retry_queues])
    await until(lambda: _async(rig.consumers.stats.dead_lettered == 5), what="5 counted")  # after the ack


async def test_a_transient_failure_is_retried_with_backoff_and_then_handled_once(rig: Rig) -> None:
    await rig.publish(rig.event("order.confirmed", "fail-2-a"), message_id=str(uuid.uuid4()))
    await until(lambda: _async(("order.confirmed", "fail-2-a") in rig.handler.done), what="handled at last")
    await until(lambda: _async(rig.consumers.stats.acked == 1), what="acked")  # counted after the ack
    assert rig.handler.handled.count(("order.confirmed", "fail-2-a")) == 3
    assert rig.consumers.stats.retried == 2 and rig.consumers.stats.acked == 1
    assert rig.consumers.stats.dead_lettered == 0


async def test_a_short_retry_is_not_held_back_by_a_long_one_queued_before_it(
        broker: AbstractRobustConnection, pool: asyncpg.Pool) -> None:
    """RabbitMQ expires messages only at the head of a queue: in one retry queue with per-message
    TTLs, a message waiting 60 s for its 8th attempt held back a first retry of 0.5 s behind it."""
    rig = Rig(broker, pool, amqp_retry_seconds=0.5, amqp_max_attempts=20)
    assert rig.names.retry_delays == (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
    await rig.start()
    try:
        await rig.publish(rig.event("order.confirmed", "fail-100-late"), headers={"x-inventory-attempts": 7})
        await until(lambda: _async(rig.consumers.stats.retried == 1), what="the late one retried")
        assert await rig.queue_depth(rig.names.retry_queue_for(60.0)) == 1  # waiting its 60 s
        started = time.monotonic()
        await rig.publish(rig.event("order.confirmed", "fail-1-soon"))
        await until(lambda: _async(("order.confirmed", "fail-1-soon") in rig.handler.done), timeout=10.0,
                    what="the short retry handled while the long one waits")
        assert time.monotonic() - started < 10.0
        assert rig.handler.handled.count(("order.confirmed", "fail-100-late")) == 1  # still waiting
        assert await rig.queue_depth(rig.names.retry_queue_for(60.0)) == 1
    finally:
        await rig.close()


def test_the_retry_ladder_doubles_from_the_first_delay_up_to_a_minute() -> None:
    assert amqp.retry_delays(1.0) == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
    assert amqp.retry_delays(60.0) == (60.0,) and amqp.retry_delays(45.0) == (45.0, 60.0)
    names = amqp.Names.of(amqp.ORDERS, "p.", 1.0)
    assert names.retry_queue_for(4.0) == "p.inventory_order_consumer.retry.4000"
    assert names.retry_queue_for(3.0) == "p.inventory_order_consumer.retry.4000"  # the next rung up
    assert names.retry_queue_for(600.0) == "p.inventory_order_consumer.retry.60000"  # the last
    assert names.all_queues()[0] == "p.inventory_order_consumer" and len(names.all_queues()) == 9
    with pytest.raises(ValueError, match="positive"):
        amqp.retry_delays(0.0)
    assert Settings.from_env({"INVENTORY_AMQP_RETRY_SECONDS": "0.25"}).amqp_retry_seconds == 0.25
    for bad in ("0", "-1", "61", "nan"):
        with pytest.raises(ConfigError, match="INVENTORY_AMQP_RETRY_SECONDS must be between 0.001 and 60"):
            Settings.from_env({"INVENTORY_AMQP_RETRY_SECONDS": bad})


async def test_a_copy_of_a_message_without_message_id_keeps_having_none(rig: Rig) -> None:
    """Publishers that set no AMQP message_id (most clients' default) exist; the broker client
    gives any message it publishes one, so a retry or dead-letter copy must say it had none:
    otherwise the copy's identity (its inbox key, its effects' keys) is a new random id, and
    what the original did in part is done again."""

    def original(message_id: str | None) -> Any:  # what the consumer got: the fields `_copy` reads
        return SimpleNamespace(body=b"{}", headers={"x-death": [], "custom": "kept"}, message_id=message_id,
                               content_type="application/json", content_encoding=None, correlation_id=None,
                               type=None, timestamp=None, app_id=None)

    queue = await rig.channel.declare_queue(exclusive=True, auto_delete=True)
    for original_id in (None, "m-1"):
        await rig.channel.default_exchange.publish(_copy(original(original_id), {"x-inventory-attempts": 1}),
                                                   routing_key=queue.name)
        got = await queue.get(timeout=5)
        assert got is not None
        await got.ack()
        assert got.message_id  # the broker client gave it one either way
        assert _message_id(got) == original_id
        assert got.headers["custom"] == "kept" and "x-death" not in got.headers
        parsed = parse(json.dumps({"event": "order.confirmed", "data": {"order_id": "o1"}}).encode(),
                       ORDER_EVENTS, "d", _message_id(got))
        assert parsed.dedupe_key == ("" if original_id is None else "d:order.confirmed:m-1")


async def test_a_failure_that_persists_is_dead_lettered_after_the_last_attempt_never_looping(rig: Rig) -> None:
    await rig.publish(rig.event("order.confirmed", "fail-99-b"))
    (dead,) = await rig.dead_letters(1)
    assert dead.headers["x-inventory-error"].startswith("gave up after 4 attempts: database unavailable")
    assert dead.headers["x-inventory-attempts"] == 4
    assert rig.handler.handled.count(("order.confirmed", "fail-99-b")) == 4
    assert await rig.queue_depth(rig.names.queue) == 0 and all([await rig.queue_depth(q) == 0 for q in rig.names.retry_queues])


async def test_a_refused_message_is_dead_lettered_at_once(rig: Rig) -> None:
    await rig.publish(rig.event("order.confirmed", "refuse-c"))
    (dead,) = await rig.dead_letters(1)
    assert dead.headers["x-inventory-error"] == "refused: closed: reservation expired (simulated)"
    assert rig.handler.handled == [("order.confirmed", "refuse-c")]


async def test_the_same_event_id_or_message_id_twice_has_no_second_effect(rig: Rig) -> None:
    event_id = str(uuid.uuid4())
    await rig.publish({**rig.event("order.confirmed", "dup-event"), "event_id": event_id})
    await rig.publish({**rig.event("order.confirmed", "dup-event"), "event_id": event_id})
    message_id = str(uuid.uuid4())
    await rig.publish(rig.event("order.confirmed", "dup-message"), message_id=message_id)
    await rig.publish(rig.event("order.confirmed", "dup-message"), message_id=message_id)
    await rig.publish(rig.event("order.confirmed", "no-id"))
    await rig.publish(rig.event("order.confirmed", "no-id"))
    await until(lambda: _async(rig.consumers.stats.acked + rig.consumers.stats.duplicates == 6), what="all settled")
    assert rig.handler.handled.count(("order.confirmed", "dup-event")) == 1
    assert rig.handler.handled.count(("order.confirmed", "dup-message")) == 1
    # Without any id the inbox cannot tell copies apart: the flows' own idempotency is the guard.
    assert rig.handler.handled.count(("order.confirmed", "no-id")) == 2
    assert rig.consumers.stats.duplicates == 2
    outcome = await rig.pool.fetchval("SELECT outcome FROM inbox WHERE queue = $1 AND message_key = $2",
                                      rig.names.queue, f"{rig.org}:order.confirmed:{event_id}")
    assert outcome == "ok"


async def test_a_dead_lettered_message_sent_again_is_handled_again(rig: Rig) -> None:
    """A refusal is not remembered in the inbox: an operator may fix the cause and replay the dead letter."""
    event_id = str(uuid.uuid4())
    await rig.publish({**rig.event("order.confirmed", "fail-99-replay"), "event_id": event_id})
    await rig.dead_letters(1)
    rig.handler.fixed.add("fail-99-replay")  # the cause is fixed
    await rig.publish({**rig.event("order.confirmed", "fail-99-replay"), "event_id": event_id})
    await until(lambda: _async(("order.confirmed", "fail-99-replay") in rig.handler.done), what="replayed")


async def test_messages_of_one_order_are_handled_one_at_a_time_in_delivery_order(rig: Rig) -> None:
    for i in range(10):
        await rig.publish(rig.event("order.confirmed", "slow-same", step=i))
        await rig.publish(rig.event("order.confirmed", f"slow-other-{i}"))
    await until(lambda: _async(len(rig.handler.done) == 20), what="20 handled")
    assert rig.handler.max_running_per_order["slow-same"] == 1
    assert max(rig.handler.max_running_per_order.values()) == 1


async def test_stopping_gives_unacked_messages_back_to_the_queue(broker: AbstractRobustConnection,
                                                                 pool: asyncpg.Pool) -> None:
    rig = Rig(broker, pool)
    await rig.start()
    try:
        await rig.publish(rig.event("order.confirmed", "block-1"))
        await until(lambda: _async(("order.confirmed", "block-1") in rig.handler.handled), what="in progress")
        await rig.consumers.stop(grace=0.2)  # the handler is still blocked: the message is not acked
        assert rig.handler.done == []
        again = EventConsumers(rig.settings, rig.handler, pool, specs=[amqp.ORDERS])
        rig.handler.release.set()
        again.start()
        try:
            await until(lambda: _async(("order.confirmed", "block-1") in rig.handler.done), what="redelivered")
        finally:
            await again.stop(grace=1)
    finally:
        await rig.close()


async def _async(value: T) -> T:
    return value


# ---------------------------------------------------------------- the real handlers' error table, without a broker


async def test_without_an_amqp_url_events_are_off_and_the_service_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.events import EventIntegration

    caplog.set_level("INFO", logger="inventory.events")
    assert EventIntegration.start(Settings(amqp_url=None), core=None) is None  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if r.name == "inventory.events"]
    assert lines == [("INVENTORY_AMQP_URL is unset: event consumers and the outbox relay are off; "
                      "outgoing events wait in the outbox")]


async def test_postgres_down_makes_an_order_event_a_transient_failure_to_retry() -> None:
    from gateway.events import EventHandlers
    from gateway.flows import Core

    dead = await asyncpg.create_pool("postgresql://root@127.0.0.1:1/nowhere", min_size=0, max_size=1)
    try:
        handlers = EventHandlers(Core(Settings(), None, dead))  # type: ignore[arg-type]
        for event in ("order.confirmed", "order.cancelled", "order.shipped"):
            msg = parse(json.dumps({"event": event, "data": {"order_id": "o1"}}).encode(), ORDER_EVENTS, "org")
            with pytest.raises(Transient, match="database unavailable"):
                await handlers.handle(msg)
    finally:
        await dead.close()
