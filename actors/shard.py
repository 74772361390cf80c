"""A shard: one Thespian actor (one OS process) hosting many stock entities.

Why entities and not one Thespian actor per stock: a multiprocess Thespian actor costs
an OS process (~5 MB, ~1,000 fds); a stock entity costs a few hundred bytes. The entity
(a `StockState` plus the pure `decide`/`apply`) does not know it is hosted here.

For each `ShardBatch` the shard, in this order:
1. adds an `ExpireReservation` for every variant whose timer is due (timers never decide
   alone: the core also expires overdue lines whenever a stock is touched);
2. activates the missing variants (all their warehouses) from Postgres in one query;
3. looks up what the store remembers of reservations and idempotency keys it must answer;
4. runs `decide` for each command in arrival order, applying its events to the stocks;
5. commits every row of the batch in one transaction (`ShardStore.commit`);
6. only then arms the new timers and replies. A failed commit drops every stock from
   memory (they are reloaded from Postgres on their next use, as after a restart) and
   answers every command of the batch `unavailable` (retryable): no reply ever reflects
   an uncommitted change.

Blocking inside the actor is deliberate (Thespian's manual allows it): asyncpg runs on a
private event loop with `run_until_complete`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import heapq
import logging
import math
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from sys import intern
from typing import Any

import msgspec
from thespian.actors import ActorExitRequest, ActorTypeDispatcher, ThespianWatch, WakeupMessage, WatchMessage

from actors.datapath import WILDCARDS, Listener, Peer, frame
from actors.envelopes import (
    ShardBatch,
    ShardBatchResult,
    ShardConfigure,
    ShardStatus,
    ShardStatusRequest,
)
from actors.messages import (
    NOTIFICATIONS,
    AbortReservation,
    Command,
    ConfirmReservation,
    DoneResult,
    Event,
    ExpireReservation,
    ReceiveTransfer,
    RecordMovement,
    Rejected,
    ReleaseReservation,
    Reply,
    ReservationAborted,
    ReservationExpired,
    ReservationReleased,
    ReservationResult,
    ReservationShipped,
    ReserveStock,
    SetWarehouseActive,
    ShipReservation,
    ShipTransfer,
    StockKey,
    decode_batch,
    encode_replies,
)
from actors.stock import (
    StockState,
    apply,
    decide,
    get_line,
    open_lines,
    recompute_next_expiry,
)
from actors.transport import use_poll_selector
from persistence.store import (
    START_READ_TIMEOUT,
    BatchWrite,
    ClosedReservationRetried,
    ShardLockHeld,
    ShardStore,
    StaleVersion,
    Superseded,
    Unseen,
    build_write,
)

log = logging.getLogger("inventory.shard")

VariantKey = tuple[str, str]
_CLOSING = (ReservationAborted, ReservationExpired, ReservationReleased, ReservationShipped)
_reply_codec = msgspec.msgpack


def variants_of(cmd: Command) -> tuple[str, ...]:
    if isinstance(cmd, ReserveStock):
        return tuple(sorted({ln.variant_id for ln in cmd.lines}))
    if isinstance(cmd, (ReleaseReservation, ConfirmReservation, AbortReservation, ShipReservation)):
        return tuple(cmd.variant_ids)
    if isinstance(cmd, SetWarehouseActive):
        return ()
    return (cmd.variant_id,)


def _replayed(cmd: Command, key: str, reply: Reply) -> Reply:
    """The stored reply of a request with this idempotency key, if it was for these stocks; a
    key used before for other stocks (another variant or warehouse) is a `conflict`, not a
    replay of what the other request did. (The quantity is not stored: not compared.)"""
    levels = getattr(reply, "levels", ())
    if isinstance(cmd, RecordMovement):
        wanted = {(cmd.variant_id, cmd.warehouse_id)}
    elif isinstance(cmd, ShipTransfer):
        wanted = {(cmd.variant_id, cmd.from_warehouse_id), (cmd.variant_id, cmd.to_warehouse_id)}
    elif isinstance(cmd, ReceiveTransfer):
        wanted = {(cmd.variant_id, cmd.to_warehouse_id)}
    else:
        return reply
    got = {(level.variant_id, level.warehouse_id) for level in levels}
    if levels and got != wanted:
        return Rejected("conflict", f"{key.split(':', 1)[0]} key {key.split(':', 1)[1]!r} was used for another "
                                    f"request (variant {levels[0].variant_id}, warehouse {levels[0].warehouse_id})")
    return reply


def idempotency_key(cmd: Command) -> str:
    if isinstance(cmd, RecordMovement) and cmd.idempotency_key:
        return "movement:" + cmd.idempotency_key
    if isinstance(cmd, ShipTransfer):
        return "transfer-out:" + cmd.transfer_id
    if isinstance(cmd, ReceiveTransfer):
        return "transfer-in:" + cmd.transfer_id
    return ""


class Resident(msgspec.Struct, gc=False):
    """What a shard keeps of one (organization, variant): its stocks once activated, when a command
    last named it, and the time of its armed timer.

    One small struct per variant instead of a `{warehouse: StockState}` dict, a `last_used` entry
    and an `armed` entry in three tables: with 1,000,000 resident stocks, each table cost 40 to 80
    bytes a variant and the dict 184. (No cycles run through it: untracked by the GC.)"""

    states: StockState | tuple[StockState, ...] | None = None
    """None: not activated (only a timer is known, armed from Postgres at start); a variant with
    one stock keeps it without a tuple around it; () when it has no stock."""
    last_used: float = 0.0
    armed: float = math.inf


def states_of(resident: Resident | None) -> tuple[StockState, ...]:
    if resident is None or resident.states is None:
        return ()
    states = resident.states
    return states if isinstance(states, tuple) else (states,)


def resident_of(residents: dict[VariantKey, Resident], org: str, variant: str) -> Resident:
    """The variant's resident, created (with interned ids: one string object per id, shared by the
    key, the states and the timers) when it has none."""
    resident = residents.get((org, variant))
    if resident is None:
        resident = residents[(intern(org), intern(variant))] = Resident()
    return resident


def _with_state(resident: Resident, state: StockState) -> None:
    """Add a stock created in a batch to its variant."""
    have = states_of(resident)
    resident.states = have + (state,) if have else state


class Reconnecting(Exception):
    """A batch that comes while the shard waits to reconnect (after a failed attempt)."""


class TimerHeap:
    """The shard's expiry timers: one live timer per variant, at the earliest `expires_at` of its
    open TTL lines. The heap holds (expires_at, org, variant); a variant's live time is its
    `Resident.armed` (a resident is created for a variant armed before it is activated).

    Per variant, not per line: a firing timer makes the shard touch the variant's stocks, and a
    touch expires every overdue line of them. (One entry per line, with its own strings, cost
    about 800 bytes per stock with two open reservations.) Arming earlier than the live time
    pushes a new entry; the old one, no longer the variant's armed time, is skipped as stale.
    Residents with a timer armed leave the table only through `disarm` (or `pop_due`).
    """

    def __init__(self, residents: dict[VariantKey, Resident]) -> None:
        self.heap: list[tuple[float, str, str]] = []
        self.residents = residents
        self.live = 0

    def arm(self, expires_at: float, org: str, variant: str) -> None:
        resident = resident_of(self.residents, org, variant)
        if expires_at < resident.armed:
            if resident.armed == math.inf:
                self.live += 1
            resident.armed = expires_at
            heapq.heappush(self.heap, (expires_at, org, variant))

    def disarm(self, key: VariantKey) -> None:
        resident = self.residents.get(key)
        if resident is not None and resident.armed != math.inf:
            resident.armed = math.inf
            self.live -= 1

    def armed_at(self, key: VariantKey) -> float | None:
        resident = self.residents.get(key)
        return None if resident is None or resident.armed == math.inf else resident.armed

    def _is_live(self, entry: tuple[float, str, str]) -> Resident | None:
        resident = self.residents.get((entry[1], entry[2]))
        return resident if resident is not None and resident.armed == entry[0] else None

    def pop_due(self, now: float) -> list[tuple[float, str, str]]:
        """The live timers due at `now`, disarmed (stale entries are dropped on the way)."""
        due = []
        while self.heap and self.heap[0][0] <= now:
            entry = heapq.heappop(self.heap)
            resident = self._is_live(entry)
            if resident is not None:
                resident.armed = math.inf
                self.live -= 1
                due.append(entry)
        return due

    def earliest(self) -> float | None:
        heap = self.heap
        while heap and self._is_live(heap[0]) is None:
            heapq.heappop(heap)  # stale
        return heap[0][0] if heap else None

    def __len__(self) -> int:
        return self.live


class ShardCore:
    """Everything a shard does, without Thespian: testable with a plain event loop."""

    def __init__(self, cfg: ShardConfigure) -> None:
        self.cfg = cfg
        self.store = ShardStore(cfg.dsn, cfg.shard_id, cfg.shard_count)
        self.residents: dict[VariantKey, Resident] = {}
        self.timers = TimerHeap(self.residents)
        self.armed_until = 0.0  # open lines in Postgres due before this are armed
        self.batches = 0
        self.commands = 0
        self.commits = 0
        self.commit_seconds = 0.0
        self.redecided = 0  # batches decided again: a closed reservation was retried (see `_run`)
        # Reservations answered as replays lately (organization, reservation) -> when: their
        # AbortReservation is refused (see `_refused_abort`).
        self.replays: dict[tuple[str, str], float] = {}
        # (organization, warehouse) -> when the active state this shard applied was written
        self.warehouse_as_of: dict[tuple[str, str], float] = {}
        self._next_passivation = 0.0
        self._loaded_since_freeze = 0
        self.served = False  # started once: holds (or held) the lock
        self.superseded = False  # a newer copy has started since this one (ShardStore.Superseded)
        self.connects = 0  # attempts to connect and take the lock
        self.reconnect_at = 0.0  # (monotonic) no new attempt before this, after one failed
        self._reconnect_backoff = 0.0

    # ------------------------------------------------------------ lifecycle

    async def start(self, now: float | None = None, take_over: bool = False) -> None:
        """Connect, take the shard lock (`take_over`: from whoever holds it, see ShardStore.connect),
        re-arm the timers of the open reservations due within the timer horizon (later ones are
        armed as the horizon moves on: see `_arm_next_window`)."""
        self.connects += 1
        try:
            await self.store.connect(take_over)
        except Superseded:
            self.superseded = True
            raise
        self.served = True
        self.reconnect_at, self._reconnect_backoff = 0.0, 0.0
        self.residents.clear()
        self.timers = TimerHeap(self.residents)
        self.armed_until = 0.0
        # (the first window after a stop holds every line overdue since: its read may be long)
        await self._arm_next_window(time.time() if now is None else now, START_READ_TIMEOUT)
        log.info("shard %s ready: timers armed for %d variants with open reservations due in %.0f s",
                 self.cfg.shard_id, len(self.timers), self.cfg.timer_horizon)

    async def _arm_next_window(self, now: float, timeout: float | None = None) -> None:
        """Arm the variants whose open lines fall due in [armed_until, now + horizon).

        Lines this shard commits are armed when committed, whatever their time; only lines it
        finds in Postgres (after a start) come through here. Loading them by window keeps a start
        from scanning every open line of every shard (5 s at 2,000,000 open lines, and growing)."""
        until = now + self.cfg.timer_horizon
        await self.store.load_due(self.armed_until, until, self.timers.arm, timeout)
        self.armed_until = until

    @property
    def epoch(self) -> int | None:
        """This copy's epoch (ShardStore.connect)."""
        return self.store.epoch

    async def ensure_started(self, now: float | None = None) -> None:
        """Connected, with the lock, and the timers of the next window armed. Reconnecting after
        a failure backs off (up to RECONNECT_MAX seconds), so a shard whose Postgres is down, or
        whose lock another incarnation holds, does not open a connection at every overdue timer's
        wakeup. Finding that a newer copy has started marks it `superseded` (its actor stops it)."""
        if not self.store.healthy:
            if time.monotonic() < self.reconnect_at:
                raise Reconnecting(f"shard {self.cfg.shard_id} is reconnecting to Postgres")
            try:
                await self.start(now)
            except BaseException:
                self._reconnect_backoff = min(max(self._reconnect_backoff * 2, 0.1), RECONNECT_MAX)
                self.reconnect_at = time.monotonic() + self._reconnect_backoff
                raise
        elif now is not None and now + self.cfg.timer_horizon / 2 >= self.armed_until:
            await self._arm_next_window(now)

    async def stop(self) -> None:
        await self.store.close()

    async def check(self) -> None:
        """The periodic check of an idle shard: is its session (and so its lock) still there?
        An orphan, whose session a new incarnation ended, learns it here (reconnecting, it finds
        a newer epoch) and is `superseded`."""
        if self.store.healthy:
            try:
                await self.store.ping(PING_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - gone (or stalled): reconnect at the next check or batch
                log.warning("shard %s lost its Postgres session: %s", self.cfg.shard_id, e or type(e).__name__)
                self.store.abandon()
        elif self.served:
            try:
                await self.ensure_started()
            except Exception as e:  # noqa: BLE001 - Postgres down or the lock taken: see `superseded`
                log.debug("shard %s check: %s", self.cfg.shard_id, e)

    # ------------------------------------------------------------ the batch

    async def process(self, commands: list[Command], now: float) -> list[Reply]:
        try:
            await self.ensure_started(now)
        except (ShardLockHeld, Reconnecting) as e:
            return [Rejected("unavailable", str(e))] * len(commands)
        except Exception as e:  # noqa: BLE001 - Postgres down: fail fast, retry on the next batch
            log.warning("shard %s cannot reach Postgres: %s", self.cfg.shard_id, e)
            await self.store.close()
            return [Rejected("unavailable", "database unavailable")] * len(commands)

        due = self.timers.pop_due(now)
        internal: list[Command] = [ExpireReservation(org, "", variant) for _, org, variant in due]
        replies: list[Reply] = []  # of the passes committed
        try:
            pending = internal + commands
            fired: Sequence[VariantKey] = [(org, variant) for _, org, variant in due]
            while pending:  # in one pass unless a reservation is asked for again after it closed here
                try:
                    part, done = await self._run(pending, now, fired)
                except ClosedReservationRetried:
                    # Rare: a ReserveStock retried after its reservation closed, which the first
                    # pass took for new. Nothing was written; the pass changed states in place.
                    log.info("shard %s: a closed reservation was asked for again; deciding the batch "
                             "again with what Postgres remembers of it", self.cfg.shard_id)
                    self.redecided += 1
                    self.forget_states()
                    part, done = await self._run(pending, now, fired, optimistic=False)
                replies += part
                pending, fired = pending[done:], ()
        except Exception as e:  # noqa: BLE001 - any failure: the rest is answered unavailable, memory dropped
            for entry in due:
                self.timers.arm(*entry)
            if isinstance(e, StaleVersion):
                log.error("shard %s lost ownership of its keys: %s", self.cfg.shard_id, e)
            else:
                log.warning("shard %s batch failed: %s", self.cfg.shard_id, e)
            # Whatever happened, memory may now disagree with Postgres: start clean.
            await self.store.close()
            self.forget_states()
            # A pass that committed before (the batch ran in several) keeps its answers: they
            # are what Postgres holds, and a retry of a movement without a key would apply twice.
            failed = Rejected("unavailable", "the change could not be committed; retry")
            replies += [failed] * (len(internal) + len(commands) - len(replies))
            return replies[len(internal):]
        self.batches += 1
        self.commands += len(commands)
        self._maybe_passivate(now)
        return replies[len(internal):]

    async def _run(self, commands: list[Command], now: float, fired: Sequence[VariantKey] = (),
                   optimistic: bool = True) -> tuple[list[Reply], int]:
        """Decide, commit and swap in a prefix of `commands`; returns its replies and its length.

        A ReserveStock whose reservation has no line open in memory is new, or a retry of one
        that closed (its prior: `decide` refuses it, or replays a shipped one). Looking the
        priors up first was a read before every batch of reservations, and a retry of a closed
        one is rare. So the first pass (`optimistic`) takes them all for new, and the commit
        checks that Postgres knows none of them closed, or raises ClosedReservationRetried
        without writing anything; `process` then runs the batch again with the priors loaded.

        The prefix ends before a ReserveStock of a reservation that an earlier command of it
        released, expired, shipped or aborted: what Postgres remembers of a closed reservation
        must include that close, as it would had the retry come in a later batch. The rest is
        then run again after this commit."""
        await self._activate(commands, now)
        unseen = self._unseen(commands)
        priors = {} if optimistic else await self.store.load_priors(unseen)
        stored = await self._stored_replies(commands)

        working: dict[StockKey, StockState] = {}
        before: dict[StockKey, int | None] = {}  # version committed before this batch
        created: dict[VariantKey, list[StockKey]] = {}
        events: list[tuple[StockKey, Event]] = []
        replies: list[Reply] = []
        reply_rows: list[tuple[str, str, bytes]] = []
        closed_here: set[tuple[str, str]] = set()  # (organization, reservation) closed by this prefix
        made: dict[tuple[str, str], str] = {}  # (organization, reservation) reserved or replayed here -> items hash
        done = len(commands)
        for i, cmd in enumerate(commands):
            if isinstance(cmd, ReserveStock) and (cmd.organization_id, cmd.reservation_id) in closed_here:
                done = i
                break
            if isinstance(cmd, SetWarehouseActive):
                replies.append(self._set_warehouse_active(cmd))
                continue
            if isinstance(cmd, ReserveStock):
                held = made.get((cmd.organization_id, cmd.reservation_id))
                if held is not None and held != cmd.items_hash:  # (Postgres cannot tell: not committed yet)
                    replies.append(Rejected("conflict", f"order already has reservation {cmd.reservation_id} "
                                                        "with other items"))
                    continue
            elif isinstance(cmd, AbortReservation) and self._refused_abort(cmd, now):
                replies.append(DoneResult(changed=False))
                continue
            ikey = idempotency_key(cmd)
            if ikey and (cmd.organization_id, ikey) in stored:
                replies.append(_replayed(cmd, ikey, stored[(cmd.organization_id, ikey)]))
                continue
            view = self._view(cmd, working, created)
            prior = (priors.get((cmd.organization_id, cmd.reservation_id, cmd.items_hash))
                     if isinstance(cmd, ReserveStock) else None)
            decision = decide(view, cmd, now, prior)
            for key, event in decision.events:
                if isinstance(event, NOTIFICATIONS):
                    continue  # no state to change: they only become outbox rows
                state = working.get(key)
                if state is None:
                    # Changed in place, not copied: copying a hot stock's open lines per batch grew
                    # with them (a batch of 24 took 11.5 ms at 204,800 lines, 1.8 ms without the
                    # copy). A failed commit drops every state
                    # (see `process`), so memory never keeps an uncommitted change.
                    committed = self._committed(key)
                    before[key] = committed.version if committed is not None else None
                    state = committed if committed is not None else StockState(*key)
                    working[key] = state
                    if committed is None:
                        created.setdefault((key[0], key[1]), []).append(key)
                apply(state, event)
                if isinstance(event, _CLOSING):
                    closed_here.add((key[0], event.reservation_id))
            events.extend(decision.events)
            replies.append(decision.reply)
            if isinstance(decision.reply, ReservationResult):
                made[(cmd.organization_id, cmd.reservation_id)] = cmd.items_hash  # type: ignore[union-attr]
                if decision.reply.replayed:
                    self._forget_replays(now)
                    self.replays.pop((cmd.organization_id, cmd.reservation_id), None)
                    self.replays[(cmd.organization_id, cmd.reservation_id)] = now
            if ikey and not isinstance(decision.reply, Rejected):
                stored[(cmd.organization_id, ikey)] = decision.reply
                reply_rows.append((cmd.organization_id, ikey, _reply_codec.encode(decision.reply)))

        write: BatchWrite = build_write(now, events, before, working, reply_rows)
        if optimistic and unseen:
            if write:
                write.unseen = unseen
            elif await self.store.load_priors(unseen):  # nothing to commit that could check them
                raise ClosedReservationRetried("a reservation taken for new is closed")
        if write:
            started = time.perf_counter()
            await self.store.commit(write)
            self.commits += 1
            self.commit_seconds += time.perf_counter() - started
        self._swap_in(working, created, fired)
        return replies, done

    def _refused_abort(self, cmd: AbortReservation, now: float) -> bool:
        """An abort undoes the part a ReserveStock call made when another shard's part of that
        call failed (`gateway.flows.reserve`). If a call for the same order was answered with
        these lines as a replay since, that call reported the reservation made: the abort of
        the first call must not take its lines away (they stay, until their TTL at worst).
        Remembered in memory for REPLAY_MEMORY seconds, far longer than any call's deadline."""
        self._forget_replays(now)
        return (cmd.organization_id, cmd.reservation_id) in self.replays

    def _forget_replays(self, now: float) -> None:
        """Drop the marks older than REPLAY_MEMORY (the oldest come first: a mark is moved to the
        end when set again)."""
        while self.replays:
            key, when = next(iter(self.replays.items()))
            if now - when <= REPLAY_MEMORY:
                break
            del self.replays[key]

    def _view(self, cmd: Command, working: dict[StockKey, StockState],
              created: dict[VariantKey, list[StockKey]]) -> dict[StockKey, StockState]:
        org = cmd.organization_id
        view: dict[StockKey, StockState] = {}
        for variant in variants_of(cmd):
            for state in states_of(self.residents.get((org, variant))):
                key = (org, variant, state.warehouse_id)
                view[key] = working.get(key, state)
            for key in created.get((org, variant), ()):
                view[key] = working[key]
        return view

    def _committed(self, key: StockKey) -> StockState | None:
        for state in states_of(self.residents.get((key[0], key[1]))):
            if state.warehouse_id == key[2]:
                return state
        return None

    def _swap_in(self, working: dict[StockKey, StockState], created: dict[VariantKey, list[StockKey]],
                 fired: Sequence[VariantKey]) -> None:
        """Keep the created stocks; re-arm the timer of every variant changed or whose timer fired."""
        for vk, keys in created.items():
            resident = resident_of(self.residents, *vk)
            for key in keys:
                _with_state(resident, working[key])
        variants = dict.fromkeys(fired)
        for key in working:
            variants[(key[0], key[1])] = None
        for vk in variants:
            earliest = math.inf
            for state in states_of(self.residents.get(vk)):
                if state.next_expiry != math.inf:
                    recompute_next_expiry(state)  # a scan of a few lines, or pops off the stock's heap
                    earliest = min(earliest, state.next_expiry)
                    org, variant = state.organization_id, state.variant_id  # the states' (interned) strings
            if earliest != math.inf:
                self.timers.arm(earliest, org, variant)

    async def _activate(self, commands: list[Command], now: float) -> None:
        need: dict[VariantKey, Resident] = {}
        for cmd in commands:
            for variant in variants_of(cmd):
                resident = resident_of(self.residents, cmd.organization_id, variant)
                if resident.states is None:
                    need[(cmd.organization_id, variant)] = resident
                resident.last_used = now
        if not need:
            return
        loaded = await self.store.load_variants(list(need))
        for resident in need.values():
            resident.states = ()
        for state in loaded:
            # No timers armed here: `start` armed every variant with open lines (load_due), and
            # variants changed since were armed when committed.
            _with_state(need[(state.organization_id, state.variant_id)], state)
        self._loaded_since_freeze += len(loaded)
        if self._loaded_since_freeze > 20_000:
            gc.collect()
            gc.freeze()  # long-lived entities: keep them out of every future collection
            self._loaded_since_freeze = 0

    def _unseen(self, commands: list[Command]) -> list[Unseen]:
        """Each ReserveStock with no line open in memory, as (organization, reservation, items
        hash, variant) for each of its variants: what the commit checks (`store._SEEN_BEFORE`)."""
        wanted: list[Unseen] = []
        for cmd in commands:
            if not isinstance(cmd, ReserveStock):
                continue
            variants = variants_of(cmd)
            open_here = any(
                get_line(state, cmd.reservation_id) is not None
                for variant in variants
                for state in states_of(self.residents.get((cmd.organization_id, variant)))
            )
            if not open_here:
                wanted += [(cmd.organization_id, cmd.reservation_id, cmd.items_hash, v) for v in variants]
        return wanted

    async def _stored_replies(self, commands: list[Command]) -> dict[tuple[str, str], Reply]:
        keys = [(cmd.organization_id, k) for cmd in commands if (k := idempotency_key(cmd))]
        raw = await self.store.load_replies(keys)
        return {k: _reply_codec.decode(v, type=Reply) for k, v in raw.items()}  # type: ignore[arg-type]

    def _set_warehouse_active(self, cmd: SetWarehouseActive) -> Reply:
        key = (cmd.organization_id, cmd.warehouse_id)
        if cmd.as_of and cmd.as_of < self.warehouse_as_of.get(key, 0.0):
            return DoneResult(changed=False)  # older than the state this shard has: it arrived late
        if cmd.as_of:
            self.warehouse_as_of[key] = cmd.as_of
        changed = False
        for (org, _), resident in self.residents.items():
            if org != cmd.organization_id:
                continue
            for state in states_of(resident):
                if state.warehouse_id == cmd.warehouse_id and state.warehouse_active != cmd.active:
                    state.warehouse_active = cmd.active
                    changed = True
        return DoneResult(changed=changed)

    def _maybe_passivate(self, now: float) -> None:
        """Drop variants idle for `passivate_after` whose lines have no TTL pending."""
        if now < self._next_passivation:
            return
        self._next_passivation = now + max(self.cfg.passivate_after / 10, 1.0)
        cutoff = now - self.cfg.passivate_after
        for vk in [vk for vk, r in self.residents.items() if r.last_used < cutoff and r.states is not None]:
            resident = self.residents[vk]
            if any(not ln.confirmed for s in states_of(resident) for ln in open_lines(s)):
                continue
            self.timers.disarm(vk)
            del self.residents[vk]

    def forget_states(self) -> None:
        """Drop every stock from memory (they are loaded again from Postgres when next named);
        the armed timers stay."""
        for vk in list(self.residents):
            resident = self.residents[vk]
            if resident.armed == math.inf:
                del self.residents[vk]
            else:
                resident.states = None

    def status(self) -> ShardStatus:
        return ShardStatus(
            shard_id=self.cfg.shard_id, ready=self.store.healthy,
            resident_stocks=sum(len(states_of(r)) for r in self.residents.values()),
            pending_timers=len(self.timers), batches=self.batches, commands=self.commands,
            commits=self.commits, commit_seconds=self.commit_seconds, redecided_batches=self.redecided,
        )


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # an optional speed-up; the stdlib loop is correct too
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


_MERGE = "merge"  # the payload of the wakeup that ends a merge window
_CHECK = "check"  # the payload of the periodic check of the shard's session (CHECK_EVERY)
# Seconds a new incarnation waits for its shard's lock before it ends the holder's Postgres
# session: an old incarnation that stops releases it at once, one that died with its node loses
# it with its connection; one still holding it after this is an orphan (a leader restarted and
# placed every shard anew, the old ones on the members never told) or stuck.
TAKE_OVER_AFTER = 10.0
RECONNECT_MAX = 2.0  # seconds between attempts to reconnect at most
CHECK_EVERY = 5.0  # seconds between an idle shard's checks of its Postgres session (ShardCore.check)
PING_TIMEOUT = 2.0  # below the registrar's DEAD_AFTER: a check never makes a live shard look dead
REPLAY_MEMORY = 600.0  # seconds a replay refuses the aborts of its reservation (see ShardCore._refused_abort)
_SEVERAL_FOR = 1.0  # seconds a gateway counts as sending work after its last non-empty batch


class StockShard(ActorTypeDispatcher):
    """The Thespian actor around a `ShardCore`; one wakeup pending at most, for the earliest timer.

    Merging. Each gateway batches on its own and keeps one batch in flight per shard, so with
    several gateway processes a shard receives several small batches per cycle and committed
    each alone (at 64 calls in flight, four gateways made 8 calls per commit where one made 21:
    the README's scale-out figures). While two or more gateways have sent work within the last
    second, a batch that arrives waits up to `merge_window` for the batches the others send
    meanwhile, and all of them are decided and committed as one (`_flush`); each gateway gets
    its own replies, only after the commit. With a single gateway a batch is processed at once.
    """

    @staticmethod
    def actorSystemCapabilityCheck(capabilities: dict[str, Any], requirements: dict[str, Any] | None) -> bool:
        """Placement by node: `targetActorRequirements={"inventory-node": NAME}` (none: anywhere)."""
        wanted = (requirements or {}).get("inventory-node")
        return wanted is None or capabilities.get("inventory-node") == wanted

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        use_poll_selector()  # (already so when forked from a node process: see actors/transport.py)
        self.core: ShardCore | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.armed_at = 0.0
        self.waiting: list[tuple[int, Any, list[Command]]] = []  # (batch id, sender, commands)
        self.waiting_since = 0.0
        self.senders: dict[str, float] = {}  # gateway address -> when it last sent a non-empty batch
        self.merged_batches = 0
        self.listener: Listener | None = None  # the batch path's socket (actors/datapath.py)
        self.lock_wait_since: float | None = None  # since when ShardConfigure finds the lock held
        self.checking = 0.0  # (monotonic) when the pending _CHECK wakeup is due; 0: none
        self.exiting = False

    def receiveMessage(self, message: Any, sender: Any) -> Any:
        """Every message is dispatched as usual; afterwards (also after a failure) Thespian
        watches the batch path's sockets."""
        try:
            super().receiveMessage(message, sender)
        finally:
            watch = ThespianWatch(self.listener.fds()) if self.listener is not None else None
        return watch

    def _listen(self) -> None:
        if self.listener is not None:
            return
        try:
            own = self.myAddress.addressDetails.sockname[0]
        except AttributeError:  # not a TCP base (unit tests): batches come through Thespian only
            return
        host = os.environ.get("INVENTORY_BATCH_HOST", "").strip() or own
        try:
            self.listener = Listener(host, advertise=own if host in WILDCARDS else host)
        except (OSError, ValueError) as e:  # gateways keep sending through Thespian
            log.error("shard cannot listen for batches on %s: %s", host, e)

    def _status(self) -> ShardStatus:
        status = self.core.status() if self.core else ShardStatus(-1, False, "not configured")
        return dataclasses.replace(status, merged_batches=self.merged_batches,
                                   data_address=self.listener.address if self.listener else "")

    def receiveMsg_ShardConfigure(self, msg: ShardConfigure, sender: Any) -> None:
        if self.exiting:
            return  # (it stops: its registrar places the shard anew)
        gc.set_threshold(50_000, 50, 100)
        if self.loop is None:
            # uvloop: asyncpg's socket I/O on the stdlib loop was a fifth of this process's CPU
            self.loop = _new_event_loop()
        previous = self.core
        if previous is not None:
            self.loop.run_until_complete(previous.stop())
        self.core = ShardCore(msg)
        if previous is not None and not previous.superseded:
            # configured again (it reported not ready): the same copy, with its epoch, so a stale
            # holder of the lock (its own old session, kept by Postgres) is ended at once
            self.core.store.epoch, self.core.store.token = previous.store.epoch, previous.store.token
        now = time.monotonic()
        take_over = self.lock_wait_since is not None and now - self.lock_wait_since >= TAKE_OVER_AFTER
        try:
            self.loop.run_until_complete(self.core.start(take_over=take_over))
            self.lock_wait_since = None
            self._listen()
            self.send(sender, self._status())
            self._keep_checking()
        except Exception as e:  # noqa: BLE001 - reported to the registrar, which retries
            if self.lock_wait_since is None:  # (a start ended by another copy counts as waiting too)
                self.lock_wait_since = now
            log.error("shard %s failed to start: %s", msg.shard_id, e)
            self.send(sender, ShardStatus(msg.shard_id, False, f"{type(e).__name__}: {e}"))
            self._stop_if_superseded()
        self._arm()

    def receiveMsg_ShardBatch(self, msg: ShardBatch, sender: Any) -> None:
        self._batch(msg.batch_id, decode_batch(msg.payload), sender)

    def receiveMsg_WatchMessage(self, msg: WatchMessage, sender: Any) -> None:
        """Batches from the batch path's sockets; a peer that sends anything else is dropped."""
        if self.listener is None:
            return
        shard_id = self.core.cfg.shard_id if self.core is not None else None
        for peer, fields in self.listener.ready(msg.ready):
            if peer.closed:
                continue  # it sent something else before: its gateway fails this batch too
            try:
                batch_id, payload, to_shard = fields
                if not isinstance(batch_id, int) or to_shard != shard_id:
                    raise ValueError(f"batch for shard {to_shard!r}, this is shard {shard_id}")
                commands = decode_batch(payload)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - its gateway fails its batches in flight and reconnects
                log.warning("dropping the connection %s: not a batch for this shard (%s)", peer.name, e)
                peer.close()
                continue
            self._batch(batch_id, commands, peer)

    def _batch(self, batch_id: int, commands: list[Command], sender: Any) -> None:
        now = time.monotonic()
        if commands:
            self.senders[sender.name if isinstance(sender, Peer) else str(sender)] = now
        window = self.core.cfg.merge_window if self.core is not None else 0.0
        if not self.waiting and (window <= 0 or not self._several_senders(now)):
            self._flush([(batch_id, sender, commands)])
            return
        self.waiting.append((batch_id, sender, commands))
        if len(self.waiting) == 1:
            self.waiting_since = now
            # (never under a millisecond: Thespian's TCP base can drop such a wakeup, see `_arm`)
            self.wakeupAfter(timedelta(seconds=max(window, 0.001)), payload=_MERGE)
        elif now - self.waiting_since > 10 * window:
            self._flush_waiting()  # the window's wakeup is late (or was lost): do not wait on it

    def _several_senders(self, now: float) -> bool:
        recent = [k for k, t in self.senders.items() if now - t <= _SEVERAL_FOR]
        if len(recent) < len(self.senders):
            self.senders = {k: self.senders[k] for k in recent}
        return len(recent) >= 2

    def _flush_waiting(self) -> None:
        items, self.waiting = self.waiting, []
        if items:
            self._flush(items)

    def _flush(self, items: list[tuple[int, Any, list[Command]]]) -> None:
        """Decide and commit the commands of these batches as one batch; answer each sender its part."""
        # A gateway that closed its connection has failed that batch's callers ("retry"): a
        # commit now would apply their commands twice.
        items = [item for item in items if not (isinstance(item[1], Peer) and item[1].closed)]
        commands = [cmd for _, _, cmds in items for cmd in cmds]
        with_work = sum(1 for _, _, cmds in items if cmds)  # (idle gateways' empty ticks do not count)
        if with_work > 1:
            self.merged_batches += with_work
        try:
            if self.core is None or self.loop is None or self.exiting:
                replies: list[Reply] = [Rejected("unavailable", "shard not configured")] * len(commands)
            else:
                replies = self.loop.run_until_complete(self.core.process(commands, time.time()))
        except Exception:
            log.exception("shard batch failed")
            replies = [Rejected("unavailable", "the shard failed on this batch; retry")] * len(commands)
        shard_id = self.core.cfg.shard_id if self.core else -1
        start = 0
        for batch_id, sender, cmds in items:
            part = replies[start:start + len(cmds)]
            start += len(cmds)
            try:  # one batch's failure to encode or send must not leave the others unanswered
                if isinstance(sender, Peer):  # (a lost connection: its gateway already failed the batch)
                    sender.send(frame(batch_id, encode_replies(part), shard_id))
                else:
                    self.send(sender, ShardBatchResult(batch_id, encode_replies(part), shard_id))
            except Exception:  # that gateway times the batch out; its callers retry
                log.exception("shard %s could not answer batch %d", shard_id, batch_id)
        self._stop_if_superseded()
        self._arm()

    def _stop_if_superseded(self) -> None:
        """A newer copy of this shard has started since this one (its epoch moved on): this one
        was placed anew (a registrar that thought it dead, or a leader restarted whose new
        registrar never knew it). It can commit nothing again, and would stay until its node
        stops: it stops. (A registrar places a new copy only where its slot no longer points here.)"""
        if self.exiting or self.core is None or not self.core.superseded:
            return
        self.exiting = True
        log.warning("shard %s: a newer copy has started; this one stops", self.core.cfg.shard_id)
        self.send(self.myAddress, ActorExitRequest())

    def _flush_if_lost(self) -> None:
        """Flush the waiting batches if their merge window's wakeup was lost (Thespian TCP stall)."""
        if self.waiting and time.monotonic() - self.waiting_since > 0.5:
            self._flush_waiting()

    def receiveMsg_ShardStatusRequest(self, msg: ShardStatusRequest, sender: Any) -> None:
        self._flush_if_lost()
        self.send(sender, self._status())
        self._keep_checking()

    def _keep_checking(self) -> None:
        """One _CHECK wakeup pending while the shard has served; armed again if it was lost."""
        if self.exiting or self.core is None or not self.core.served:
            return
        now = time.monotonic()
        if not self.checking or now > self.checking + CHECK_EVERY:
            self.checking = now + CHECK_EVERY
            self.wakeupAfter(timedelta(seconds=CHECK_EVERY), payload=_CHECK)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        if msg.payload == _MERGE:
            self._flush_waiting()
            return
        if msg.payload == _CHECK:
            self.checking = 0.0
            if self.core is not None and self.loop is not None and not self.exiting:
                self.loop.run_until_complete(self.core.check())
                self._stop_if_superseded()
                self._keep_checking()
            return
        self._flush_if_lost()
        now = time.time()
        if now >= self.armed_at - 0.001:
            self.armed_at = 0.0
        if self.core is not None and self.loop is not None and not self.exiting:
            self.loop.run_until_complete(self.core.process([], now))
        self._stop_if_superseded()
        self._arm()

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self._flush_waiting()  # answered, not dropped
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.core is not None and self.loop is not None:
            self.loop.run_until_complete(self.core.stop())
            self.loop.close()
            self.loop = None

    def _arm(self) -> None:
        """Keep one wakeup pending for the earliest timer; re-arm only when it moves earlier.
        While the shard waits to reconnect, not before it may try again (ShardCore.reconnect_at)."""
        if self.core is None or self.exiting:
            return
        earliest = self.core.timers.earliest()
        if earliest is None:
            return
        now = time.time()
        if self.core.reconnect_at and not self.core.store.healthy:
            earliest = max(earliest, now + (self.core.reconnect_at - time.monotonic()))
        if self.armed_at and self.armed_at < now - 0.5:
            self.armed_at = 0.0  # that wakeup was lost (Thespian TCP stall): arm afresh
        granularity = self.core.cfg.timer_granularity
        target = max(earliest, now + granularity)
        if self.armed_at and self.armed_at <= target + granularity:
            return
        self.armed_at = target
        # Never a sub-millisecond delay: Thespian's TCP base can drop it from select().
        self.wakeupAfter(timedelta(seconds=max(target - now, granularity)))
