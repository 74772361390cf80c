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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.envelopes import ShardBatch, ShardBatchResult, ShardMap, ShardMapRequest
from actors.messages import Command, Rejected, Reply, decode_replies, encode_batch

log = logging.getLogger("inventory.bridge")

_Item = tuple[Command, "asyncio.Future[Reply]"]


@dataclass
class BridgeStats:
    batches: int = 0
    commands: int = 0
    max_batch: int = 0
    timeouts: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))


class ShardUnavailable(Exception):
    pass


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
    ) -> None:
        self._context_factory = context_factory
        self.addresses = list(addresses)
        self.shard_count = len(self.addresses)
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
        self._next_map = 0.0
        self.stats = BridgeStats()
        self._queue: queue.SimpleQueue[tuple[int, Command, asyncio.Future[Reply]] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------ asyncio side

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="actor-bridge", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    async def call(self, shard: int, command: Command) -> Reply:
        assert self._loop is not None, "bridge not started"
        if self._stopping.is_set():
            return Rejected("unavailable", "the service is shutting down")
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._queue.put((shard, command, fut))
        return await fut

    async def call_many(self, calls: Sequence[tuple[int, Command]]) -> list[Reply]:
        return list(await asyncio.gather(*(self.call(s, c) for s, c in calls)))

    async def stop(self) -> None:
        """Let in-flight batches finish (bounded), then stop the thread."""
        self._stopping.set()
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
        pending: dict[int, list[_Item]] = defaultdict(list)
        inflight: dict[int, tuple[int, list[_Item], float]] = {}
        busy = [0] * self.shard_count
        ids = itertools.count(1)
        next_tick = time.monotonic() + self.tick_interval
        self._next_map = time.monotonic() + self.map_interval
        map_asked = 0.0
        draining = False

        while True:
            # 1. take what has arrived; block only when there is nothing else to do
            timeout = 0.0
            if not inflight and not pending and not map_asked:
                wake = min(next_tick, self._next_map) if self.registrar is not None else next_tick
                timeout = max(0.0, wake - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout) if timeout != 0.0 else self._queue.get_nowait()
                while True:
                    if item is None:
                        draining = True
                    else:
                        pending[item[0]].append((item[1], item[2]))
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass

            # 2. a cheap periodic tick lets idle shards fire overdue timers
            now = time.monotonic()
            if self.registrar is not None and now >= self._next_map and not draining:
                self._next_map = now + self.map_interval
                if not map_asked or now - map_asked > 5.0:
                    ctx.tell(self.registrar, ShardMapRequest())
                    map_asked = now
            if now >= next_tick and not draining:
                next_tick = now + self.tick_interval
                for shard in range(self.shard_count):
                    if self.addresses[shard] is None:
                        continue
                    if busy[shard] == 0 and shard not in pending:
                        batch_id = next(ids)
                        ctx.tell(self.addresses[shard], ShardBatch(batch_id, encode_batch([])))
                        inflight[batch_id] = (shard, [], now)
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
                ctx.tell(self.addresses[shard], ShardBatch(batch_id, payload))
                log.debug("sent batch %d of %d to shard %d", batch_id, len(batch), shard)
                inflight[batch_id] = (shard, batch, now)
                busy[shard] += 1
                self.stats.batches += 1
                self.stats.commands += len(batch)
                self.stats.max_batch = max(self.stats.max_batch, len(batch))
                self.stats.batch_sizes.append(len(batch))

            if draining and not inflight and not pending:
                return

            # 4. wait briefly for replies
            if inflight or map_asked:
                msg = ctx.listen(0.002)
                if msg is not None:
                    log.debug("got %s", type(msg).__name__)
                if isinstance(msg, ShardBatchResult):
                    entry = inflight.pop(msg.batch_id, None)
                    if entry is not None:
                        busy[entry[0]] -= 1
                        if entry[1]:
                            self._resolve(entry[1], decode_replies(msg.payload))
                elif isinstance(msg, ShardMap):
                    map_asked = 0.0
                    self._on_map(msg, inflight, busy)
                elif msg is not None:
                    self._on_other(msg, inflight, busy)
                self._expire(inflight, busy)

    def _on_map(self, msg: ShardMap, inflight: dict[int, tuple[int, list[_Item], float]], busy: list[int]) -> None:
        """A shard that moved: its batches in flight to the old address fail `unavailable`."""
        if msg.shard_count != self.shard_count:
            log.error("shard map with %d shards ignored (this gateway routes over %d)",
                      msg.shard_count, self.shard_count)
            return
        for shard, address in enumerate(msg.addresses):
            if address == self.addresses[shard]:
                continue
            log.warning("shard %d moved", shard)
            self.addresses[shard] = address
            self.map_updates += 1
            for batch_id, (s, items, _) in list(inflight.items()):
                if s == shard:
                    del inflight[batch_id]
                    busy[shard] -= 1
                    self._fail(items, f"shard {shard} moved; retry")

    def _on_other(self, msg: Any, inflight: dict[int, tuple[int, list[_Item], float]], busy: list[int]) -> None:
        """A PoisonMessage means the shard failed on our batch: fail its callers."""
        poisoned = getattr(msg, "poisonMessage", None)
        if isinstance(poisoned, ShardBatch):
            entry = inflight.pop(poisoned.batch_id, None)
            if entry is not None:
                busy[entry[0]] -= 1
                self._fail(entry[1], "the shard failed on this batch; retry")
            self._next_map = 0.0
        else:
            log.warning("bridge ignored %r", msg)

    def _expire(self, inflight: dict[int, tuple[int, list[_Item], float]], busy: list[int]) -> None:
        now = time.monotonic()
        for batch_id, (shard, items, sent) in list(inflight.items()):
            if now - sent > self.reply_timeout:
                del inflight[batch_id]
                busy[shard] -= 1
                self.stats.timeouts += 1
                log.error("shard %d did not answer batch %d in %.0f s", shard, batch_id, self.reply_timeout)
                self._fail(items, f"shard {shard} did not answer in time; retry")
                self._next_map = 0.0

    def _resolve(self, items: list[_Item], replies: list[Reply]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_results, items, replies)

    def _fail(self, items: list[_Item], why: str) -> None:
        if items:
            self._resolve(items, [Rejected("unavailable", why)] * len(items))


def _set_results(items: list[_Item], replies: list[Reply]) -> None:
    for (_, fut), reply in zip(items, replies):
        if not fut.done():
            fut.set_result(reply)
