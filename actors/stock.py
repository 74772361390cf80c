"""The stock actor's pure core: `decide` what a command means, `evolve` the state by an event.

Rules of this file (after h11 and Akka persistence):

* No I/O, clock, uuid or logging. `now` and every id come in with the command.
* `decide(states, command, now)` never mutates; it returns a `Decision` with the events
  to persist and the reply to send once they are durable. A business rejection
  (insufficient stock, unknown reservation) is a `Rejected` reply, never an exception.
* `evolve(state, event)` only applies a fact; it never refuses one. `apply` is the same
  transition done in place, which the shard uses on its per-batch working copies so a
  hot stock with thousands of open reservations is not copied once per command.
* A reservation line past its `expires_at` is never counted as reserved by a decision:
  any command that touches a stock first expires its overdue lines (events included),
  whether or not a timer fired.
* Threshold events (low_level, reorder_needed, depleted) are emitted on the *crossing*:
  when the condition goes from false to true within one decision. Recovery re-arms them.

`states` given to `decide` must hold every resident stock of the variants the command
names (the shard activates them first); a key absent from it has no stock record.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from actors.messages import (
    MOVEMENT_KINDS,
    NOTIFICATIONS,
    AbortReservation,
    ArchiveVariant,
    Command,
    ConfirmReservation,
    DoneResult,
    Event,
    ExpireReservation,
    InitializeVariant,
    PolicyChanged,
    ReadStock,
    ReceiveTransfer,
    RecordMovement,
    Rejected,
    ReleaseReservation,
    Reply,
    ReservationAborted,
    ReservationConfirmed,
    ReservationExpired,
    ReservationReleased,
    ReservationResult,
    ReservationShipped,
    ReservedLine,
    ReserveStock,
    SetStockPolicy,
    SetWarehouseActive,
    ShipReservation,
    ShipTransfer,
    Shortage,
    StockArchived,
    StockCreated,
    StockKey,
    StockLevel,
    StockLevelsResult,
    StockMoved,
    StockReserved,
    ThresholdCrossed,
    VariantArchived,
    VariantArchiveRefused,
    VariantInitialized,
)

NO_EXPIRY = math.inf
USABLE_STATUSES = ("active", "pending_purchase")
MAX_QUANTITY = 2**31 - 1


REF_SEP = "\x1f"


class Line(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One open reservation line of a stock. A confirmed line keeps its expires_at but has no TTL.

    Its three ids are one string, `ref` = reservation_id, order_id and items_hash joined by
    `REF_SEP` (read through the properties): a resident stock with two open lines is about a
    kilobyte, and one string object costs 49 bytes before its characters. The reservation id
    (a uuid) and the hash (hex) never hold the separator, so an order id may."""

    ref: str
    quantity: int
    expires_at: float
    confirmed: bool = False

    @classmethod
    def of(cls, reservation_id: str, order_id: str, quantity: int, expires_at: float, items_hash: str,
           confirmed: bool = False) -> Line:
        if REF_SEP in reservation_id or REF_SEP in items_hash:
            raise ValueError("a reservation id or items hash holds the line separator")
        return cls(REF_SEP.join((reservation_id, order_id, items_hash)), quantity, expires_at, confirmed)

    @property
    def reservation_id(self) -> str:
        return self.ref.partition(REF_SEP)[0]

    @property
    def order_id(self) -> str:
        return self.ref.partition(REF_SEP)[2].rpartition(REF_SEP)[0]

    @property
    def items_hash(self) -> str:
        return self.ref.rpartition(REF_SEP)[2]


Lines = tuple[Line, ...] | dict[str, Line]
"""A stock's open lines: a tuple while it holds fewer than `HEAP_FROM` (56 bytes for two, where a
dict costs 184), a dict by reservation id from then on (a hot stock's lookups stay O(1))."""


class StockState(msgspec.Struct, gc=False):
    """The state of one (organization, variant, warehouse) stock."""

    organization_id: str
    variant_id: str
    warehouse_id: str
    on_hand: int = 0
    reserved: int = 0
    in_transit: int = 0
    min_stock: int = 0
    max_stock: int = 0
    reorder_point: int = 0
    status: str = "active"
    warehouse_active: bool = True
    version: int = 0
    lines: Lines = ()
    next_expiry: float = NO_EXPIRY
    """A lower bound of the earliest unconfirmed `expires_at`: no line is overdue before it."""
    expiry_heap: list[tuple[float, str]] | None = None
    """(expires_at, reservation_id) of the TTL lines, once the stock holds `HEAP_FROM` lines.

    A hot stock in a flash sale holds hundreds of thousands of open lines and some expire
    in every batch: finding them, and the next bound, must not scan them all. Entries of
    lines since closed or confirmed are dropped lazily when they reach the top."""

    @property
    def key(self) -> StockKey:
        return (self.organization_id, self.variant_id, self.warehouse_id)

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    @property
    def usable(self) -> bool:
        return self.status in USABLE_STATUSES and self.warehouse_active

    def copy(self) -> StockState:
        heap = None if self.expiry_heap is None else list(self.expiry_heap)
        lines = dict(self.lines) if isinstance(self.lines, dict) else self.lines
        return msgspec.structs.replace(self, lines=lines, expiry_heap=heap)


