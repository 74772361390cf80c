"""Incoming events: the Catalog's, the Order Service's and Purchasing's, consumed over RabbitMQ.

Every message is a JSON envelope `{"event": ..., "data": {...}}` with optional
`event_id`, `occurred_at` and `organization_id` (also accepted inside `data`; absent:
`Settings.default_organization_id`). The fields of each event are the structs below
(documented in README, "Events"). Handlers call the business flows of gateway/flows.py,
never a shard directly; the flows reply only after the shard's commit, and the message is
acknowledged only after that.

The error table of this edge (one place):

| what happened                                                    | what the consumer does |
|------------------------------------------------------------------|------------------------|
| done, or nothing to do (duplicate, track_inventory false, ...)   | ack |
| order.placed refused: insufficient_stock, archived, not_found    | inventory.reservation.failed (once per order), ack |
| catalog.variant.deleted refused: stock_not_zero                  | ack (the shard wrote inventory.stock.validation_failed) |
| malformed: not JSON (or nested too deeply), unknown event, missing/invalid field, a routing key other than the event (a retry returns under the queue's name), `invalid` from a flow | dead-letter at once |
| a refusal nobody can retry away: conflict, closed (confirm/ship/cancel of an ended reservation), archived or unknown stock for a movement | dead-letter at once |
| transient: `unavailable` (Postgres or a shard down), Postgres errors, the reservation of a confirmed/shipped order not there yet, any unexpected error | retry with backoff; dead-letter after `amqp_max_attempts` |

Dead letters are published to `<queue>.dlx` (-> `<queue>.dlq`) with the reason in header
`x-inventory-error`, then the original is acked: never requeued in a loop. Retries are
copies published to `<queue>.retry.<ms>`, one queue per delay (`amqp_retry_seconds`, doubling,
at most 60 s; see gateway/amqp.py), with header `x-inventory-attempts`; on expiry they return
to `<queue>`.

Duplicates: a message with an `event_id` (or an AMQP `message_id`) is recorded in the
`inbox` table; the same key again is acked without effect. Underneath, every flow is
idempotent by key as well (reservations per order, movements per idempotency key,
initialize creates only missing stocks, archive is idempotent), which covers a crash
between the effect and the inbox record. Messages of one order (one variant, one purchase
order) are handled one at a time in delivery order within a gateway.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

import aio_pika
import asyncpg
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from actors.keys import reservation_id
from actors.stock import MAX_QUANTITY
from gateway import amqp, flows
from gateway.config import Settings
from gateway.flows import Core, FlowError
from gateway.relay import OutboxRelay
from persistence import queries

log = logging.getLogger("inventory.events")

# ---------------------------------------------------------------- the messages

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=flows.MAX_ID_LENGTH, pattern=r"^[^\x00]*[^\x00\s][^\x00]*$")]
OptionalId = Annotated[str, msgspec.Meta(max_length=flows.MAX_ID_LENGTH, pattern=r"^[^\x00]*$")]
Quantity = Annotated[int, msgspec.Meta(gt=0, le=MAX_QUANTITY)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_QUANTITY)]
Text = Annotated[str, msgspec.Meta(max_length=1000)]


class Envelope(msgspec.Struct, frozen=True):
    event: str
    data: msgspec.Raw
    event_id: OptionalId | None = None
    occurred_at: str | None = None
    organization_id: OptionalId | None = None


class EventData(msgspec.Struct, frozen=True, kw_only=True):
    organization_id: OptionalId | None = None


class VariantCreated(EventData, frozen=True):
    """catalog.variant.created"""

    variant_id: Id
    track_inventory: bool
    product_id: OptionalId = ""
    sku: Text = ""
    default_min_stock: Count = 0
    default_max_stock: Count = 0
    default_reorder_point: Count = 0


class VariantChanged(EventData, frozen=True):
    """catalog.variant.updated, catalog.variant.deleted"""

    variant_id: Id


class OrderItem(msgspec.Struct, frozen=True):
    variant_id: Id
    quantity: Quantity
    warehouse_id: OptionalId = ""


Items = Annotated[list[OrderItem], msgspec.Meta(min_length=1)]


class OrderPlaced(EventData, frozen=True):
    """order.placed: reserve, as ReserveStock (ttl_seconds wins over ttl_minutes; neither: the default)."""

    order_id: Id
    items: Items
    ttl_minutes: Count = 0
    ttl_seconds: Count = 0


class OrderChanged(EventData, frozen=True):
    """order.confirmed, order.cancelled, order.shipped (any items are ignored: the reservation has them)."""

    order_id: Id
    reason: Text = ""


class OrderReturned(EventData, frozen=True):
    """order.returned: the returned items (warehouse_id: where they come back; default: where reserved)."""

    order_id: Id
    items: Items
    reason: Text = ""


class PurchaseItem(msgspec.Struct, frozen=True):
    variant_id: Id
    quantity: Quantity


class PurchaseOrder(EventData, frozen=True):
    """purchase_order.created, purchase_order.received"""

    purchase_order_id: Id
    warehouse_id: Id
    items: Annotated[list[PurchaseItem], msgspec.Meta(min_length=1)]
    supplier_id: OptionalId = ""


EVENT_TYPES: dict[str, type[EventData]] = {
    "catalog.variant.created": VariantCreated,
    "catalog.variant.updated": VariantChanged,
    "catalog.variant.deleted": VariantChanged,
    "order.placed": OrderPlaced,
    "order.confirmed": OrderChanged,
    "order.cancelled": OrderChanged,
    "order.shipped": OrderChanged,
    "order.returned": OrderReturned,
    "purchase_order.created": PurchaseOrder,
    "purchase_order.received": PurchaseOrder,
}

_envelope = msgspec.json.Decoder(Envelope)
_decoders = {name: msgspec.json.Decoder(t) for name, t in EVENT_TYPES.items()}


@dataclass(frozen=True)
class Incoming:
    """A parsed, valid incoming event."""

    event: str
    data: Any  # one of EVENT_TYPES
    organization_id: str
    event_id: str  # the envelope's event_id, else the AMQP message_id, else ""
    body: bytes
    occurred_at: datetime | None = None  # the envelope's, if it is an ISO 8601 time with a zone

    @property
    def dedupe_key(self) -> str:
        """The inbox key: "<organization>:<event>:<event_id or message_id>" ("" when the message
        has neither). With the organization: two tenants' publishers may reuse an id."""
        return f"{self.organization_id}:{self.event}:{self.event_id}" if self.event_id else ""

    @property
    def unique_id(self) -> str:
        """What makes this message distinct: its id, else a digest of its body."""
        return self.event_id or "sha-" + hashlib.blake2b(self.body, digest_size=12).hexdigest()


