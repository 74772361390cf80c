"""The RabbitMQ topology of the service, and how it connects.

Everything is durable and declared by the service at start (declaring is idempotent):

    catalog_events     (topic) --catalog.variant.*------------> inventory_catalog_consumer
    order_events       (topic) --order.*----------------------> inventory_order_consumer   (prefetch 20)
    purchasing_events  (topic) --purchase_order.*-------------> inventory_purchasing_consumer
    inventory_events   (topic) <-- the outbox relay, routing key = event name

and for each consumed queue `<queue>`:

    <queue>.dlx (fanout) --> <queue>.dlq        dead letters (the reason in header x-inventory-error)
    <queue>.retry.<ms>  one per retry delay (no consumer; a queue TTL of <ms>, then dead-lettered
                        back into <queue>): 1000, 2000, 4000, ... 60000 with the default first delay

One queue per delay, because RabbitMQ expires messages only at the head of a queue: in one
queue with per-message TTLs, a retry waiting 60 s would hold back every shorter one behind it.
With one TTL per queue, the head is always the first to expire.

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
    retry_delays: tuple[float, ...]  # seconds, ascending; retry_queues[i] waits retry_delays[i]

    @classmethod
    def of(cls, spec: ConsumedQueue, prefix: str = "", first_retry: float = 1.0) -> Names:
        q = prefix + spec.queue
        return cls(prefix + spec.exchange, q, q + ".dlx", q + ".dlq", retry_delays(first_retry))

    @property
    def retry_queues(self) -> tuple[str, ...]:
        return tuple(self.retry_queue_for(d) for d in self.retry_delays)

    def retry_queue_for(self, delay: float) -> str:
        """The retry queue of the shortest delay at least `delay` (the longest if none is)."""
        chosen = next((d for d in self.retry_delays if d >= delay - 1e-9), self.retry_delays[-1])
        return f"{self.queue}.retry.{_millis(chosen)}"

    def all_queues(self) -> tuple[str, ...]:
        """Every queue of this consumed queue: itself, its retry queues and its dead letters."""
        return (self.queue, *self.retry_queues, self.dead_letter_queue)


MAX_RETRY_DELAY = 60.0


def retry_delays(first: float, cap: float = MAX_RETRY_DELAY) -> tuple[float, ...]:
    """The backoff ladder: first, doubling, at most `cap` (which is always the last rung)."""
    if first <= 0:
        raise ValueError("the first retry delay must be positive")
    delays: list[float] = []
    delay = first
    while delay < cap and len(delays) < 32:
        delays.append(delay)
        delay *= 2
    delays.append(cap)
    return tuple(sorted({_millis(d): d for d in delays}.values()))


def _millis(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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


async def declare_consumed(channel: AbstractChannel, spec: ConsumedQueue, prefix: str = "",
                           first_retry: float = 1.0) -> AbstractQueue:
    """Declare one consumed queue with its exchange, bindings, dead-letter and retry queues."""
    names = Names.of(spec, prefix, first_retry)
    exchange = await channel.declare_exchange(names.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    dlq = await channel.declare_queue(names.dead_letter_queue, durable=True)
    await dlq.bind(dlx)
    # Expired retries go back to the main queue through the default exchange.
    for delay, retry_queue in zip(names.retry_delays, names.retry_queues, strict=True):
        await channel.declare_queue(retry_queue, durable=True, arguments={
            "x-message-ttl": _millis(delay), "x-dead-letter-exchange": "", "x-dead-letter-routing-key": names.queue})
    queue = await channel.declare_queue(names.queue, durable=True, arguments={
        "x-dead-letter-exchange": names.dead_letter_exchange})
    for key in spec.routing_keys:
        await queue.bind(exchange, key)
    return queue