# ---------------------------------------------------------------- a stock's lines


def open_lines(state: StockState) -> Iterable[Line]:
    lines = state.lines
    return lines.values() if isinstance(lines, dict) else lines


def _position(lines: tuple[Line, ...], reservation_id: str) -> int:
    """Index of the reservation's line in a tuple of lines, -1 if it has none."""
    if REF_SEP in reservation_id:
        return -1  # no line's id holds it (Line.of): never a prefix match into its order id
    prefix = reservation_id + REF_SEP
    for i, line in enumerate(lines):
        if line.ref.startswith(prefix):
            return i
    return -1


def get_line(state: StockState, reservation_id: str) -> Line | None:
    lines = state.lines
    if isinstance(lines, dict):
        return lines.get(reservation_id)
    i = _position(lines, reservation_id)
    return lines[i] if i >= 0 else None


def line_ids(state: StockState) -> list[str]:
    return [ln.reservation_id for ln in open_lines(state)]


def _put_line(state: StockState, line: Line) -> None:
    """Add `line`, or replace the line of the same reservation."""
    lines = state.lines
    if isinstance(lines, dict):
        lines[line.reservation_id] = line
        return
    i = _position(lines, line.reservation_id)
    if i >= 0:
        state.lines = lines[:i] + (line,) + lines[i + 1:]
        return
    grown = lines + (line,)
    state.lines = {ln.reservation_id: ln for ln in grown} if len(grown) >= HEAP_FROM else grown


def _pop_line(state: StockState, reservation_id: str) -> None:
    lines = state.lines
    if isinstance(lines, dict):
        lines.pop(reservation_id, None)
        return
    i = _position(lines, reservation_id)
    if i >= 0:
        state.lines = lines[:i] + lines[i + 1:]


class PriorReservation(msgspec.Struct, frozen=True, gc=False):
    """What the store remembers of a reservation that is no longer open in this shard."""

    status: str  # released | expired | shipped | cancelled (before it was made) | conflict (other items: their hash)
    items_hash: str
    expires_at: float
    lines: tuple[ReservedLine, ...]


class PriorLine(NamedTuple):
    """A line of a reservation as Postgres remembers it."""

    variant_id: str
    warehouse_id: str
    quantity: int
    status: str
    items_hash: str
    expires_at: float


_OPEN = ("active", "confirmed")


def prior_of(lines: Sequence[PriorLine], items_hash: str, variants: Collection[str]) -> PriorReservation | None:
    """What a ReserveStock of `items_hash` whose lines here are on `variants`, none open in this
    shard's memory, must be decided against; None: it is new here.

    * A line with other items: the order was reserved with other items (a conflict).
    * Lines on `variants`: this shard's part of the reservation, closed (an open one would be
      in memory): a retry after its release, expiry or shipment.
    * Otherwise lines all closed: the reservation is closed everywhere.
    * Otherwise (open lines of the same items elsewhere, or none): another shard's part of
      the same reservation, or nothing; new here.
    """
    if not lines:
        return None
    other = next((ln for ln in lines if ln.items_hash != items_hash), None)
    if other is not None:
        return PriorReservation("conflict", other.items_hash, other.expires_at, ())
    here = [ln for ln in lines if ln.variant_id in variants]
    if not here:
        if any(ln.status in _OPEN for ln in lines):
            return None
        here = list(lines)
    statuses = {ln.status for ln in here}
    if statuses & set(_OPEN):  # (not expected: open lines here are in memory)
        return None
    status = "shipped" if "shipped" in statuses else ("expired" if "expired" in statuses else "released")
    return PriorReservation(status=status, items_hash=items_hash, expires_at=max(ln.expires_at for ln in here),
                            lines=tuple(ReservedLine(ln.variant_id, ln.warehouse_id, ln.quantity) for ln in here))


class Decision(msgspec.Struct, frozen=True, gc=False):
    events: list[tuple[StockKey, Event]]
    reply: Reply


# ---------------------------------------------------------------- evolve