# ---------------------------------------------------------------- outcomes


class Malformed(Exception):
    """Dead-letter at once: the message can never be processed as it is."""


class Refused(Exception):
    """Dead-letter at once: a valid message the domain refuses and no retry can change (needs a person)."""


class Transient(Exception):
    """Retry later with backoff (dead-letter after the last attempt). count=False: not the message's fault."""

    def __init__(self, reason: str, count: bool = True) -> None:
        super().__init__(reason)
        self.count = count


def parse(body: bytes, accepted: Sequence[str], default_organization_id: str, message_id: str | None = None) -> Incoming:
    """Decode and validate one message (raises Malformed with the reason)."""
    try:
        envelope = _envelope.decode(body)
    except msgspec.ValidationError as e:  # (a subclass of DecodeError)
        raise Malformed(f"envelope: {e}") from None
    except msgspec.DecodeError as e:
        raise Malformed(f"not a JSON event envelope: {e}") from None
    except RecursionError:  # msgspec refuses nesting deeper than the interpreter's recursion limit
        raise Malformed("not a JSON event envelope: nested too deeply") from None
    if envelope.event not in accepted:
        raise Malformed(f"unknown event {envelope.event[:100]!r} (this queue takes {', '.join(accepted)})")
    try:
        data = _decoders[envelope.event].decode(envelope.data)
    except msgspec.ValidationError as e:
        raise Malformed(f"data: {str(e).replace('`$', '`data')}") from None
    except msgspec.DecodeError as e:
        raise Malformed(f"data: not a JSON object: {e}") from None
    except RecursionError:
        raise Malformed("data: nested too deeply") from None
    org = envelope.organization_id or data.organization_id or default_organization_id
    if not org.strip():
        raise Malformed("organization_id: must not be blank")
    event_id = envelope.event_id or message_id or ""
    if "\x00" in event_id:  # (the envelope's event_id is checked by its type; the AMQP message_id is not)
        raise Malformed("message_id: must not contain NUL")
    return Incoming(envelope.event, data, org, event_id[:flows.MAX_ID_LENGTH], body, _time(envelope.occurred_at))


