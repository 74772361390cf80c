"""The RabbitMQ topology of the service, and how it connects.

Everything is durable and declared by the service at start (declaring is idempotent):

    catalog_events     (topic) --catalog.variant.*------------> inventory_catalog_consumer
    order_events       (topic) --order.*----------------------> inventory_order_consumer   (prefetch 20)
    purchasing_events  (topic) --purchase_order.*-------------> inventory_purchasing_consumer
    inventory_events   (topic) <-- the outbox relay, routing key = event name

and for each consumed queue `<queue>`:

    <queue>.dlx (fanout) --> <queue>.dlq        dead letters (the reason in header x-inventory-error)
    <queue>.retry (no consumer; per-message TTL, then dead-lettered back into <queue>)

`Settings.amqp_prefix` is prepended to every name (empty by default), so tests and
side-by-side deployments on one broker never share a queue.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection

log = logging.getLogger("inventory.amqp")

INVENTORY_EXCHANGE = "inventory_events"


@dataclass(frozen=True)
class ConsumedQueue:
    """One consumed queue: which exchange, which routing keys, how many unacked messages at once."""

    exchange: str
    queue: str
    routing_keys: tuple[str, ...]
    prefetch: int


CATALOG = ConsumedQueue("catalog_events", "inventory_catalog_consumer",
                        ("catalog.variant.created", "catalog.variant.updated", "catalog.variant.deleted"), 10)
ORDERS = ConsumedQueue("order_events", "inventory_order_consumer",
                       ("order.placed", "order.confirmed", "order.cancelled", "order.shipped", "order.returned"), 20)
PURCHASING = ConsumedQueue("purchasing_events", "inventory_purchasing_consumer",
                           ("purchase_order.created", "purchase_order.received"), 10)
CONSUMED = (CATALOG, ORDERS, PURCHASING)


@dataclass(frozen=True)
class Names:
    """The broker-side names of one consumed queue, with the configured prefix."""

    exchange: str
    queue: str
    dead_letter_exchange: str
    dead_letter_queue: str
    retry_queue: str

    @classmethod
    def of(cls, spec: ConsumedQueue, prefix: str = "") -> Names:
        q = prefix + spec.queue
        return cls(prefix + spec.exchange, q, q + ".dlx", q + ".dlq", q + ".retry")


async def connect(url: str, name: str, reconnect_interval: float = 1.0) -> AbstractRobustConnection:
    """A robust connection: after a broker restart it reconnects and restores its channels,
    declarations and consumers by itself. The first connect fails fast (the caller retries)."""
    return await aio_pika.connect_robust(url, reconnect_interval=reconnect_interval,
                                         client_properties={"connection_name": name})


async def connect_until(url: str, name: str, stopping: asyncio.Event,
                        retry_seconds: float = 1.0) -> AbstractRobustConnection | None:
    """Connect, retrying while the broker is unreachable; None once `stopping` is set."""
    warned = False
    while not stopping.is_set():
        try:
            return await connect(url, name)
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as e:
            if not warned:
                log.warning("%s: RabbitMQ unreachable (%s); retrying every %.0f s", name, e or type(e).__name__,
                            retry_seconds)
                warned = True
            try:
                await asyncio.wait_for(stopping.wait(), retry_seconds)
            except TimeoutError:
                pass
    return None


async def declare_inventory_exchange(channel: AbstractChannel, prefix: str = "") -> AbstractExchange:
    return await channel.declare_exchange(prefix + INVENTORY_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)


async def declare_consumed(channel: AbstractChannel, spec: ConsumedQueue, prefix: str = "") -> AbstractQueue:
    """Declare one consumed queue with its exchange, bindings, dead-letter and retry queues."""
    names = Names.of(spec, prefix)
    exchange = await channel.declare_exchange(names.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    dlq = await channel.declare_queue(names.dead_letter_queue, durable=True)
    await dlq.bind(dlx)
    # Expired retries go back to the main queue through the default exchange.
    await channel.declare_queue(names.retry_queue, durable=True, arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.queue})
    queue = await channel.declare_queue(names.queue, durable=True, arguments={
        "x-dead-letter-exchange": names.dead_letter_exchange})
    for key in spec.routing_keys:
        await queue.bind(exchange, key)
    return queue