def apply(state: StockState, event: Event) -> None:
    """Apply one event to `state` in place (the shard's working copy)."""
    if isinstance(event, NOTIFICATIONS):
        return
    state.version += 1
    if isinstance(event, StockReserved):
        _put_line(state, Line.of(
            event.reservation_id, event.order_id, event.quantity, event.expires_at, event.items_hash
        ))
        state.reserved += event.quantity
        state.next_expiry = min(state.next_expiry, event.expires_at)
        if state.expiry_heap is not None:
            heapq.heappush(state.expiry_heap, (event.expires_at, event.reservation_id))
        elif len(state.lines) >= HEAP_FROM:
            _build_heap(state)
    elif isinstance(event, (ReservationReleased, ReservationExpired, ReservationAborted)):
        _pop_line(state, event.reservation_id)
        state.reserved -= event.quantity
    elif isinstance(event, ReservationShipped):
        _pop_line(state, event.reservation_id)
        state.reserved -= event.quantity
        state.on_hand -= event.quantity
    elif isinstance(event, ReservationConfirmed):
        line = get_line(state, event.reservation_id)
        if line is None:  # decide confirms only open lines: a broken invariant, fail the batch
            raise KeyError(f"confirmed line {event.reservation_id} is not open")
        _put_line(state, msgspec.structs.replace(line, confirmed=True))
    elif isinstance(event, StockMoved):
        state.on_hand += event.on_hand_delta
        state.in_transit += event.in_transit_delta
        state.status = _status_after_move(state.status, event.kind, state.in_transit)
    elif isinstance(event, StockArchived):
        state.status = "archived"
    elif isinstance(event, (PolicyChanged, StockCreated)):
        state.min_stock = event.min_stock
        state.max_stock = event.max_stock
        state.reorder_point = event.reorder_point


def _status_after_move(status: str, kind: str, in_transit: int) -> str:
    """A purchase order in transit marks the stock pending_purchase until nothing is in transit
    any more (in_transit also holds transfers' units: whichever arrives last ends it)."""
    if kind == "purchase_ordered" and status == "active":
        return "pending_purchase"
    if kind != "purchase_ordered" and status == "pending_purchase" and in_transit == 0:
        return "active"
    return status


def evolve(state: StockState, event: Event) -> StockState:
    """The pure transition: a new state, `state` untouched."""
    new = state.copy()
    apply(new, event)
    return new


def replay(initial: StockState, events: Iterable[Event]) -> StockState:
    state = initial.copy()
    for event in events:
        apply(state, event)
    return state


HEAP_FROM = 64
"""Below this many lines a stock scans them; from it on it keeps an `expiry_heap`."""


def _build_heap(state: StockState) -> None:
    state.expiry_heap = [(ln.expires_at, ln.reservation_id) for ln in open_lines(state) if not ln.confirmed]
    heapq.heapify(state.expiry_heap)


def _live(state: StockState, entry: tuple[float, str]) -> Line | None:
    line = get_line(state, entry[1])
    if line is None or line.confirmed or line.expires_at != entry[0]:
        return None
    return line


def overdue_lines(state: StockState, now: float) -> list[Line]:
    """The unconfirmed lines with `expires_at <= now`, oldest first; never mutates `state`.

    With a heap, only the entries at or below `now` are visited (a walk of the heap's tree
    that prunes every subtree whose root is later), so the cost follows what is overdue.
    """
    if now < state.next_expiry:
        return []
    heap = state.expiry_heap
    if heap is None:
        found = [ln for ln in open_lines(state) if not ln.confirmed and ln.expires_at <= now]
    else:
        seen: dict[str, Line] = {}
        stack = [0]
        while stack:
            i = stack.pop()
            if i >= len(heap) or heap[i][0] > now:
                continue
            line = _live(state, heap[i])
            if line is not None:
                seen[line.reservation_id] = line
            stack.extend((2 * i + 1, 2 * i + 2))
        found = list(seen.values())
    return sorted(found, key=lambda x: (x.expires_at, x.reservation_id))


def recompute_next_expiry(state: StockState) -> None:
    """Tighten the lower bound after lines were removed (optional; the bound stays safe)."""
    if state.expiry_heap is None and len(state.lines) >= HEAP_FROM:
        _build_heap(state)  # activated from Postgres with many lines
    heap = state.expiry_heap
    if heap is None:
        state.next_expiry = min(
            (line.expires_at for line in open_lines(state) if not line.confirmed), default=NO_EXPIRY
        )
        return
    while heap and _live(state, heap[0]) is None:
        heapq.heappop(heap)
    state.next_expiry = heap[0][0] if heap else NO_EXPIRY


def level(state: StockState) -> StockLevel:
    return StockLevel(
        organization_id=state.organization_id,
        variant_id=state.variant_id,
        warehouse_id=state.warehouse_id,
        on_hand=state.on_hand,
        reserved=state.reserved,
        available=state.available,
        in_transit=state.in_transit,
        min_stock=state.min_stock,
        max_stock=state.max_stock,
        reorder_point=state.reorder_point,
        status=state.status,
        version=state.version,
        warehouse_active=state.warehouse_active,
    )


# ---------------------------------------------------------------- choosing a warehouse


@dataclass(frozen=True)
class Choice:
    warehouse_id: str
    available: int
    sufficient: bool


def choose_warehouse(
    candidates: Sequence[tuple[str, int]], quantity: int, preferred_warehouse_id: str = ""
) -> Choice:
    """Pick the warehouse for `quantity` among usable (warehouse_id, available) pairs.

    The preferred warehouse if it alone covers the quantity; else the one with the most
    available that covers it; else insufficient, naming the largest single warehouse.
    Ties break on warehouse_id so the answer is deterministic.
    """
    for wid, avail in candidates:
        if wid == preferred_warehouse_id and avail >= quantity:
            return Choice(wid, avail, True)
    best: tuple[str, int] | None = None
    for wid, avail in candidates:
        if best is None or avail > best[1] or (avail == best[1] and wid < best[0]):
            best = (wid, avail)
    if best is None:
        return Choice("", 0, False)
    return Choice(best[0], max(best[1], 0), best[1] >= quantity)


