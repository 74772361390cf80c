"""The outbox relay: publishes committed outbox rows to RabbitMQ, then marks them sent.

Events leave only through the outbox (DESIGN.md, Events): each shard writes its rows in
the same transaction as the change. The relay reads the unsent rows in id order, a batch
at a time, publishes all of them on a channel with publisher confirms (every publish of
the batch in flight at once, the confirms awaited together), and marks the confirmed
prefix sent in one UPDATE. A row is marked only after the broker confirmed it, so
nothing is lost; a crash between confirm and UPDATE publishes it again (at-least-once:
consumers drop duplicates by `event_id` / `message_id`).

Order: per stock, id order is commit order (one shard writes a stock, one batch after
another), and one relay publishes on one channel in id order. Several gateways may run a
relay; a session advisory lock in Postgres makes exactly one of them active, the others
stand by and take over within a second when it goes away.

RabbitMQ down: rows stay unsent (the outbox grows), the robust connection reconnects by
itself, and the relay drains the backlog in order when the broker is back. Postgres down:
the relay reconnects and takes the lock again.

The relay runs in a thread of its own with its own event loop (its own Postgres and AMQP
connections), so a burst of publishing never holds the gateway's event loop: a stall of
that loop of a few hundred ms was measured to make some in-flight gRPC calls fail with
CANCELLED (grpcio aio server). Within its loop a batch's publishes are started a slice at
a time, yielding in between.

With INVENTORY_RELAY_IN_GATEWAY=false the gateways run none, and `python -m gateway.relay`
runs one as a process of its own (any number of them: the lock picks one), which keeps
its CPU out of the gateways' processes.

Metrics hook: `OutboxRelay.stats` (published, rounds, failures, whether this relay is the
active one, the last error) for a collector to read; the backlog itself is a query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from gateway import amqp
from gateway.breaker import CircuitBreaker
from gateway.catalog import VariantNames
from gateway.config import Settings
from persistence import queries, session

log = logging.getLogger("inventory.relay")

LOW_LEVEL = "inventory.stock.low_level"
REORDER_NEEDED = "inventory.stock.reorder_needed"
RELAY_LOCK_ID = 0x1A7E_0002  # arbitrary, constant: "the inventory outbox relay"
CONFIRM_TIMEOUT = 30.0
PUBLISH_SLICE = 25  # publishes started per event-loop turn  # seconds for one batch's publishes and confirms
READY_TIMEOUT = 1.0  # seconds to wait for a reconnecting channel before backing off
STANDBY_SECONDS = 1.0  # how often a standby relay tries to become the active one
MAX_BACKOFF = 2.0
OUTBOX_RETENTION_SECONDS = 7 * 24 * 3600.0  # published rows kept this long
PRUNE_EVERY_SECONDS = 3600.0
NAMES_BUDGET = 3.0  # seconds a batch may spend asking the Catalog for variant names (VariantNames)


class BrokerDown(Exception):
    pass


@dataclass
class RelayStats:
    published: int = 0
    rounds: int = 0
    failures: int = 0
    active: bool = False
    last_error: str = ""
    last_published_at: float = 0.0


class OutboxRelay:
    """One relay per gateway; start() runs it in the background, stop() flushes once and closes."""

    def __init__(self, settings: Settings, dsn: str | None = None, *, name: str = "inventory-relay") -> None:
        assert settings.amqp_url, "the relay needs INVENTORY_AMQP_URL"
        self.settings = settings
        self.url = settings.amqp_url
        self.dsn = dsn or settings.database_url
        assert self.dsn, "the relay needs a database"
        self.prefix = settings.amqp_prefix
        self.batch = settings.relay_batch
        self.poll = settings.relay_poll_seconds
        self.name = name
        self.stats = RelayStats()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._amqp: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._db: asyncpg.Connection | None = None
        self._names: VariantNames | None = None
        self._names_built = False
        self._names_deadline = 0.0
        self._last_prune = time.monotonic()  # the first prune an hour after start

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Run in a thread of its own, on an event loop of its own (see the module docstring)."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), name=self.name, daemon=True)
        self._thread.start()
        ready.wait(10)

    def _thread_main(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._task = loop.create_task(self._run(), name=self.name)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
            leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        finally:
            loop.close()

    def wake(self) -> None:
        """Look for new rows now instead of at the next poll (e.g. right after writing one)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self, flush: bool = True, timeout: float = 5.0) -> None:
        """Stop polling; if this relay is the active one, publish what is unsent once more; close."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        done = asyncio.run_coroutine_threadsafe(self._stop_here(flush, timeout), loop)
        try:
            await asyncio.wrap_future(done)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, timeout + 5)

    async def _stop_here(self, flush: bool, timeout: float) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        try:
            if flush and self.stats.active:
                await asyncio.wait_for(self._flush(), timeout)
        except Exception as e:  # noqa: BLE001 - the rows stay in the outbox for the next start
            log.warning("relay: final flush incomplete (%s); unsent events stay in the outbox", _describe(e))
        finally:
            await self._close()

    async def _flush(self) -> None:
        while await self.publish_once() >= self.batch:
            pass

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if not await self._ensure():
                    await self._sleep(STANDBY_SECONDS)
                    continue
                n = await self.publish_once()
                await self._maybe_prune()
                if failures:
                    log.info("relay: publishing again after %d failed rounds", failures)
                    failures = 0
                if n < self.batch:
                    await self._sleep(self.poll)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure: keep the rows, back off, try again
                failures += 1
                self.stats.failures += 1
                self.stats.last_error = _describe(e)
                if failures == 1:
                    log.warning("relay: cannot publish (%s); events stay in the outbox until it recovers",
                                self.stats.last_error)
                if isinstance(e, (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                    await self._close_db()
                await self._sleep(min(0.1 * 2 ** min(failures, 10), MAX_BACKOFF))

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _ensure(self) -> bool:
        """Connected to both sides; True if this relay holds the lock (is the active one)."""
        if self._amqp is None:
            self._amqp = await amqp.connect(self.url, self.name)
        if self._channel is None:
            self._channel = await self._amqp.channel(publisher_confirms=True)
            self._exchange = await amqp.declare_inventory_exchange(self._channel, self.prefix)
        if self._db is None or self._db.is_closed():
            self._db = None
            self.stats.active = False
            self._db = await asyncpg.connect(self.dsn, timeout=10,
                                             server_settings=session.settings(self.dsn, "inventory-relay"))
        if not self.stats.active:
            self.stats.active = bool(await self._db.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_ID))
            if self.stats.active:
                log.info("relay: active (publishing the outbox to %s)", self.prefix + amqp.INVENTORY_EXCHANGE)
        return self.stats.active

    # ------------------------------------------------------------ one round

    async def publish_once(self) -> int:
        """Publish up to one batch of unsent rows with confirms and mark the confirmed prefix sent."""
        assert self._db is not None and self._exchange is not None and self._channel is not None
        rows = await queries.outbox_unsent(self._db, self.batch)
        self.stats.rounds += 1
        if not rows:
            return 0
        rows = await self._enriched(rows)
        try:  # a robust channel is ready once its connection is up and it has been restored
            await asyncio.wait_for(self._channel.ready(), READY_TIMEOUT)  # type: ignore[union-attr]
        except TimeoutError:
            raise BrokerDown("RabbitMQ connection is down (reconnecting)") from None
        # The aio-pika channel's own aiormq channel: publishing there without waiting for each
        # frame to be written costs about a third less CPU per event than Exchange.publish.
        channel = await self._channel.get_underlay_channel()
        exchange = self._exchange.name
        publishes: list[asyncio.Future[Any]] = []
        for i, row in enumerate(rows):
            publishes.append(asyncio.ensure_future(channel.basic_publish(
                row.payload.encode(), exchange=exchange, routing_key=row.event_name, mandatory=False, wait=False,
                properties=aiormq.spec.Basic.Properties(
                    content_type="application/json", delivery_mode=2, message_id=row.event_id, message_type=row.event_name,
                    app_id="inventory-service"))))
            if i % PUBLISH_SLICE == PUBLISH_SLICE - 1:
                await asyncio.sleep(0)  # let confirms and reads in between
        # Wait for the confirms, or for the channel to close: a connection lost in the middle of
        # a batch left some confirms pending until CONFIRM_TIMEOUT (30 s), long after the broker
        # was back (seen in the RabbitMQ outage test). Whatever was not confirmed stays unsent.
        gathered = asyncio.gather(*publishes, return_exceptions=True)
        closing = channel.closing
        try:
            await asyncio.wait({gathered, closing}, timeout=CONFIRM_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()  # (stops only this observer of the channel)
        if not gathered.done():
            gathered.cancel()
            if closing.done():
                raise BrokerDown("the connection closed while confirms were pending")
            raise BrokerDown(f"no confirms within {CONFIRM_TIMEOUT:.0f} s")
        results = gathered.result()
        confirmed = 0
        for result in results:
            if isinstance(result, BaseException):
                break
            confirmed += 1
        if confirmed:
            await queries.outbox_mark_sent(self._db, [row.id for row in rows[:confirmed]])
            self.stats.published += confirmed
            self.stats.last_published_at = time.time()
        if confirmed < len(rows):
            failure = results[confirmed]
            assert isinstance(failure, BaseException)
            raise failure
        return confirmed

    async def _enriched(self, rows: list[queries.OutboxEntry]) -> list[queries.OutboxEntry]:
        """Fill in what the spec's payloads carry and the shard that wrote the row does not keep,
        looked up here once per key and batch:

        * `low_level`: the warehouse's `warehouse_name` (from its row), the variant's `sku` and
          `product_name` (from the Catalog, through the cache: `VariantNames`);
        * `reorder_needed`: `last_supplier_id` and `average_lead_time_days`, from the purchase
          history (migration 008).

        What cannot be found stays as the shard wrote it ("" or null): the event is not held."""
        wanted = [i for i, r in enumerate(rows) if r.event_name in (LOW_LEVEL, REORDER_NEEDED)]
        if not wanted:
            return rows
        assert self._db is not None
        out = list(rows)
        found: dict[tuple[str, ...], Any] = {}
        self._names_deadline = time.monotonic() + NAMES_BUDGET

        async def once(lookup: Callable[..., Awaitable[Any]], *key: str) -> Any:
            if (lookup.__name__, *key) not in found:
                found[(lookup.__name__, *key)] = await lookup(*key)
            return found[(lookup.__name__, *key)]

        for i in wanted:
            body = json.loads(rows[i].payload)
            data = body.get("data") or {}
            org, variant, warehouse = body.get("organization_id", ""), data.get("variant_id"), data.get("warehouse_id")
            if not variant or not warehouse:
                continue
            before = dict(data)
            if rows[i].event_name == LOW_LEVEL:
                if not data.get("warehouse_name"):
                    data["warehouse_name"] = await once(self._warehouse_name, org, warehouse)
                if not data.get("sku") and not data.get("product_name"):
                    data["sku"], data["product_name"] = await once(self._variant_names, org, variant)
            elif data.get("last_supplier_id") is None and data.get("average_lead_time_days") is None:
                data["last_supplier_id"], data["average_lead_time_days"] = await once(
                    self._supplier_history, org, variant, warehouse)
            if data != before:
                payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
                out[i] = dataclasses.replace(rows[i], payload=payload)
        return out

    async def _warehouse_name(self, org: str, warehouse: str) -> str:
        assert self._db is not None
        return await queries.warehouse_name(self._db, org, warehouse) or ""

    async def _supplier_history(self, org: str, variant: str, warehouse: str) -> tuple[str | None, int | None]:
        assert self._db is not None
        return await queries.supplier_history(self._db, org, variant, warehouse)

    async def _variant_names(self, org: str, variant: str) -> tuple[str, str]:
        if not self._names_built:  # here, on the relay's own event loop
            self._names_built = True
            self._names = VariantNames.build(self.settings, CircuitBreaker(
                "relay-redis", self.settings.breaker_failure_threshold, self.settings.breaker_cooldown_seconds))
        if self._names is None:
            return "", ""
        return await self._names.of(org, variant, self._names_deadline)

    async def _maybe_prune(self) -> None:
        """Published rows are kept OUTBOX_RETENTION_SECONDS (to look into), then deleted by the active relay."""
        now = time.monotonic()
        if now - self._last_prune < PRUNE_EVERY_SECONDS or self._db is None:
            return
        self._last_prune = now
        removed = await queries.outbox_prune(self._db, OUTBOX_RETENTION_SECONDS)
        if removed:
            log.info("relay: deleted %d published outbox rows older than %d days", removed,
                     OUTBOX_RETENTION_SECONDS // 86400)

    # ------------------------------------------------------------ closing

    async def _close_db(self) -> None:
        db, self._db = self._db, None
        self.stats.active = False
        if db is not None and not db.is_closed():
            try:
                await asyncio.wait_for(db.close(), 2)
            except Exception:  # noqa: BLE001 - a broken connection: terminate it
                db.terminate()

    async def _close(self) -> None:
        await self._close_db()
        names, self._names, self._names_built = self._names, None, False
        if names is not None:
            try:
                await asyncio.wait_for(names.close(), 2)
            except Exception as e:  # noqa: BLE001 - closing only
                log.debug("relay: closing the variant names' clients: %s", _describe(e))
        connection, self._amqp, self._channel, self._exchange = self._amqp, None, None, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), 5)
            except Exception as e:  # noqa: BLE001 - closing a broken connection
                log.debug("relay: closing the AMQP connection: %s", _describe(e))


def _describe(e: BaseException) -> str:
    """The error and what caused it (an AMQPConnectionError hides the TLS verification failure in its cause)."""
    parts = []
    seen: BaseException | None = e
    while seen is not None and len(parts) < 3:
        text = str(seen)
        parts.append(f"{type(seen).__name__}: {text}" if text else type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


# ---------------------------------------------------------------- a process of its own


async def run_relay(settings: Settings) -> None:
    """Run one relay until SIGINT/SIGTERM, then flush once (`python -m gateway.relay`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    relay = OutboxRelay(settings)
    relay.start()
    print(f"inventory relay publishing to {settings.amqp_prefix}{amqp.INVENTORY_EXCHANGE}", flush=True)
    try:
        await stop.wait()
    finally:
        await relay.stop(flush=True)


def main() -> int:
    from gateway.config import ConfigError
    from gateway.logs import configure

    try:
        settings = Settings.from_env()
    except ConfigError as e:
        print(f"inventory relay: configuration error: {e}", file=sys.stderr)
        return 2
    if not settings.amqp_url or not settings.database_url:
        print("inventory relay: INVENTORY_AMQP_URL and INVENTORY_DATABASE_URL are required", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_json)
    asyncio.run(run_relay(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
