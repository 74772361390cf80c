"""ActorBridge: from asyncio coroutines to shard actors, batching per shard.

Thespian's `ask` blocks, and threads sharing one `ActorSystem()` receive each other's
replies. So one dedicated thread owns a private Thespian context; coroutines hand it
`(shard, command, future)` through a queue. The thread keeps at most `max_inflight`
batches outstanding per shard and queues everything that arrives meanwhile into the
next batch: group commit that adapts to load (one message costs about as much as a
batch of a hundred). Replies are matched by batch id and resolved on the event loop
with one `call_soon_threadsafe` per batch.

A batch that gets no reply within `reply_timeout` (a shard process died) fails its
callers with `unavailable`; the shard's ownership fencing makes a late commit harmless
to correctness, and the callers may retry.

Where a shard listens for batches on a socket (actors/datapath.py, its address in the
ShardMap), they do not go through this thread at all: a `Lane` per shard batches on the
event loop and talks to the socket directly (gateway/lanes.py). The thread then carries
only the ticks, the registrar's map, and the batches of shards that cannot be reached by
socket (no address yet, a connect that failed, or INVENTORY_BATCH_SOCKET=false).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from thespian.actors import WatchMessage
from thespian.system import isInternalActorSystemMessage
from thespian.system.transport import ReceiveEnvelope

from actors.envelopes import ShardBatch, ShardBatchResult, ShardMap, ShardMapRequest
from actors.messages import (
    AbortReservation,
    Command,
    ConfirmReservation,
    ReadStock,
    ReceiveTransfer,
    Rejected,
    ReleaseReservation,
    Reply,
    ReserveStock,
    SetWarehouseActive,
    ShipTransfer,
    encode_batch,
)
from gateway.lanes import MOVED, Lane, answer, fail

log = logging.getLogger("inventory.bridge")

_Item = tuple[Command, "asyncio.Future[Reply]"]
_Inflight = tuple[int, list[_Item], float, Any]  # shard, callers, sent at, transmit tracker
_WOKEN = object()
_MAX_SLEEP = 0.1  # the longest sleep in the transport: reply timeouts are checked this often


class _Link:
    """The bridge thread's end of Thespian, without the polling.

    `ActorSystem.tell` runs the transport until the receiver acknowledges and `listen`
    cannot be woken from another thread, so a bridge built on them must poll (and
    polling a Thespian transport builds a selector per pass: it cost more CPU than the
    gRPC server). This link schedules transmits without waiting (the transport sends
    them while it waits for replies) and watches a pipe that `ActorBridge.call` writes to
    when new work arrives for a shard with room. Built on the transport's own hooks
    (`_tx_to_actor`, `_run_transport`, `set_watch`) of thespian 4.0.1, pinned in
    pyproject.toml; every end-to-end and fault test runs through it against real shards.
    """

    def __init__(self, ctx: Any) -> None:
        self.base = ctx._systemBase
        self.wake_read, self.wake_fd = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_fd, False)
        self.base.transport.set_watch([self.wake_read])

    def send(self, address: object, message: object) -> Any:
        """Queue `message` for `address`; the returned tracker's `failed` turns true on a failed send."""
        return self.base._tx_to_actor(address, message)

    def receive(self, timeout: float) -> object | None:
        """The next message for this endpoint, `_WOKEN`, or None when `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            envelope = self.base._run_transport(timedelta(seconds=max(0.0, deadline - time.monotonic())))
            if not isinstance(envelope, ReceiveEnvelope):
                return None  # timed out, or a failed transmit aborted the run
            message = envelope.message
            if isinstance(message, WatchMessage):
                try:
                    while os.read(self.wake_read, 512):
                        pass
                except BlockingIOError:
                    pass
                return _WOKEN
            if not isInternalActorSystemMessage(message):
                return message  # type: ignore[no-any-return]
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        self.base.transport.set_watch([])
        os.close(self.wake_read)
        os.close(self.wake_fd)


@dataclass
class BridgeStats:
    batches: int = 0
    commands: int = 0
    max_batch: int = 0
    timeouts: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))


class ShardUnavailable(Exception):
    pass


MOVED_RETRIES = 2  # times a call follows its shard to a new place
# Not ShipReservation: shipped by the old incarnation, it is answered `closed` the second time.
_SAFE_AGAIN = (ReserveStock, ReleaseReservation, ConfirmReservation, AbortReservation, ReadStock,
               SetWarehouseActive, ShipTransfer, ReceiveTransfer)  # (transfers: once per transfer id)


def retry_safe(command: Command) -> bool:
    """May `command` be sent again though it may have been applied? Reservations are idempotent
    per order (a repeat is a replay), releases, confirms, aborts and reads change nothing the
    second time, and a movement with an idempotency key is applied once. A movement without one
    is not, and a shipment would be answered `closed`."""
    return isinstance(command, _SAFE_AGAIN) or bool(getattr(command, "idempotency_key", ""))


class ActorBridge:
    """Owns the thread that talks to the shards. Start it from the event loop that will await it."""

    def __init__(
        self,
        context_factory: Callable[[], Any],
        addresses: Sequence[object],
        *,
        max_inflight: int = 1,
        max_batch: int = 512,
        reply_timeout: float = 30.0,
        tick_interval: float = 1.0,
        registrar: object | None = None,
        map_interval: float = 1.0,
        data_addresses: Sequence[str] = (),
        data_path: bool = True,
    ) -> None:
        self._context_factory = context_factory
        self.addresses = list(addresses)
        self.shard_count = len(self.addresses)
        # The batch path (actors/datapath.py): a lane per shard on the event loop, used where
        # the shard has an address and `data_path` is on; this thread's Thespian messages otherwise.
        self.data_addresses = list(data_addresses) or [""] * self.shard_count
        self.lanes = [
            Lane(shard, (lambda s=shard: self.data_addresses[s]), max_inflight=max_inflight,  # type: ignore[misc]
                 max_batch=max_batch, reply_timeout=reply_timeout, on_batch=self._count_batch,
                 on_trouble=self._lane_trouble)
            for shard in range(self.shard_count)
        ] if data_path else []
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        self.reply_timeout = reply_timeout
        self.tick_interval = tick_interval
        # With a registrar (a cluster), the map is re-fetched every `map_interval` and after a
        # timeout or a poison message: shards move between nodes. Sent with tell, answered in
        # the listen loop (an ask here would swallow batch replies).
        self.registrar = registrar
        self.map_interval = map_interval
        self.map_updates = 0
        self.map_answered_at = time.monotonic()  # when the registrar last answered (see app.watch_registrar)
        self._next_map = 0.0
        self._map_asked = 0.0  # when the unanswered map request left (0: none outstanding)
        self.stats = BridgeStats()
        self.moved_retries = 0  # calls sent again because their shard moved
        self._queue: queue.SimpleQueue[tuple[int, Command, asyncio.Future[Reply]] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Wake-up protocol with the thread (see `call`): all three are written by one side and
        # read by the other; the GIL makes each read and write atomic.
        self._busy: list[int] = [0] * self.shard_count
        self._sleeping = False
        self._wake_sent = False
        self._wake_fd = -1

    # ------------------------------------------------------------ asyncio side

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="actor-bridge", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    async def call(self, shard: int, command: Command) -> Reply:
        """The shard's answer to `command`. A command whose batch failed because its shard moved
        (a new address in the map) is sent again, to the new place, if a repetition of it is
        harmless: it may have been committed by the old incarnation before it went."""
        reply = await self._call(shard, command)
        for _ in range(MOVED_RETRIES):
            if not (isinstance(reply, Rejected) and reply.code == "unavailable" and reply.message.endswith(MOVED)
                    and retry_safe(command)):
                break
            self.moved_retries += 1
            reply = await self._call(shard, command)
        return reply

    async def _call(self, shard: int, command: Command) -> Reply:
        assert self._loop is not None, "bridge not started"
        if self._stopping.is_set():
            return Rejected("unavailable", "the service is shutting down")
        if self.lanes:
            lane = self.lanes[shard]
            if lane.peer is None:
                connected = await lane.ready()
                if self._stopping.is_set():  # (stopped while this call waited for the connection)
                    return Rejected("unavailable", "the service is shutting down")
                if not connected:
                    return await self._through_thread(shard, command)
            return await lane.call(command)
        return await self._through_thread(shard, command)

    async def _through_thread(self, shard: int, command: Command) -> Reply:
        assert self._loop is not None
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._queue.put((shard, command, fut))
        # The thread sleeps in the transport while batches are in flight. Wake it only if this
        # command can leave now (its shard has room); otherwise the next reply wakes it anyway.
        # It sets `_sleeping` before its last look at the queue, so no wake-up is lost.
        if self._sleeping and not self._wake_sent and self._busy[shard] < self.max_inflight:
            self._wake_sent = True
            try:
                os.write(self._wake_fd, b"!")
            except (BlockingIOError, OSError):
                pass  # a full pipe already wakes it; a closed one means it has stopped
        return await fut

    async def call_many(self, calls: Sequence[tuple[int, Command]]) -> list[Reply]:
        if len(calls) == 1:  # the common case: no task per call
            return [await self.call(*calls[0])]
        return list(await asyncio.gather(*(self.call(s, c) for s, c in calls)))

    async def stop(self) -> None:
        """Let in-flight batches finish (bounded), then stop the lanes and the thread."""
        self._stopping.set()
        deadline = time.monotonic() + self.reply_timeout + 5
        while any(lane.busy for lane in self.lanes) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for lane in self.lanes:
            lane.close()
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.reply_timeout + 5)

    # ------------------------------------------------------------ thread side

    def _run(self) -> None:
        try:
            ctx_manager = self._context_factory()
            ctx = ctx_manager.__enter__()
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._serve(ctx)
        except Exception:
            log.exception("actor bridge crashed")
        finally:
            ctx_manager.__exit__(None, None, None)

    def _serve(self, ctx: Any) -> None:
        link = _Link(ctx)
        self._wake_fd = link.wake_fd
        try:
            self._pump(link)
        finally:
            self._wake_fd = -1
            link.close()

    def _pump(self, link: _Link) -> None:
        pending: dict[int, list[_Item]] = defaultdict(list)
        inflight: dict[int, _Inflight] = {}
        busy = self._busy = [0] * self.shard_count
        ids = itertools.count(1)
        next_tick = time.monotonic() + self.tick_interval
        self._next_map = time.monotonic() + self.map_interval
        self._map_asked = 0.0
        draining = False
        wait = 0.0

        while True:
            # 1. take what has arrived (blocking only when there is nothing at all to do)
            draining = self._take(pending, wait) or draining

            # 2. a cheap periodic tick lets idle shards fire overdue timers
            now = time.monotonic()
            if self.registrar is not None and now >= self._next_map and not draining:
                self._next_map = now + self.map_interval
                if not self._map_asked or now - self._map_asked > 5.0:
                    link.send(self.registrar, ShardMapRequest())
                    self._map_asked = now
            if now >= next_tick and not draining:
                next_tick = now + self.tick_interval
                for shard in range(self.shard_count):
                    if self.addresses[shard] is None:
                        continue
                    if busy[shard] == 0 and shard not in pending:
                        batch_id = next(ids)
                        sent = link.send(self.addresses[shard], ShardBatch(batch_id, encode_batch([])))
                        inflight[batch_id] = (shard, [], now, sent)
                        busy[shard] += 1

            # 3. send one batch per shard with room
            for shard in list(pending):
                if busy[shard] >= self.max_inflight:
                    continue
                items = pending[shard]
                batch, rest = items[: self.max_batch], items[self.max_batch:]
                if rest:
                    pending[shard] = rest
                else:
                    del pending[shard]
                if self.addresses[shard] is None:  # being moved or recreated: retry later
                    self._fail(batch, f"shard {shard} is moving; retry")
                    continue
                batch_id = next(ids)
                payload = encode_batch([cmd for cmd, _ in batch])
                sent = link.send(self.addresses[shard], ShardBatch(batch_id, payload))
                inflight[batch_id] = (shard, batch, now, sent)
                busy[shard] += 1
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._count_batch, len(batch))

            if draining and not inflight and not pending:
                return

            # 4. wait for a reply, a wake-up from `call`, or the next deadline. Sleeping in
            # the transport (not polling it) is what keeps this thread off the GIL.
            if not inflight and not self._map_asked:
                # nothing to receive: block on the queue itself until work or the next tick
                wake = min(next_tick, self._next_map) if self.registrar is not None else next_tick
                wait = 0.0 if pending else max(0.001, wake - time.monotonic())
                continue
            wait = 0.0
            self._sleeping = True  # before the last look at the queue: see `call`
            draining = self._take(pending, 0.0) or draining
            if any(busy[shard] < self.max_inflight for shard in pending):
                self._sleeping = False
                continue
            msg = link.receive(min(_MAX_SLEEP, max(0.0, next_tick - time.monotonic())))
            self._sleeping = False
            if msg is _WOKEN:
                self._wake_sent = False
            elif isinstance(msg, ShardBatchResult):
                entry = inflight.pop(msg.batch_id, None)
                if entry is not None:
                    busy[entry[0]] -= 1
                    if entry[1]:
                        self._resolve(entry[0], entry[1], msg.payload)
            elif isinstance(msg, ShardMap):
                self._map_asked = 0.0
                self.map_answered_at = time.monotonic()
                self._on_map(msg, inflight, busy)
            elif msg is not None:
                self._on_other(msg, inflight, busy)
            self._expire(inflight, busy)

    def use_registrar(self, registrar: object) -> None:
        """A registrar found anew (the actor system was restarted): ask it for the map at once."""
        if registrar != self.registrar:
            log.warning("registrar moved: asking the new one for the shard map")
            self.registrar = registrar
            self.map_answered_at = time.monotonic()
            self._map_asked = 0.0
            self._next_map = 0.0

    def _take(self, pending: dict[int, list[_Item]], wait: float) -> bool:
        """Move queued calls into `pending` (waiting up to `wait` for the first); True if asked to stop."""
        draining = False
        try:
            item = self._queue.get(timeout=wait) if wait else self._queue.get_nowait()
            while True:
                if item is None:
                    draining = True
                else:
                    pending[item[0]].append((item[1], item[2]))
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        return draining

    def _on_map(self, msg: ShardMap, inflight: dict[int, _Inflight], busy: list[int]) -> None:
        """A shard that moved: its batches in flight to the old address fail `unavailable`."""
        if msg.shard_count != self.shard_count:
            log.error("shard map with %d shards ignored (this gateway routes over %d)",
                      msg.shard_count, self.shard_count)
            return
        for shard, data in enumerate((msg.data_addresses or ("",) * self.shard_count)[:self.shard_count]):
            if data != self.data_addresses[shard]:
                self.data_addresses[shard] = data
                if self.lanes and self._loop is not None:  # its connection leads to the old place
                    self._loop.call_soon_threadsafe(self.lanes[shard].moved, data)
        for shard, address in enumerate(msg.addresses):
            if address == self.addresses[shard]:
                continue
            log.warning("shard %d moved", shard)
            self.addresses[shard] = address
            self.map_updates += 1
            for batch_id, entry in list(inflight.items()):
                if entry[0] == shard:
                    self._drop(inflight, busy, batch_id, f"shard {shard} {MOVED}")

    def _on_other(self, msg: Any, inflight: dict[int, _Inflight], busy: list[int]) -> None:
        """A PoisonMessage means the shard failed on our batch: fail its callers."""
        poisoned = getattr(msg, "poisonMessage", None)
        if isinstance(poisoned, ShardBatch):
            self._drop(inflight, busy, poisoned.batch_id, "the shard failed on this batch; retry")
            self._next_map = 0.0
        else:
            log.warning("bridge ignored %r", msg)

    def _expire(self, inflight: dict[int, _Inflight], busy: list[int]) -> None:
        now = time.monotonic()
        for batch_id, (shard, _, sent, tracker) in list(inflight.items()):
            if tracker is not None and tracker.failed:
                log.warning("batch %d could not be sent to shard %d: %s", batch_id, shard, tracker.failure)
                self._drop(inflight, busy, batch_id, f"shard {shard} is unreachable; retry")
                self._next_map = 0.0
            elif now - sent > self.reply_timeout:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._lane_trouble, True)
                log.error("shard %d did not answer batch %d in %.0f s", shard, batch_id, self.reply_timeout)
                self._drop(inflight, busy, batch_id, f"shard {shard} did not answer in time; retry")
                self._next_map = 0.0

    def _drop(self, inflight: dict[int, _Inflight], busy: list[int], batch_id: int, why: str) -> None:
        """Give up on a batch in flight: its shard has room again, its callers get `unavailable`."""
        entry = inflight.pop(batch_id, None)
        if entry is not None:
            busy[entry[0]] -= 1
            self._fail(entry[1], why)

    def _resolve(self, shard: int, items: list[_Item], payload: bytes) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(answer, shard, items, payload)

    def _fail(self, items: list[_Item], why: str) -> None:
        if items:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(fail, items, why)

    # Statistics are written on the event loop only (the thread hands its counts over), so the
    # lanes and the thread never update them at once.

    def _lane_trouble(self, timed_out: bool) -> None:
        if timed_out:
            self.stats.timeouts += 1
        self._next_map = 0.0  # ask the registrar soon: the shard may have moved

    def _count_batch(self, size: int) -> None:
        self.stats.batches += 1
        self.stats.commands += size
        self.stats.max_batch = max(self.stats.max_batch, size)
        self.stats.batch_sizes.append(size)