# ---------------------------------------------------------------- decide


@dataclass
class _Work:
    """Bookkeeping of one decision: the events so far and their effect, without copying states."""

    states: Mapping[StockKey, StockState]
    now: float
    events: list[tuple[StockKey, Event]] = field(default_factory=list)
    created: dict[StockKey, StockState] = field(default_factory=dict)
    touched: dict[StockKey, None] = field(default_factory=dict)
    d_on_hand: dict[StockKey, int] = field(default_factory=dict)
    d_reserved: dict[StockKey, int] = field(default_factory=dict)
    d_in_transit: dict[StockKey, int] = field(default_factory=dict)
    d_version: dict[StockKey, int] = field(default_factory=dict)
    policy: dict[StockKey, tuple[int, int, int]] = field(default_factory=dict)
    closed: set[tuple[StockKey, str]] = field(default_factory=set)
    confirmed: set[tuple[StockKey, str]] = field(default_factory=set)
    expired_now: set[str] = field(default_factory=set)
    archived: set[StockKey] = field(default_factory=set)
    status: dict[StockKey, str] = field(default_factory=dict)
    after_expiry: dict[StockKey, int] = field(default_factory=dict)
    """Available once a touched stock's overdue lines are expired: the 'before' of a crossing."""

    def base(self, key: StockKey) -> StockState | None:
        return self.states.get(key) or self.created.get(key)

    def touch(self, key: StockKey) -> StockState | None:
        """Mark `key` as part of this decision and expire its overdue lines first."""
        state = self.base(key)
        if state is None or key in self.touched:
            return state
        self.touched[key] = None
        overdue = overdue_lines(state, self.now)
        for ln in overdue:
            self.emit(key, ReservationExpired(ln.reservation_id, ln.order_id, ln.quantity, ln.expires_at))
            self.expired_now.add(ln.reservation_id)
        if overdue:
            self.after_expiry[key] = self.available(key)
        return state

    def emit(self, key: StockKey, event: Event) -> None:
        self.events.append((key, event))
        if isinstance(event, NOTIFICATIONS):
            return
        self.d_version[key] = self.d_version.get(key, 0) + 1
        if isinstance(event, StockReserved):
            self._add(self.d_reserved, key, event.quantity)
        elif isinstance(event, (ReservationReleased, ReservationExpired, ReservationAborted)):
            self._add(self.d_reserved, key, -event.quantity)
            self.closed.add((key, event.reservation_id))
        elif isinstance(event, ReservationShipped):
            self._add(self.d_reserved, key, -event.quantity)
            self._add(self.d_on_hand, key, -event.quantity)
            self.closed.add((key, event.reservation_id))
        elif isinstance(event, ReservationConfirmed):
            self.confirmed.add((key, event.reservation_id))
        elif isinstance(event, StockMoved):
            self._add(self.d_on_hand, key, event.on_hand_delta)
            self._add(self.d_in_transit, key, event.in_transit_delta)
            self.status[key] = _status_after_move(self.status_of(key), event.kind, self.in_transit(key))
        elif isinstance(event, (PolicyChanged, StockCreated)):
            self.policy[key] = (event.min_stock, event.max_stock, event.reorder_point)
        elif isinstance(event, StockArchived):
            self.archived.add(key)

    @staticmethod
    def _add(d: dict[StockKey, int], key: StockKey, v: int) -> None:
        d[key] = d.get(key, 0) + v

    def create(self, key: StockKey, event: StockCreated) -> None:
        self.created[key] = StockState(key[0], key[1], key[2])
        self.touched[key] = None
        self.emit(key, event)

    def line(self, key: StockKey, reservation_id: str) -> Line | None:
        state = self.base(key)
        if state is None or (key, reservation_id) in self.closed:
            return None
        return get_line(state, reservation_id)

    def on_hand(self, key: StockKey) -> int:
        state = self.base(key)
        return (state.on_hand if state else 0) + self.d_on_hand.get(key, 0)

    def reserved(self, key: StockKey) -> int:
        state = self.base(key)
        return (state.reserved if state else 0) + self.d_reserved.get(key, 0)

    def available(self, key: StockKey) -> int:
        return self.on_hand(key) - self.reserved(key)

    def status_of(self, key: StockKey) -> str:
        if key in self.archived:
            return "archived"
        state = self.base(key)
        return self.status.get(key, state.status if state else "active")

    def in_transit(self, key: StockKey) -> int:
        state = self.base(key)
        return (state.in_transit if state else 0) + self.d_in_transit.get(key, 0)

    def level(self, key: StockKey) -> StockLevel:
        state = self.base(key)
        assert state is not None
        mn, mx, rp = self.policy.get(key, (state.min_stock, state.max_stock, state.reorder_point))
        return StockLevel(
            organization_id=key[0],
            variant_id=key[1],
            warehouse_id=key[2],
            on_hand=self.on_hand(key),
            reserved=self.reserved(key),
            available=self.available(key),
            in_transit=state.in_transit + self.d_in_transit.get(key, 0),
            min_stock=mn,
            max_stock=mx,
            reorder_point=rp,
            status=self.status_of(key),
            version=state.version + self.d_version.get(key, 0),
            warehouse_active=state.warehouse_active,
        )

    def finish(self, reply: Reply, keep_events: bool = True) -> Decision:
        """Close the decision: add threshold crossings for every touched stock."""
        if not keep_events:
            # A rejection keeps only the expiries it found: they are facts of time, not of the command.
            self.events = [(k, e) for k, e in self.events if isinstance(e, ReservationExpired)]
            self._recount()
        for key in self.touched:
            before = self.states.get(key)
            after = self.level(key)
            if after.status == "archived":
                continue
            if before is None:  # created by this decision: it starts at zero
                before_cond = _conditions(0, after.min_stock, after.reorder_point)
            else:
                # Expiries only raise available; a crossing is measured from where they left it,
                # so it does not depend on whether a timer fired before this command.
                available = self.after_expiry.get(key, before.available)
                before_cond = _conditions(available, before.min_stock, before.reorder_point)
            after_cond = _conditions(after.available, after.min_stock, after.reorder_point)
            for kind, was, now_true in zip(_THRESHOLDS, before_cond, after_cond):
                if now_true and not was:
                    self.events.append((key, ThresholdCrossed(kind, after.available)))
        return Decision(self.events, reply)

    def _recount(self) -> None:
        events = self.events
        self.events = []
        for attr in ("d_on_hand", "d_reserved", "d_in_transit", "d_version", "policy", "archived", "status"):
            getattr(self, attr).clear()
        self.closed.clear()
        self.confirmed.clear()
        for key in list(self.created):
            if not any(k == key for k, _ in events):
                del self.created[key]
                self.touched.pop(key, None)
        for key, event in events:
            self.emit(key, event)


