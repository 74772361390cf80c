"""The vocabulary spoken between the gateway, the shards and the pure stock core.

Commands are imperative, events past tense, replies end in Result/Rejected. All are
frozen, tagged msgspec structs so a whole batch crosses a process boundary as one
msgpack blob (`encode_batch` / `decode_batch`), which is far cheaper than pickling
objects one by one. Nothing here imports protobuf, asyncpg or Thespian: the gateway
translates its edges into these types and back.

Times are float seconds since the epoch (UTC); the caller supplies `now`.
"""

from __future__ import annotations

import msgspec

StockKey = tuple[str, str, str]
"""(organization_id, variant_id, warehouse_id)"""


class _Msg(msgspec.Struct, frozen=True, tag=True, gc=False, omit_defaults=True):
    pass


# ---------------------------------------------------------------- commands


class ReserveLine(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One requested line; an empty warehouse_id lets the shard choose."""

    variant_id: str
    warehouse_id: str
    quantity: int


class ReserveStock(_Msg, frozen=True):
    """Reserve every line of this shard's part of a reservation, all or nothing."""

    organization_id: str
    reservation_id: str
    order_id: str
    items_hash: str
    expires_at: float
    lines: tuple[ReserveLine, ...]


class ReleaseReservation(_Msg, frozen=True):
    """Return a reservation's lines in these variants to available (idempotent)."""

    organization_id: str
    reservation_id: str
    variant_ids: tuple[str, ...]
    reason: str = ""


class ConfirmReservation(_Msg, frozen=True):
    """Remove the TTL of a reservation's lines: they stay reserved until shipped or released."""

    organization_id: str
    reservation_id: str
    variant_ids: tuple[str, ...]


class AbortReservation(_Msg, frozen=True):
    """Undo this shard's part of a reservation whose other part failed (compensation)."""

    organization_id: str
    reservation_id: str
    variant_ids: tuple[str, ...]


class ShipReservation(_Msg, frozen=True):
    """Deduct a reservation's lines: reserved goes out of on_hand."""

    organization_id: str
    reservation_id: str
    variant_ids: tuple[str, ...]


class ExpireReservation(_Msg, frozen=True):
    """Expire a reservation's overdue lines in one variant (sent by the shard's own timer)."""

    organization_id: str
    reservation_id: str
    variant_id: str


MOVEMENT_KINDS = ("receipt", "issue", "adjustment", "return", "purchase_ordered", "purchase_received")
"""The admin API offers the first four; purchase_* come from Purchasing's events."""


class RecordMovement(_Msg, frozen=True):
    """A back-office movement. quantity > 0 except for 'adjustment', which is signed."""

    organization_id: str
    variant_id: str
    warehouse_id: str
    kind: str
    quantity: int
    reason: str = ""
    reference_id: str = ""
    idempotency_key: str = ""
    create_if_missing: bool = False
    source: str = ""
    in_transit_limit: int = -1
    """purchase_received: take at most this much out of in_transit (what the purchase order
    still has in transit; in_transit also holds transfers' and other orders' units); -1: no limit."""


class SetStockPolicy(_Msg, frozen=True):
    organization_id: str
    variant_id: str
    warehouse_id: str
    min_stock: int
    max_stock: int
    reorder_point: int


class ShipTransfer(_Msg, frozen=True):
    """Move quantity from one warehouse's on_hand into another's in_transit (same variant)."""

    organization_id: str
    variant_id: str
    from_warehouse_id: str
    to_warehouse_id: str
    quantity: int
    transfer_id: str
    reason: str = ""
    create_if_missing: bool = False
    source: str = ""


class ReceiveTransfer(_Msg, frozen=True):
    """Move a shipped transfer's quantity from in_transit into on_hand at its destination."""

    organization_id: str
    variant_id: str
    to_warehouse_id: str
    quantity: int
    transfer_id: str


class ReadStock(_Msg, frozen=True):
    """Read the levels of one variant (every warehouse when warehouse_id is empty)."""

    organization_id: str
    variant_id: str
    warehouse_id: str = ""


class SetWarehouseActive(_Msg, frozen=True):
    """Tell a shard that a warehouse was (de)activated, for its resident stocks. `as_of`: when the
    warehouse row was written; a shard ignores a state older than one it has (two upserts' messages
    may arrive in the other order). 0: unknown, applied."""

    organization_id: str
    warehouse_id: str
    active: bool
    as_of: float = 0.0


class InitializeVariant(_Msg, frozen=True):
    """Create the variant's stock in each of these warehouses where it has none (catalog.variant.created)."""

    organization_id: str
    variant_id: str
    warehouse_ids: tuple[str, ...]
    min_stock: int = 0
    max_stock: int = 0
    reorder_point: int = 0


class ArchiveVariant(_Msg, frozen=True):
    """Archive every stock of a variant if none holds anything (catalog.variant.deleted)."""

    organization_id: str
    variant_id: str


Command = (
    ReserveStock
    | ReleaseReservation
    | ConfirmReservation
    | AbortReservation
    | ShipReservation
    | ExpireReservation
    | RecordMovement
    | SetStockPolicy
    | ShipTransfer
    | ReceiveTransfer
    | ReadStock
    | SetWarehouseActive
    | InitializeVariant
    | ArchiveVariant
)

# ---------------------------------------------------------------- events


class StockCreated(_Msg, frozen=True):
    min_stock: int = 0
    max_stock: int = 0
    reorder_point: int = 0


class StockReserved(_Msg, frozen=True):
    reservation_id: str
    order_id: str
    quantity: int
    expires_at: float
    items_hash: str


class ReservationConfirmed(_Msg, frozen=True):
    reservation_id: str
    quantity: int


class ReservationReleased(_Msg, frozen=True):
    reservation_id: str
    quantity: int
    reason: str = ""


class ReservationExpired(_Msg, frozen=True):
    reservation_id: str
    order_id: str
    quantity: int
    expires_at: float


class ReservationAborted(_Msg, frozen=True):
    reservation_id: str
    quantity: int


class ReservationShipped(_Msg, frozen=True):
    reservation_id: str
    order_id: str
    quantity: int


class StockMoved(_Msg, frozen=True):
    """receipt, issue, adjustment, return, transfer_out, transfer_in_transit, transfer_receive."""

    kind: str
    on_hand_delta: int = 0
    in_transit_delta: int = 0
    reason: str = ""
    reference_id: str = ""
    source: str = ""


class PolicyChanged(_Msg, frozen=True):
    min_stock: int
    max_stock: int
    reorder_point: int


class ThresholdCrossed(_Msg, frozen=True):
    """A notification only (state unchanged): low_level, reorder_needed or depleted."""

    kind: str
    available: int


class StockArchived(_Msg, frozen=True):
    pass


class VariantInitialized(_Msg, frozen=True):
    """A notification (state unchanged): the stocks InitializeVariant created, for the outbox."""

    warehouse_ids: tuple[str, ...]


class VariantArchiveRefused(_Msg, frozen=True):
    """A notification (state unchanged): the variant still holds stock, per warehouse (on_hand + reserved)."""

    total_stock: int
    warehouses: tuple[tuple[str, int], ...]


class VariantArchived(_Msg, frozen=True):
    """A notification (state unchanged): every stock of the variant is archived."""

    warehouse_ids: tuple[str, ...]


Event = (
    StockCreated
    | StockReserved
    | ReservationConfirmed
    | ReservationReleased
    | ReservationExpired
    | ReservationAborted
    | ReservationShipped
    | StockMoved
    | PolicyChanged
    | ThresholdCrossed
    | StockArchived
    | VariantInitialized
    | VariantArchiveRefused
    | VariantArchived
)

NOTIFICATIONS = (ThresholdCrossed, VariantInitialized, VariantArchiveRefused, VariantArchived)
"""Events that change no state (no version bump): they only become outbox rows."""

# ---------------------------------------------------------------- replies


class ReservedLine(msgspec.Struct, frozen=True, array_like=True, gc=False):
    variant_id: str
    warehouse_id: str
    quantity: int


class Shortage(msgspec.Struct, frozen=True, array_like=True, gc=False):
    variant_id: str
    warehouse_id: str
    requested: int
    available: int


class StockLevel(msgspec.Struct, frozen=True, gc=False):
    organization_id: str
    variant_id: str
    warehouse_id: str
    on_hand: int
    reserved: int
    available: int
    in_transit: int
    min_stock: int
    max_stock: int
    reorder_point: int
    status: str
    version: int
    warehouse_active: bool = True


class ReservationResult(_Msg, frozen=True):
    reservation_id: str
    expires_at: float
    lines: tuple[ReservedLine, ...]
    replayed: bool = False
    status: str = "active"


class StockLevelsResult(_Msg, frozen=True):
    levels: tuple[StockLevel, ...]


class DoneResult(_Msg, frozen=True):
    """A command that changed (or, when `changed` is false, found nothing left to change)."""

    changed: bool = True
    levels: tuple[StockLevel, ...] = ()


REJECTION_CODES = (
    "insufficient_stock",  # not enough available; `shortages` says where
    "conflict",  # same id, different content (ALREADY_EXISTS)
    "not_found",
    "invalid",  # bad argument, names the field
    "closed",  # the reservation is expired, released or shipped
    "archived",
    "stock_not_zero",  # a variant cannot be archived while it holds stock
    "unavailable",  # transient: the batch could not be committed; retry
)


class Rejected(_Msg, frozen=True):
    code: str
    message: str
    shortages: tuple[Shortage, ...] = ()


Reply = ReservationResult | StockLevelsResult | DoneResult | Rejected


class Batch(msgspec.Struct, frozen=True, array_like=True, gc=False):
    commands: list[Command]


class BatchReplies(msgspec.Struct, frozen=True, array_like=True, gc=False):
    replies: list[Reply]


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(Batch)
_replies_decoder = msgspec.msgpack.Decoder(BatchReplies)


def encode_batch(commands: list[Command]) -> bytes:
    return _batch_encoder.encode(Batch(commands))


def decode_batch(data: bytes) -> list[Command]:
    return _batch_decoder.decode(data).commands


def encode_replies(replies: list[Reply]) -> bytes:
    return _batch_encoder.encode(BatchReplies(replies))


def decode_replies(data: bytes) -> list[Reply]:
    return _replies_decoder.decode(data).replies
