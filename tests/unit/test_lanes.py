"""A shard's lane on the event loop (gateway/lanes.py) against a hand-written shard on a socket."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from actors.datapath import Frames, frame
from actors.messages import DoneResult, ReadStock, Rejected, decode_batch, encode_replies
from gateway.lanes import Lane


class FakeShard:
    """Answers each batch frame after `delay` with one DoneResult per command; records batch sizes."""

    def __init__(self, delay: float, answer: bool = True) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.delay = delay
        self.answer = answer
        self.sizes: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        frames = Frames()
        with conn:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    return
                for batch_id, payload, shard in frames.feed(data):
                    commands = decode_batch(payload)  # type: ignore[arg-type]
                    self.sizes.append(len(commands))
                    if not self.answer:
                        conn.close()
                        return
                    time.sleep(self.delay)
                    conn.sendall(frame(batch_id, encode_replies([DoneResult(changed=False)] * len(commands)),
                                       shard))

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)


def lane_to(shard: FakeShard, **kw: object) -> Lane:
    sizes: list[int] = []
    options = {"max_inflight": 1, "max_batch": 512, "reply_timeout": 10.0, "on_batch": sizes.append, **kw}
    return Lane(3, lambda: shard.address, **options)  # type: ignore[arg-type]


async def test_calls_of_one_loop_turn_leave_in_one_frame_and_the_next_batch_waits_for_the_reply() -> None:
    shard = FakeShard(delay=0.2)
    lane = lane_to(shard)
    try:
        assert await lane.ready()
        first = [lane.call(ReadStock("o", f"v{i}")) for i in range(10)]
        await asyncio.sleep(0.05)  # the first batch is in flight now
        second = [lane.call(ReadStock("o", f"w{i}")) for i in range(5)]
        replies = await asyncio.wait_for(asyncio.gather(*first, *second), 10)
        assert all(isinstance(r, DoneResult) for r in replies), replies
        assert shard.sizes == [10, 5]
    finally:
        lane.lost("test over")
        shard.close()


async def test_a_connection_lost_with_a_batch_in_flight_fails_it_at_once() -> None:
    shard = FakeShard(delay=0.0, answer=False)  # reads the batch, then hangs up
    lane = lane_to(shard)
    try:
        assert await lane.ready()
        started = time.monotonic()
        reply = await asyncio.wait_for(lane.call(ReadStock("o", "v")), 10)
        assert isinstance(reply, Rejected) and reply.code == "unavailable" and "lost the connection" in reply.message
        assert time.monotonic() - started < 5  # not the 10 s reply timeout
        assert lane.peer is None
    finally:
        lane.lost("test over")
        shard.close()


async def test_a_shard_that_cannot_be_reached_is_not_tried_again_before_its_backoff() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lane = Lane(0, lambda: f"127.0.0.1:{port}", max_inflight=1, max_batch=512, reply_timeout=10.0,
                on_batch=lambda n: None)
    assert not await lane.ready()
    started = time.monotonic()
    assert not await lane.ready()  # within the backoff: no second connect
    assert time.monotonic() - started < 0.1


async def test_a_call_whose_shard_moves_while_in_flight_follows_it_if_a_repeat_is_harmless() -> None:
    """The map gives the shard a new address while a batch is in flight there: a read (or a
    reservation, idempotent per order) is answered by the new place; a movement without an
    idempotency key (it may have been applied before the move) fails unavailable."""
    from actors.messages import RecordMovement
    from gateway.bridge import ActorBridge

    old, new = FakeShard(delay=0.5), FakeShard(delay=0.0)
    bridge = ActorBridge(lambda: None, [object()], data_addresses=[old.address], reply_timeout=10.0)
    bridge._loop = asyncio.get_running_loop()  # (the Thespian thread is not needed for the batch path)
    try:
        read = asyncio.ensure_future(bridge.call(0, ReadStock("o", "v", "")))
        receipt = asyncio.ensure_future(bridge.call(0, RecordMovement("o", "v", "w", "receipt", 1)))
        await asyncio.sleep(0.1)  # both in flight to the old place
        bridge.data_addresses[0] = new.address
        bridge.lanes[0].moved(new.address)
        assert await asyncio.wait_for(read, 5) == DoneResult(changed=False)
        moved = await asyncio.wait_for(receipt, 5)
        assert isinstance(moved, Rejected) and moved.code == "unavailable" and "moved" in moved.message
        assert bridge.moved_retries == 1 and new.sizes == [1]
    finally:
        for lane in bridge.lanes:
            lane.close()
        old.close()
        new.close()


def test_what_follows_a_moved_shard_is_what_may_be_applied_twice() -> None:
    from actors.messages import (
        ConfirmReservation,
        RecordMovement,
        ReleaseReservation,
        ReserveLine,
        ReserveStock,
        ShipReservation,
    )
    from gateway.bridge import retry_safe

    assert retry_safe(ReserveStock("o", "r", "ord", "h", 1e12, (ReserveLine("v", "", 1),)))
    assert retry_safe(ReleaseReservation("o", "r", ("v",))) and retry_safe(ConfirmReservation("o", "r", ("v",)))
    assert retry_safe(RecordMovement("o", "v", "w", "receipt", 1, idempotency_key="k"))
    assert not retry_safe(RecordMovement("o", "v", "w", "receipt", 1))
    assert not retry_safe(ShipReservation("o", "r", ("v",)))  # shipped before the move: `closed` the second time