_THRESHOLDS = ("depleted", "low_level", "reorder_needed")


def _conditions(available: int, min_stock: int, reorder_point: int) -> tuple[bool, bool, bool]:
    return (available <= 0, min_stock > 0 and available <= min_stock,
            reorder_point > 0 and available <= reorder_point)


def _variant_keys(states: Mapping[StockKey, StockState], organization_id: str, variant_id: str) -> list[StockKey]:
    return sorted(k for k in states if k[0] == organization_id and k[1] == variant_id)


def _invalid(message: str) -> Rejected:
    return Rejected("invalid", message)


def decide(
    states: Mapping[StockKey, StockState],
    command: Command,
    now: float,
    prior: PriorReservation | None = None,
) -> Decision:
    """Decide what `command` means for `states` at time `now`.

    `prior` is what the store remembers of the command's reservation when none of its
    lines is open in `states` (a retry after release, expiry or shipment).
    """
    w = _Work(states, now)
    if isinstance(command, ReserveStock):
        return _reserve(w, command, prior)
    if isinstance(command, (ReleaseReservation, ConfirmReservation, AbortReservation, ShipReservation)):
        return _close(w, command)
    if isinstance(command, ExpireReservation):
        for key in _variant_keys(states, command.organization_id, command.variant_id):
            w.touch(key)
        return w.finish(DoneResult(changed=bool(w.events)))
    if isinstance(command, RecordMovement):
        return _movement(w, command)
    if isinstance(command, SetStockPolicy):
        return _policy(w, command)
    if isinstance(command, ShipTransfer):
        return _ship_transfer(w, command)
    if isinstance(command, ReceiveTransfer):
        return _receive_transfer(w, command)
    if isinstance(command, ReadStock):
        keys = _variant_keys(states, command.organization_id, command.variant_id)
        if command.warehouse_id:
            keys = [k for k in keys if k[2] == command.warehouse_id]
        for key in keys:
            w.touch(key)
        return w.finish(StockLevelsResult(tuple(w.level(k) for k in keys)))
    if isinstance(command, InitializeVariant):
        return _initialize(w, command)
    if isinstance(command, ArchiveVariant):
        return _archive(w, command)
    if isinstance(command, SetWarehouseActive):
        return Decision([], _invalid("SetWarehouseActive is handled by the shard, not by a stock"))
    raise TypeError(f"not a command: {type(command).__name__}")