def _time(text: str | None) -> datetime | None:
    """An optional field that only informs (the purchase history's times): unreadable or without
    a zone, it is ignored rather than refusing the event."""
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    if at.tzinfo is None or not EARLIEST_TIME <= at <= LATEST_TIME:  # (Postgres refuses year 1 at +01:00)
        return None
    return at


# ---------------------------------------------------------------- the handlers (calling the flows)

RESERVATION_FAILED = "inventory.reservation.failed"
_FAILED_NAMESPACE = uuid.UUID("7f0c51a2-8d44-4a8e-b0f3-2f5f3c1d9e47")


class Handler(Protocol):
    def lock_key(self, msg: Incoming) -> str: ...

    async def handle(self, msg: Incoming) -> str: ...


def _flow_failure(e: FlowError, what: str) -> Exception:
    """The default mapping of a flow's refusal (each handler deals with the codes it expects first)."""
    if e.code == "unavailable":
        return Transient(f"{what}: {e.message}")
    if e.code == "invalid":
        return Malformed(f"{what}: {e.message}")
    return Refused(f"{what}: {e.code}: {e.message}")


def _key(*parts: str) -> str:
    """An idempotency key from parts, kept short (the ids are each at most 200 characters)."""
    text = ":".join(parts)
    return text if len(text) <= flows.MAX_ID_LENGTH else "evt:" + hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


PURCHASES_AT_ONCE = 2
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)  # an `occurred_at` outside these is ignored
LATEST_TIME = datetime(9999, 1, 1, tzinfo=UTC)


