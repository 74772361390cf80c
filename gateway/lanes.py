"""Batches to one shard over its socket (actors/datapath.py), on the gateway's event loop.

The bridge thread (gateway/bridge.py) exists because Thespian blocks; a socket does not.
A lane batches on the event loop itself: a call appends its command to the next batch and,
if the shard has room, a flush is scheduled with `call_soon`, so every command that arrives
in the same turn of the loop leaves in one frame. While `max_inflight` batches are in
flight, commands wait for the next reply, which sends the next batch from the read
callback: group commit, as in the thread, without a thread hop or the GIL handoff at
every send and reply (the bridge thread was a fifth of the gateway's samples, mostly
waiting for the GIL after each socket call).

A lane connects when first needed (callers wait for it, at most `CONNECT_TIMEOUT`); when it
cannot, its callers go through the bridge thread as Thespian messages, and it tries again
after a backoff. A lost connection, a reply timeout or a move of the shard (a new address
in the map) fail the batches in flight `unavailable`, as the thread does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable

from actors.datapath import Peer, frame, split_address, stream_socket
from actors.messages import Command, Rejected, Reply, decode_replies, encode_batch

log = logging.getLogger("inventory.bridge")

CONNECT_TIMEOUT = 1.0
MOVED = "moved; retry"  # the end of the message with which a move of its shard fails a batch in flight
RECONNECT_FIRST, RECONNECT_MAX = 1.0, 30.0  # backoff after a failed connect, doubling

_Item = tuple[Command, "asyncio.Future[Reply]"]


class Lane:
    def __init__(self, shard: int, address: Callable[[], str], *, max_inflight: int, max_batch: int,
                 reply_timeout: float, on_batch: Callable[[int], None],
                 on_trouble: Callable[[bool], None] = lambda timed_out: None) -> None:
        self.shard = shard
        self._address = address  # the shard's current data address ("" if none), read at connect
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        self.reply_timeout = reply_timeout
        self._on_batch = on_batch  # statistics: called with each batch's size
        self._on_trouble = on_trouble  # a lost connection (True: a reply timeout): refresh the map
        self.closed = False  # closed for good (the bridge stops): no new connection
        self._generation = 0  # grows with every lost connection: a connect begun before is stale
        self.peer: Peer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._retry_at = 0.0
        self._backoff = RECONNECT_FIRST
        self._pending: list[_Item] = []
        self._inflight: dict[int, tuple[list[_Item], asyncio.TimerHandle]] = {}
        self._ids = itertools.count(1)
        self._out = bytearray()  # what the socket did not take yet
        self._flush_scheduled = False

    # ------------------------------------------------------------ calls

    async def ready(self) -> bool:
        """True when the lane is connected; connects first if it may (callers wait for it)."""
        if self.peer is not None:
            return True
        if self.closed or not self._address() or time.monotonic() < self._retry_at:
            return False
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        await asyncio.shield(self._connecting)
        return self.peer is not None

    def call(self, command: Command) -> asyncio.Future[Reply]:
        assert self._loop is not None and self.peer is not None
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._pending.append((command, fut))
        if not self._flush_scheduled and len(self._inflight) < self.max_inflight:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    @property
    def busy(self) -> bool:
        return bool(self._inflight or self._pending or self._connecting is not None)

    def moved(self, address: str) -> None:
        """The map has a new address for the shard: a connection elsewhere is dropped, and the
        new place is tried at once (not after a backoff earned by the old one)."""
        self._retry_at = 0.0
        self._backoff = RECONNECT_FIRST
        if self.peer is None or self.peer.name != address:
            self.lost(f"shard {self.shard} {MOVED}")

    def close(self) -> None:
        self.closed = True
        self.lost("the service is shutting down")

    # ------------------------------------------------------------ the connection

    async def _connect(self) -> None:
        address = self._address()
        generation = self._generation
        loop = self._loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            host, port = split_address(address)
            sock = stream_socket(host)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT)
            if self.closed or generation != self._generation or self._address() != address:
                sock.close()  # the shard moved (or the bridge stopped) meanwhile: the next call connects anew
                return
            peer = Peer(sock, address)
            loop.add_reader(peer.fd, self._readable)
            self.peer = peer
        except Exception as e:  # noqa: BLE001 - OSError, a timeout, an address that does not parse
            if sock is not None:
                sock.close()
            log.warning("shard %d: no batch path to %s (%s); sending through Thespian for %.0f s",
                        self.shard, address, e, self._backoff)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_MAX)
            return
        finally:
            self._connecting = None
        self._backoff = RECONNECT_FIRST

    def lost(self, why: str) -> None:
        """Close the connection; batches in flight and waiting fail `unavailable` (callers retry)."""
        self._generation += 1
        peer, self.peer = self.peer, None
        if peer is not None and self._loop is not None:
            for remove in (self._loop.remove_reader, self._loop.remove_writer):
                try:
                    remove(peer.fd)
                except (OSError, ValueError):  # (the socket may be closed already: nothing to unregister)
                    pass
            peer.close()
            self._on_trouble(False)
        self._out.clear()
        failed = [item for items, timer in self._inflight.values() for item in items]
        for _, timer in self._inflight.values():
            timer.cancel()
        self._inflight.clear()
        failed += self._pending
        self._pending = []
        fail(failed, why)

    # ------------------------------------------------------------ out

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._pending and len(self._inflight) < self.max_inflight and self.peer is not None:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            batch_id = next(self._ids)
            assert self._loop is not None
            timer = self._loop.call_later(self.reply_timeout, self._timed_out, batch_id)
            self._inflight[batch_id] = (batch, timer)
            self._on_batch(len(batch))
            self._write(frame(batch_id, encode_batch([cmd for cmd, _ in batch]), self.shard))

    def _write(self, data: bytes) -> None:
        peer = self.peer
        assert peer is not None and self._loop is not None
        if self._out:  # the socket is full: keep the order, the writer callback sends it
            self._out += data
            return
        try:
            sent = peer.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self.lost(f"lost the connection to shard {self.shard} ({e}); retry")
            return
        if sent < len(data):
            self._out += data[sent:]
            self._loop.add_writer(peer.fd, self._writable)

    def _writable(self) -> None:
        peer = self.peer
        if peer is None or self._loop is None:
            return
        try:
            sent = peer.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.lost(f"lost the connection to shard {self.shard} ({e}); retry")
            return
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(peer.fd)

    # ------------------------------------------------------------ in

    def _readable(self) -> None:
        peer = self.peer
        if peer is None:
            return
        for fields in peer.read():
            batch_id = payload = from_shard = None
            if len(fields) == 3:
                batch_id, payload, from_shard = fields
            if not isinstance(batch_id, int) or not isinstance(payload, bytes) or from_shard != self.shard:
                log.warning("shard %d's connection sent a frame that is not its reply; dropping it", self.shard)
                self.lost(f"shard {self.shard} sent a frame that is not a reply; retry")
                return
            entry = self._inflight.pop(batch_id, None)
            if entry is None:
                continue  # timed out meanwhile: its callers were answered
            items, timer = entry
            timer.cancel()
            answer(self.shard, items, payload)
        if peer.closed:
            self.lost(f"lost the connection to shard {self.shard}; retry")
        elif self._pending and not self._flush_scheduled:
            self._flush()

    def _timed_out(self, batch_id: int) -> None:
        if batch_id in self._inflight:
            log.error("shard %d did not answer batch %d in %.0f s", self.shard, batch_id, self.reply_timeout)
            self._on_trouble(True)
            # A connection that may be dead without a word: every batch on it fails, the next
            # call opens a fresh one.
            self.lost(f"shard {self.shard} did not answer in time; retry")


def answer(shard: int, items: list[_Item], payload: bytes) -> None:
    """Resolve each caller's future with its reply, or all `unavailable` if the payload is wrong."""
    try:
        replies: list[Reply] = decode_replies(payload)
    except Exception:  # a shard of another version: its callers may retry
        log.exception("shard %d sent replies that do not decode", shard)
        replies = []
    if len(replies) != len(items):
        log.error("shard %d answered %d of %d commands", shard, len(replies), len(items))
        fail(items, f"shard {shard} answered the batch incompletely; retry")
        return
    for (_, fut), reply in zip(items, replies):
        if not fut.done():
            fut.set_result(reply)


def fail(items: list[_Item], why: str) -> None:
    for _, fut in items:
        if not fut.done():
            fut.set_result(Rejected("unavailable", why))