def _reserve(w: _Work, cmd: ReserveStock, prior: PriorReservation | None) -> Decision:
    org, rid = cmd.organization_id, cmd.reservation_id
    variants = sorted({ln.variant_id for ln in cmd.lines})
    keys = [k for v in variants for k in _variant_keys(w.states, org, v)]
    for key in keys:
        w.touch(key)

    existing = [(k, open_) for k in keys if (open_ := w.line(k, rid)) is not None]
    if existing:
        if any(ln.items_hash != cmd.items_hash for _, ln in existing):
            return w.finish(Rejected("conflict", f"order already has reservation {rid} with other items"))
        lines = tuple(ReservedLine(k[1], k[2], ln.quantity) for k, ln in existing)
        confirmed = all(ln.confirmed for _, ln in existing)
        expires = max(ln.expires_at for _, ln in existing)
        return w.finish(ReservationResult(rid, expires, lines, replayed=True,
                                          status="confirmed" if confirmed else "active"))
    if rid in w.expired_now:
        return w.finish(Rejected("closed", f"reservation {rid} has expired"))
    if prior is not None:
        if prior.items_hash != cmd.items_hash:
            return w.finish(Rejected("conflict", f"order already has reservation {rid} with other items"))
        if prior.status == "shipped":
            return w.finish(ReservationResult(rid, prior.expires_at, prior.lines, replayed=True, status="shipped"))
        return w.finish(Rejected("closed", f"reservation {rid} is {prior.status}"))

    if not cmd.lines:
        return w.finish(_invalid("items: at least one item is required"))
    if cmd.expires_at <= w.now:
        return w.finish(_invalid("ttl: the reservation would already be expired"))
    for item in cmd.lines:
        if not item.variant_id:
            return w.finish(_invalid("items.variant_id: must not be empty"))
        if not 0 < item.quantity <= MAX_QUANTITY:
            return w.finish(_invalid(f"items.quantity: must be positive (variant {item.variant_id})"))

    shortages: list[Shortage] = []
    archived: list[str] = []
    chosen: dict[StockKey, int] = {}  # one line per stock: repeated lines add up
    for req in cmd.lines:
        vkeys = _variant_keys(w.states, org, req.variant_id)
        if vkeys and all(w.states[k].status == "archived" for k in vkeys):
            archived.append(req.variant_id)
            continue
        usable = [(k[2], w.available(k) - chosen.get(k, 0)) for k in vkeys if w.states[k].usable]
        if req.warehouse_id:
            match = [c for c in usable if c[0] == req.warehouse_id]
            avail = match[0][1] if match else 0
            choice = Choice(req.warehouse_id, max(avail, 0), avail >= req.quantity)
        else:
            choice = choose_warehouse(usable, req.quantity)
        if not choice.sufficient:
            shortages.append(Shortage(req.variant_id, choice.warehouse_id, req.quantity, choice.available))
            continue
        key = (org, req.variant_id, choice.warehouse_id)
        if chosen.get(key, 0) + req.quantity > MAX_QUANTITY:
            return w.finish(_invalid(f"items.quantity: total for variant {req.variant_id} exceeds int32"))
        chosen[key] = chosen.get(key, 0) + req.quantity

    if archived:
        return w.finish(Rejected("archived", "variant archived: " + ", ".join(archived)), keep_events=False)
    if shortages:
        detail = "; ".join(
            f"variant {s.variant_id}: requested {s.requested}, available {s.available}"
            + (f" in warehouse {s.warehouse_id}" if s.warehouse_id else "")
            for s in shortages
        )
        return w.finish(Rejected("insufficient_stock", f"insufficient stock for {detail}", tuple(shortages)),
                        keep_events=False)
    for key, quantity in chosen.items():
        w.emit(key, StockReserved(rid, cmd.order_id, quantity, cmd.expires_at, cmd.items_hash))
    reserved = tuple(ReservedLine(k[1], k[2], q) for k, q in chosen.items())
    return w.finish(ReservationResult(rid, cmd.expires_at, reserved))


_CloseCommand = ReleaseReservation | ConfirmReservation | AbortReservation | ShipReservation


def _close(w: _Work, cmd: _CloseCommand) -> Decision:
    org, rid = cmd.organization_id, cmd.reservation_id
    keys = [k for v in sorted(set(cmd.variant_ids)) for k in _variant_keys(w.states, org, v)]
    for key in keys:
        w.touch(key)
    found = [(k, open_) for k in keys if (open_ := w.line(k, rid)) is not None]
    if isinstance(cmd, ReleaseReservation):
        for k, ln in found:
            w.emit(k, ReservationReleased(rid, ln.quantity, cmd.reason))
        return w.finish(DoneResult(changed=bool(found)))
    if isinstance(cmd, AbortReservation):
        # Only what the aborting call made: lines confirmed since belong to a call that succeeded.
        undone = [(k, ln) for k, ln in found if not ln.confirmed]
        for k, ln in undone:
            w.emit(k, ReservationAborted(rid, ln.quantity))
        return w.finish(DoneResult(changed=bool(undone)))
    if not found:
        why = "has expired" if rid in w.expired_now else "is no longer open"
        return w.finish(Rejected("closed", f"reservation {rid} {why}"))
    if isinstance(cmd, ConfirmReservation):
        for k, ln in found:
            if not ln.confirmed:
                w.emit(k, ReservationConfirmed(rid, ln.quantity))
        return w.finish(DoneResult(changed=any(not ln.confirmed for _, ln in found)))
    for k, ln in found:
        w.emit(k, ReservationShipped(rid, ln.order_id, ln.quantity))
    return w.finish(DoneResult(changed=True, levels=tuple(w.level(k) for k, _ in found)))