class EventHandlers:
    """What each incoming event means for the inventory."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.settings = core.settings
        # A purchase order holds a pooled connection (its lock) while its movements are made:
        # at most this many at once, so a burst of them leaves the pool to everything else.
        self._purchases = asyncio.Semaphore(PURCHASES_AT_ONCE)
        self._handlers: dict[str, Callable[[Incoming], Awaitable[str]]] = {
            "catalog.variant.created": self.variant_created,
            "catalog.variant.updated": self.variant_updated,
            "catalog.variant.deleted": self.variant_deleted,
            "order.placed": self.order_placed,
            "order.confirmed": self.order_confirmed,
            "order.cancelled": self.order_cancelled,
            "order.shipped": self.order_shipped,
            "order.returned": self.order_returned,
            "purchase_order.created": self.purchase_ordered,
            "purchase_order.received": self.purchase_received,
        }

    def lock_key(self, msg: Incoming) -> str:
        d = msg.data
        entity = getattr(d, "order_id", None) or getattr(d, "variant_id", None) or getattr(d, "purchase_order_id", "")
        return f"{msg.organization_id}/{entity}"

    async def handle(self, msg: Incoming) -> str:
        try:
            return await self._handlers[msg.event](msg)
        except FlowError as e:
            raise _flow_failure(e, msg.event) from None

    # ------------------------------------------------------------ catalog

    async def variant_created(self, msg: Incoming) -> str:
        d: VariantCreated = msg.data
        if not d.track_inventory:
            return "ignored: track_inventory is false"
        if d.default_max_stock and d.default_max_stock < max(d.default_min_stock, d.default_reorder_point):
            raise Malformed("data.default_max_stock: must be at least default_min_stock and default_reorder_point")
        levels = await flows.initialize_variant(self.core, msg.organization_id, d.variant_id, d.default_min_stock,
                                                d.default_max_stock, d.default_reorder_point)
        return f"initialized ({len(levels)} stocks)"

    async def _invalidate(self, org: str, variant: str) -> None:
        """The variant cache's hook, if this gateway validates variants against the Catalog."""
        hook = getattr(self.core, "invalidate_variant", None)
        if hook is None:
            hook = getattr(getattr(self.core, "variants", None), "invalidate", None)
        if hook is None:
            return
        try:
            await hook(org, variant)
        except Exception as e:  # noqa: BLE001 - e.g. CacheUnavailable: retried, or the old entry stays until its TTL
            raise Transient(f"could not invalidate the cached variant {variant}: {e}") from None

    async def variant_updated(self, msg: Incoming) -> str:
        await self._invalidate(msg.organization_id, msg.data.variant_id)
        return "cache invalidated"

    async def variant_deleted(self, msg: Incoming) -> str:
        d: VariantChanged = msg.data
        await self._invalidate(msg.organization_id, d.variant_id)
        try:
            changed = await flows.archive_variant(self.core, msg.organization_id, d.variant_id)
        except FlowError as e:
            if e.code == "stock_not_zero":
                return "refused: stock_not_zero (inventory.stock.validation_failed written)"
            raise
        return "archived" if changed else "already archived"

    # ------------------------------------------------------------ orders

    def _ttl_seconds(self, d: OrderPlaced) -> int:
        ttl = d.ttl_seconds or d.ttl_minutes * 60 or self.settings.default_ttl_minutes * 60
        if ttl > self.settings.max_ttl_seconds:
            field = "ttl_seconds" if d.ttl_seconds else "ttl_minutes"
            raise Malformed(f"data.{field}: at most {self.settings.max_ttl_seconds // 3600} hours")
        return ttl

    async def order_placed(self, msg: Incoming) -> str:
        d: OrderPlaced = msg.data
        org = msg.organization_id
        if len(d.items) > self.settings.max_items:
            raise Malformed(f"data.items: at most {self.settings.max_items} items, got {len(d.items)}")
        ttl = self._ttl_seconds(d)
        merged: dict[tuple[str, str], int] = {}
        for i, item in enumerate(d.items):
            if item.warehouse_id:
                await self.core.require_warehouse(org, item.warehouse_id, f"data.items[{i}].warehouse_id")
            key = (item.variant_id, item.warehouse_id)
            merged[key] = merged.get(key, 0) + item.quantity
            if merged[key] > MAX_QUANTITY:
                raise Malformed(f"data.items[{i}].quantity: total for variant {item.variant_id} exceeds int32")
        try:
            result = await flows.reserve(self.core, org, d.order_id, merged, time.time() + ttl)
        except FlowError as e:
            if e.code in ("insufficient_stock", "archived", "not_found"):
                await self._reservation_failed(org, d.order_id, merged, e)
                return f"reservation failed: {e.code}"
            if e.code == "closed":  # a late copy: the order's reservation already ended
                return f"nothing to do: {e.message}"
            raise
        return "already reserved" if result.replayed else "reserved"

    async def _reservation_failed(self, org: str, order_id: str, merged: dict[tuple[str, str], int],
                                  e: FlowError) -> None:
        data: dict[str, object] = {
            "order_id": order_id,
            "reservation_id": reservation_id(org, order_id),
            "reason": e.code,
            "message": e.message,
            "items": [{"variant_id": s.variant_id, "warehouse_id": s.warehouse_id, "requested": s.requested,
                       "available": s.available} for s in e.shortages],
            "requested": [{"variant_id": v, "warehouse_id": w, "quantity": q} for (v, w), q in sorted(merged.items())],
        }
        event_id = str(uuid.uuid5(_FAILED_NAMESPACE, f"{org}/{order_id}"))
        await flows.emit_event_once(self.core, RESERVATION_FAILED, org, data, event_id)

    async def order_confirmed(self, msg: Incoming) -> str:
        d: OrderChanged = msg.data
        try:
            await flows.confirm(self.core, msg.organization_id, reservation_id(msg.organization_id, d.order_id))
        except FlowError as e:
            if e.code == "not_found":
                raise Transient(f"order {d.order_id} has no reservation (yet)") from None
            raise
        return "confirmed"

    async def order_cancelled(self, msg: Incoming) -> str:
        d: OrderChanged = msg.data
        return await flows.cancel_order(self.core, msg.organization_id, d.order_id, d.reason or "order cancelled")

    async def order_shipped(self, msg: Incoming) -> str:
        d: OrderChanged = msg.data
        try:
            changed = await flows.ship(self.core, msg.organization_id, reservation_id(msg.organization_id, d.order_id))
        except FlowError as e:
            if e.code == "not_found":
                raise Transient(f"order {d.order_id} has no reservation (yet)") from None
            raise
        return "shipped" if changed else "already shipped"

    async def order_returned(self, msg: Incoming) -> str:
        d: OrderReturned = msg.data
        org = msg.organization_id
        reserved: list[queries.LineRow] | None = None
        merged: dict[tuple[str, str], int] = {}
        for i, item in enumerate(d.items):
            warehouse = item.warehouse_id
            if not warehouse:
                if reserved is None:
                    reserved = await self.core.lines_of(org, reservation_id(org, d.order_id))
                where = sorted({ln.warehouse_id for ln in reserved if ln.variant_id == item.variant_id})
                if len(where) != 1:
                    raise Malformed(f"data.items[{i}].warehouse_id: required (the order's reservation has variant "
                                    f"{item.variant_id} in {len(where)} warehouses)")
                warehouse = where[0]
            merged[(item.variant_id, warehouse)] = merged.get((item.variant_id, warehouse), 0) + item.quantity
        for (variant, warehouse), quantity in sorted(merged.items()):
            await flows.record_movement(
                self.core, org, variant, warehouse, "return", quantity, reason=d.reason or "order returned",
                reference_id=d.order_id, idempotency_key=_key(msg.event, msg.unique_id, variant, warehouse))
        return f"returned ({len(merged)} stocks)"

    # ------------------------------------------------------------ purchasing

    async def _purchase(self, msg: Incoming, kind: str, key_id: str) -> str:
        d: PurchaseOrder = msg.data
        org = msg.organization_id
        await self.core.require_warehouse(org, d.warehouse_id, "data.warehouse_id")
        merged: dict[str, int] = {}
        for item in d.items:
            merged[item.variant_id] = merged.get(item.variant_id, 0) + item.quantity
        for variant, quantity in sorted(merged.items()):
            if quantity > MAX_QUANTITY:
                raise Malformed(f"data.items: total quantity of variant {variant} exceeds int32")
        try:
            # One purchase order at a time, across gateways too (within one the consumer's keyed
            # locks do it): its ledger must not change between our read and its movement.
            async with self._purchases, queries.purchase_order_lock(self.core.pool, org,
                                                                     d.purchase_order_id) as conn:
                for variant, quantity in sorted(merged.items()):
                    progress = await queries.purchase_progress(conn, org, d.purchase_order_id, variant,
                                                               d.warehouse_id)
                    if kind == "purchase_ordered":
                        # Handled after (part of) its receipt (a retry behind it): the units that
                        # receipt did not take out of in_transit are not in transit.
                        quantity -= min(progress.received_beyond, quantity)
                        if not quantity:
                            continue
                    movement = functools.partial(
                        flows.record_movement, self.core, org, variant, d.warehouse_id, kind, quantity,
                        reason=f"purchase order {d.purchase_order_id}", reference_id=d.purchase_order_id,
                        idempotency_key=_key(msg.event, key_id, variant),
                        # a receipt takes out of in_transit only what this order has there: not a
                        # transfer's units, nor another order's, when more arrives than was ordered
                        in_transit_limit=progress.in_transit if kind == "purchase_received" else -1)
                    try:
                        await movement()
                    except FlowError as e:
                        if e.code != "unavailable":
                            raise
                        # Maybe only its answer was lost (a reply timeout), and the shard commits it
                        # later: asked again under the lock (the same key: a replay if it was made),
                        # so the order's next message does not read its ledger without it.
                        await movement()
                # after the movements: a failure here retries the event, whose movements then replay
                await queries.record_purchase(conn, org, d.purchase_order_id, d.warehouse_id, sorted(merged),
                                              d.supplier_id, msg.occurred_at, received=kind == "purchase_received")
        except (OSError, asyncpg.PostgresError) as e:
            raise flows.unavailable(e) from None
        return f"{kind} ({len(merged)} stocks)"

    async def purchase_ordered(self, msg: Incoming) -> str:
        # A purchase order is created once: its id is the key, whatever the message's id.
        return await self._purchase(msg, "purchase_ordered", msg.data.purchase_order_id)

    async def purchase_received(self, msg: Incoming) -> str:
        # Deliveries may be partial: each receipt message counts once (by its id; no id: once per order).
        return await self._purchase(msg, "purchase_received", msg.event_id or msg.data.purchase_order_id)


