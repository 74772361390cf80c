"""A real `inventory serve` consuming from and publishing to the machine's RabbitMQ, on a prefix of its own.

conftest's `Service` (start, health, stop with the no-leftover check) plus INVENTORY_AMQP_* settings,
and the test's side of the broker: publish to the service's exchanges, wait until its consumers are
up, collect its dead letters, delete its topology afterwards.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from conftest import Service, eventually

from gateway import amqp

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
RETRY_SECONDS = 0.1  # the first retry delay of the service under test


@dataclass
class AmqpService(Service):
    amqp_url: str = AMQP_URL
    prefix: str = field(default_factory=lambda: f"it-{uuid.uuid4().hex[:10]}.")
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return dict(super().env(), INVENTORY_AMQP_URL=self.amqp_url, INVENTORY_AMQP_PREFIX=self.prefix,
                    INVENTORY_AMQP_RETRY_SECONDS=str(RETRY_SECONDS), INVENTORY_AMQP_MAX_ATTEMPTS="3",
                    INVENTORY_RELAY_POLL_SECONDS="0.02", **self.extra_env)


@dataclass
class Broker:
    """The test's side: publishing to the service's exchanges and reading its dead-letter queues."""

    connection: AbstractRobustConnection
    prefix: str
    dead: dict[str, AbstractIncomingMessage] = field(default_factory=dict)  # by message_id

    async def open(self) -> None:
        self.channel = await self.connection.channel(publisher_confirms=True)

    async def consumers_up(self, timeout: float = 30.0) -> None:
        """Wait until each consumed queue has a consumer (the service declared the topology)."""
        for spec in amqp.CONSUMED:
            name = self.prefix + spec.queue
            await eventually(lambda name=name: self._has_consumer(name), timeout=timeout, interval=0.1,
                             what=f"a consumer on {name}")

    async def _has_consumer(self, queue: str) -> bool:
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return bool(declared.declaration_result.consumer_count)

    async def collect_dead_letters(self) -> None:
        """Every dead letter of the three queues lands in `self.dead`, by message_id."""
        for spec in amqp.CONSUMED:
            queue = await self.channel.get_queue(amqp.Names.of(spec, self.prefix).dead_letter_queue)
            await queue.consume(self._on_dead, no_ack=True)

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        self.dead[message.message_id or ""] = message

    async def publish(self, spec: amqp.ConsumedQueue, routing_key: str, body: bytes | dict[str, Any],
                      **props: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        exchange = await self.channel.get_exchange(self.prefix + spec.exchange)
        await exchange.publish(aio_pika.Message(raw, content_type="application/json", **props),
                               routing_key=routing_key)

    async def depth(self, queue: str) -> int:
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(self.prefix + queue, passive=True)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return int(declared.declaration_result.message_count or 0)

    async def delete_topology(self) -> None:
        channel = await self.connection.channel()
        for spec in amqp.CONSUMED:
            names = amqp.Names.of(spec, self.prefix, RETRY_SECONDS)
            for q in names.all_queues():
                await channel.queue_delete(q)
            for x in (names.exchange, names.dead_letter_exchange):
                await channel.exchange_delete(x)
        await channel.exchange_delete(self.prefix + amqp.INVENTORY_EXCHANGE)
        await channel.close()