def _movement_delta(cmd: RecordMovement) -> int | Rejected:
    """The on_hand delta of a movement (purchase_ordered moves in_transit only: 0 here)."""
    if cmd.kind not in MOVEMENT_KINDS:
        return _invalid(f"type: unknown movement type {cmd.kind!r}")
    if cmd.kind == "purchase_ordered":
        return 0 if 0 < cmd.quantity <= MAX_QUANTITY else _invalid("quantity: must be positive")
    if cmd.kind == "adjustment":
        if cmd.quantity == 0 or abs(cmd.quantity) > MAX_QUANTITY:
            return _invalid("quantity: an adjustment must be a non-zero int32")
        return cmd.quantity
    if not 0 < cmd.quantity <= MAX_QUANTITY:
        return _invalid("quantity: must be positive")
    return -cmd.quantity if cmd.kind == "issue" else cmd.quantity


def _movement(w: _Work, cmd: RecordMovement) -> Decision:
    delta = _movement_delta(cmd)
    if isinstance(delta, Rejected):
        return w.finish(delta)
    key = (cmd.organization_id, cmd.variant_id, cmd.warehouse_id)
    state = w.touch(key)
    if state is None:
        if not (cmd.kind in ("receipt", "purchase_ordered", "purchase_received") and cmd.create_if_missing):
            return w.finish(Rejected("not_found", f"no stock of variant {cmd.variant_id} "
                                                  f"in warehouse {cmd.warehouse_id}"))
        others = _variant_keys(w.states, cmd.organization_id, cmd.variant_id)
        if others and all(w.states[k].status == "archived" for k in others):  # deleted in the Catalog
            return w.finish(Rejected("archived", f"variant {cmd.variant_id} is archived"))
        w.create(key, StockCreated())
    elif state.status == "archived":
        return w.finish(Rejected("archived", f"variant {cmd.variant_id} is archived"))
    rejected = _check_on_hand(w, key, delta, cmd.variant_id)
    if rejected:
        return w.finish(rejected)
    in_transit = (state.in_transit if state else 0) + w.d_in_transit.get(key, 0)
    transit_delta = 0
    if cmd.kind == "purchase_ordered":
        if in_transit + cmd.quantity > MAX_QUANTITY:
            return w.finish(_invalid("quantity: in_transit would exceed the int32 range"))
        transit_delta = cmd.quantity
    elif cmd.kind == "purchase_received":
        # Goods may arrive without an order we saw, or more than was ordered: only what the
        # order has in transit leaves in_transit (the gateway knows it: in_transit_limit).
        limit = cmd.in_transit_limit if cmd.in_transit_limit >= 0 else cmd.quantity
        transit_delta = -min(cmd.quantity, in_transit, limit)
    w.emit(key, StockMoved(cmd.kind, on_hand_delta=delta, in_transit_delta=transit_delta, reason=cmd.reason,
                           reference_id=cmd.reference_id, source=cmd.source))
    return w.finish(DoneResult(levels=(w.level(key),)))


def _check_on_hand(w: _Work, key: StockKey, delta: int, variant_id: str) -> Rejected | None:
    new_on_hand = w.on_hand(key) + delta
    if new_on_hand > MAX_QUANTITY:
        return _invalid("quantity: on_hand would exceed the int32 range")
    if delta < 0 and new_on_hand < w.reserved(key):
        return Rejected(
            "insufficient_stock",
            f"variant {variant_id} in warehouse {key[2]}: taking {-delta} would leave on_hand "
            f"{new_on_hand} below reserved {w.reserved(key)}",
            (Shortage(variant_id, key[2], -delta, max(w.available(key), 0)),),
        )
    return None


def _policy(w: _Work, cmd: SetStockPolicy) -> Decision:
    if min(cmd.min_stock, cmd.max_stock, cmd.reorder_point) < 0:
        return w.finish(_invalid("min_stock, max_stock, reorder_point: must not be negative"))
    if cmd.max_stock and cmd.max_stock < max(cmd.min_stock, cmd.reorder_point):
        return w.finish(_invalid("max_stock: must be at least min_stock and reorder_point"))
    key = (cmd.organization_id, cmd.variant_id, cmd.warehouse_id)
    state = w.touch(key)
    if state is None:
        return w.finish(Rejected("not_found", f"no stock of variant {cmd.variant_id} in warehouse {cmd.warehouse_id}"))
    if state.status == "archived":
        return w.finish(Rejected("archived", f"variant {cmd.variant_id} is archived"))
    w.emit(key, PolicyChanged(cmd.min_stock, cmd.max_stock, cmd.reorder_point))
    return w.finish(DoneResult(levels=(w.level(key),)))