# ---------------------------------------------------------------- the consumers

INBOX_LEASE_SECONDS = 120.0  # a claim of a consumer that died is free again after this
INBOX_RETENTION_SECONDS = 7 * 24 * 3600.0  # how long handled keys are remembered
LAG_POLL_SECONDS = 5.0
ERROR_HEADER = "x-inventory-error"
ATTEMPTS_HEADER = "x-inventory-attempts"
# On a copy (retry, dead letter) of a message that had no AMQP message_id: the broker client
# gives every message it publishes one, and a random id there would change the copy's identity
# (its inbox key, the keys of its effects) from the original's.
NO_MESSAGE_ID_HEADER = "x-inventory-no-message-id"
_DROPPED_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                    "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


class _KeyedLocks:
    """One asyncio.Lock per key while anyone holds or waits for it (FIFO: delivery order is kept)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                await work()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class ConsumerStats:
    acked: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0


def _text(e: BaseException) -> str:
    return str(e) or type(e).__name__


class EventConsumers:
    """The three consumers on one robust connection (a channel each, its own prefetch) and a
    publisher channel with confirms for retries and dead letters."""

    def __init__(self, settings: Settings, handler: Handler, pool: asyncpg.Pool, *,
                 specs: Sequence[amqp.ConsumedQueue] = amqp.CONSUMED, metrics: Any = None,
                 name: str = "inventory-consumers") -> None:
        assert settings.amqp_url, "the consumers need INVENTORY_AMQP_URL"
        self.settings = settings
        self.handler = handler
        self.pool = pool
        self.specs = tuple(specs)
        self.metrics = metrics
        self.name = name
        self.stats = ConsumerStats()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._dead_letter_exchanges: dict[str, AbstractExchange] = {}
        self._consuming: list[tuple[AbstractQueue, str]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._locks = _KeyedLocks()
        self._last_prune = 0.0
        self._lag_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect and start consuming in the background (the broker may come up later)."""
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        connection = await amqp.connect_until(self.settings.amqp_url or "", self.name, self._stopping)
        if connection is None:
            return
        self._connection = connection
        while not self._stopping.is_set():
            try:
                await self._declare_and_consume(connection)
                break
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as e:
                log.warning("consumers: could not declare the topology (%s); retrying", _text(e))
                try:
                    await asyncio.wait_for(self._stopping.wait(), 1.0)
                except TimeoutError:
                    pass

    async def _declare_and_consume(self, connection: AbstractRobustConnection) -> None:
        prefix = self.settings.amqp_prefix
        if self._publisher is None:
            self._publisher = await connection.channel(publisher_confirms=True)
        for spec in self.specs:
            if any(q.name == prefix + spec.queue for q, _ in self._consuming):
                continue
            names = amqp.Names.of(spec, prefix, self.settings.amqp_retry_seconds)
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=spec.prefetch)
            queue = await amqp.declare_consumed(channel, spec, prefix, self.settings.amqp_retry_seconds)
            self._dead_letter_exchanges[names.queue] = await self._publisher.declare_exchange(
                names.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
            tag = await queue.consume(self._callback(spec, names))
            self._consuming.append((queue, tag))
        self.ready.set()
        log.info("consumers: consuming %s", ", ".join(q.name for q, _ in self._consuming))
        if self.metrics is not None and self._lag_task is None:
            self._lag_task = asyncio.create_task(self._watch_lag(), name=f"{self.name}-lag")

    async def _watch_lag(self) -> None:
        """inventory_amqp_consumer_lag_messages: what waits in each consumed queue, every few seconds."""
        while not self._stopping.is_set():
            for queue, _ in self._consuming:
                try:
                    declared = await asyncio.wait_for(queue.declare(), 5)
                except Exception as e:  # noqa: BLE001 - the broker may be down: try again later
                    log.debug("consumers: queue depth of %s: %s", queue.name, _text(e))
                    continue
                self.metrics.consumer_lag.labels(queue.name).set(declared.message_count or 0)
            try:
                await asyncio.wait_for(self._stopping.wait(), LAG_POLL_SECONDS)
            except TimeoutError:
                pass

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking messages, let the ones in progress finish (up to `grace`; later ones are cancelled),
        close: what was not acked goes back to its queue."""
        self._stopping.set()
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        for queue, tag in self._consuming:
            try:
                await asyncio.wait_for(queue.cancel(tag), 2)
            except Exception as e:  # noqa: BLE001 - the connection may be down: closing is enough
                log.debug("consumers: cancel %s: %s", queue.name, _text(e))
        if self._inflight:
            _, late = await asyncio.wait(list(self._inflight), timeout=grace)
            for task in late:  # not acked: the broker gives these messages to the next consumer
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), 5)
            except Exception as e:  # noqa: BLE001
                log.debug("consumers: closing the connection: %s", _text(e))

    # ------------------------------------------------------------ one message

    def _callback(self, spec: amqp.ConsumedQueue,
                  names: amqp.Names) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._inflight.add(task)
            try:
                await self._process(spec, names, message)
            except Exception as e:  # noqa: BLE001 - the broker connection failed while settling it
                log.error("consumers: could not settle a message from %s (%s); it will be redelivered",
                          names.queue, _text(e))
                await self._requeue_later(message)
            finally:
                self._inflight.discard(task)

        return on_message

    async def _requeue_later(self, message: AbstractIncomingMessage) -> None:
        try:
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
        except Exception as e:  # noqa: BLE001 - the channel is gone: the broker requeues it anyway
            log.debug("consumers: nack: %s", _text(e))

    async def _process(self, spec: amqp.ConsumedQueue, names: amqp.Names, message: AbstractIncomingMessage) -> None:
        attempts = _int_header(message, ATTEMPTS_HEADER)
        try:
            msg = parse(message.body, spec.routing_keys, self.settings.default_organization_id, _message_id(message))
            if message.routing_key not in (msg.event, names.queue):  # the queue's name: a retry coming back
                raise Malformed(f"routing key {(message.routing_key or '')[:100]!r} does not match event "
                                f"{msg.event!r}")
        except Malformed as e:
            await self._dead_letter(names, message, f"malformed: {e}", attempts, kind="malformed")
            return
        except Exception as e:  # never requeue what cannot even be parsed: it would come back forever
            log.exception("consumers: a message from %s could not be parsed", names.queue)
            await self._dead_letter(names, message, f"malformed: unparseable ({type(e).__name__})", attempts,
                                    kind="malformed")
            return

        async def work() -> None:
            await self._handle(names, message, msg, attempts)

        await self._locks.run(self.handler.lock_key(msg), work)

    async def _handle(self, names: amqp.Names, message: AbstractIncomingMessage, msg: Incoming,
                      attempts: int) -> None:
        extra = {"organization_id": msg.organization_id, "event": msg.event, "event_id": msg.event_id}
        key = msg.dedupe_key
        try:
            if key:
                claim = await queries.inbox_claim(self.pool, names.queue, key, msg.organization_id,
                                                  INBOX_LEASE_SECONDS)
                if claim == "done":
                    await message.ack()
                    self._count(names, "duplicate")
                    log.info("event %s %s: duplicate, already handled", msg.event, msg.event_id, extra=extra)
                    return
                if claim == "busy":
                    raise Transient("another consumer is handling the same message", count=False)
            try:
                outcome = await self.handler.handle(msg)
            except BaseException:
                if key:
                    await _quietly(queries.inbox_release(self.pool, names.queue, key))
                raise
        except (Malformed, Refused) as e:
            kind = "malformed" if isinstance(e, Malformed) else "refused"
            await self._dead_letter(names, message, f"{kind}: {e}", attempts, extra, kind=kind)
            return
        except Transient as e:
            await self._retry(names, message, str(e), attempts, e.count, extra)
            return
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            await self._retry(names, message, f"database unavailable: {_text(e)}", attempts, True, extra)
            return
        except Exception as e:
            log.exception("event %s: unexpected failure", msg.event, extra=extra)
            await self._retry(names, message, f"unexpected {type(e).__name__}: {_text(e)}", attempts, True, extra)
            return
        if key:
            try:
                await queries.inbox_done(self.pool, names.queue, key, outcome[:200])
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                # The effect is committed and the flows are idempotent: a copy would find nothing left to do.
                log.warning("event %s: handled, but not recorded in the inbox: %s", msg.event, _text(e), extra=extra)
        await message.ack()
        self._count(names, "ack")
        log.info("event %s %s: %s", msg.event, msg.event_id, outcome, extra=extra)
        await self._maybe_prune()

    # ------------------------------------------------------------ retry and dead letters

    async def _retry(self, names: amqp.Names, message: AbstractIncomingMessage, reason: str, attempts: int,
                     count: bool, extra: dict[str, str] | None = None) -> None:
        attempts += 1 if count else 0
        if attempts >= self.settings.amqp_max_attempts:
            await self._dead_letter(names, message, f"gave up after {attempts} attempts: {reason}", attempts, extra,
                                    kind="exhausted")
            return
        delay = names.retry_delays[min(max(attempts - 1, 0), len(names.retry_delays) - 1)]
        assert self._publisher is not None
        await self._publisher.default_exchange.publish(
            _copy(message, {ATTEMPTS_HEADER: attempts, ERROR_HEADER: reason[:1000]}),
            routing_key=names.retry_queue_for(delay))
        await message.ack()
        self._count(names, "retry")
        log.warning("event from %s: retry %d in %.1f s: %s", names.queue, attempts, delay, reason, extra=extra)

    async def _dead_letter(self, names: amqp.Names, message: AbstractIncomingMessage, reason: str, attempts: int,
                           extra: dict[str, str] | None = None, *, kind: str) -> None:
        exchange = self._dead_letter_exchanges[names.queue]
        headers = {ERROR_HEADER: reason[:1000], ATTEMPTS_HEADER: attempts, "x-inventory-queue": names.queue,
                   "x-inventory-routing-key": message.routing_key or ""}
        try:
            await exchange.publish(_copy(message, headers), routing_key=names.dead_letter_queue)
        except aio_pika.exceptions.DeliveryError:
            await message.reject(requeue=False)  # the queue's own dead-letter exchange takes it, without reason
        else:
            await message.ack()
        self._count(names, "dead")
        if self.metrics is not None:
            self.metrics.dead_lettered.labels(names.queue, kind).inc()
        log.warning("event from %s dead-lettered: %s", names.queue, reason, extra=extra or {})

    def _count(self, names: amqp.Names, outcome: str) -> None:
        if outcome == "ack":
            self.stats.acked += 1
        elif outcome == "duplicate":
            self.stats.duplicates += 1
        elif outcome == "retry":
            self.stats.retried += 1
        else:
            self.stats.dead_lettered += 1
        if self.metrics is not None:
            self.metrics.consumed.labels(names.queue, outcome).inc()

    async def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < 3600:
            return
        self._last_prune = now
        try:
            removed = await queries.inbox_prune(self.pool, INBOX_RETENTION_SECONDS)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.debug("consumers: inbox prune failed: %s", _text(e))
            return
        if removed:
            log.info("consumers: forgot %d inbox keys older than %d days", removed, INBOX_RETENTION_SECONDS // 86400)


def _int_header(message: AbstractIncomingMessage, name: str) -> int:
    value = (message.headers or {}).get(name)
    try:
        return max(int(value), 0) if value is not None else 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _message_id(message: AbstractIncomingMessage) -> str | None:
    """The message's AMQP message_id as its publisher set it (None if none: see NO_MESSAGE_ID_HEADER)."""
    return None if (message.headers or {}).get(NO_MESSAGE_ID_HEADER) else message.message_id


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> aio_pika.Message:
    kept = {k: v for k, v in (message.headers or {}).items() if k not in _DROPPED_HEADERS}
    kept.update(headers)
    if not message.message_id:
        kept[NO_MESSAGE_ID_HEADER] = True
    return aio_pika.Message(
        message.body, headers=kept, content_type=message.content_type, content_encoding=message.content_encoding,
        message_id=message.message_id, correlation_id=message.correlation_id, type=message.type,
        timestamp=message.timestamp, app_id=message.app_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def _quietly(coro: Awaitable[object]) -> None:
    try:
        await coro
    except Exception as e:  # noqa: BLE001 - best effort: the claim's lease runs out anyway
        log.debug("inbox: %s", _text(e))


@dataclass
class EventIntegration:
    """The AMQP edge of one gateway: the consumers and the outbox relay."""

    consumers: EventConsumers
    relay: OutboxRelay | None

    @classmethod
    def start(cls, settings: Settings, core: Core) -> EventIntegration | None:
        """Start both in the background; None (said once in the log) without INVENTORY_AMQP_URL."""
        if not settings.amqp_url:
            log.info("INVENTORY_AMQP_URL is unset: event consumers and the outbox relay are off; "
                     "outgoing events wait in the outbox")
            return None
        relay = None
        if settings.relay_in_gateway:
            relay = OutboxRelay(settings)
            relay.start()
        consumers = EventConsumers(settings, EventHandlers(core), core.pool, metrics=getattr(core, "metrics", None))
        consumers.start()
        log.info("events: consuming from RabbitMQ%s (prefix %r)",
                 " and publishing the outbox" if relay else "; the outbox relay runs elsewhere "
                 "(INVENTORY_RELAY_IN_GATEWAY=false)", settings.amqp_prefix)
        return cls(consumers, relay)

    async def stop_consumers(self, grace: float = 5.0) -> None:
        await self.consumers.stop(grace)

    async def stop_relay(self) -> None:
        """Publish what is in the outbox once more, then close."""
        if self.relay is not None:
            await self.relay.stop(flush=True)