def _ship_transfer(w: _Work, cmd: ShipTransfer) -> Decision:
    if cmd.from_warehouse_id == cmd.to_warehouse_id:
        return w.finish(_invalid("to_warehouse_id: must differ from from_warehouse_id"))
    if not 0 < cmd.quantity <= MAX_QUANTITY:
        return w.finish(_invalid("quantity: must be positive"))
    src = (cmd.organization_id, cmd.variant_id, cmd.from_warehouse_id)
    dst = (cmd.organization_id, cmd.variant_id, cmd.to_warehouse_id)
    source = w.touch(src)
    if source is None:
        return w.finish(Rejected("not_found", f"no stock of variant {cmd.variant_id} "
                                              f"in warehouse {cmd.from_warehouse_id}"))
    destination = w.touch(dst)
    if destination is None and not cmd.create_if_missing:
        return w.finish(Rejected("not_found", f"no stock of variant {cmd.variant_id} "
                                              f"in warehouse {cmd.to_warehouse_id}"))
    if source.status == "archived" or (destination is not None and destination.status == "archived"):
        return w.finish(Rejected("archived", f"variant {cmd.variant_id} is archived"))
    rejected = _check_on_hand(w, src, -cmd.quantity, cmd.variant_id)
    if rejected:
        return w.finish(rejected)
    if destination is not None and destination.in_transit + w.d_in_transit.get(dst, 0) + cmd.quantity > MAX_QUANTITY:
        return w.finish(_invalid("quantity: in_transit would exceed the int32 range"))
    if destination is None:
        w.create(dst, StockCreated())
    w.emit(src, StockMoved("transfer_out", on_hand_delta=-cmd.quantity, reason=cmd.reason,
                           reference_id=cmd.transfer_id, source=cmd.source))
    w.emit(dst, StockMoved("transfer_in_transit", in_transit_delta=cmd.quantity, reason=cmd.reason,
                           reference_id=cmd.transfer_id, source=cmd.source))
    return w.finish(DoneResult(levels=(w.level(src), w.level(dst))))


def _receive_transfer(w: _Work, cmd: ReceiveTransfer) -> Decision:
    if not 0 < cmd.quantity <= MAX_QUANTITY:
        return w.finish(_invalid("quantity: must be positive"))
    key = (cmd.organization_id, cmd.variant_id, cmd.to_warehouse_id)
    state = w.touch(key)
    if state is None:
        return w.finish(Rejected("not_found", f"no stock of variant {cmd.variant_id} "
                                              f"in warehouse {cmd.to_warehouse_id}"))
    in_transit = state.in_transit + w.d_in_transit.get(key, 0)
    if in_transit < cmd.quantity:
        return w.finish(Rejected("invalid", f"transfer {cmd.transfer_id}: in_transit {in_transit} "
                                            f"is less than {cmd.quantity}"))
    rejected = _check_on_hand(w, key, cmd.quantity, cmd.variant_id)
    if rejected:
        return w.finish(rejected)
    w.emit(key, StockMoved("transfer_receive", on_hand_delta=cmd.quantity, in_transit_delta=-cmd.quantity,
                           reference_id=cmd.transfer_id))
    return w.finish(DoneResult(levels=(w.level(key),)))


def _initialize(w: _Work, cmd: InitializeVariant) -> Decision:
    if min(cmd.min_stock, cmd.max_stock, cmd.reorder_point) < 0:
        return w.finish(_invalid("default_min_stock, default_max_stock: must not be negative"))
    created = []
    for wh in sorted(set(cmd.warehouse_ids)):
        key = (cmd.organization_id, cmd.variant_id, wh)
        if w.touch(key) is None:
            w.create(key, StockCreated(cmd.min_stock, cmd.max_stock, cmd.reorder_point))
            created.append(wh)
    if created:
        first = (cmd.organization_id, cmd.variant_id, created[0])
        w.emit(first, VariantInitialized(tuple(created)))
    keys = _variant_keys({**w.states, **w.created}, cmd.organization_id, cmd.variant_id)
    return w.finish(DoneResult(changed=bool(created), levels=tuple(w.level(k) for k in keys)))


def _archive(w: _Work, cmd: ArchiveVariant) -> Decision:
    keys = _variant_keys(w.states, cmd.organization_id, cmd.variant_id)
    for key in keys:
        w.touch(key)
    holding = [(k[2], w.on_hand(k) + w.in_transit(k)) for k in keys if w.on_hand(k) or w.reserved(k) or w.in_transit(k)]
    anchor = keys[0] if keys else (cmd.organization_id, cmd.variant_id, "")
    if holding:
        w.emit(anchor, VariantArchiveRefused(sum(q for _, q in holding), tuple(holding)))
        return w.finish(Rejected("stock_not_zero", f"variant {cmd.variant_id} still holds stock in "
                                                   + ", ".join(wh for wh, _ in holding)))
    to_archive = [k for k in keys if w.states[k].status != "archived"]
    for key in to_archive:
        w.emit(key, StockArchived())
    if to_archive or not keys:
        w.emit(anchor, VariantArchived(tuple(k[2] for k in keys)))
    return w.finish(DoneResult(changed=bool(to_archive), levels=tuple(w.level(k) for k in keys)))
