"""The batch path's framing and sockets (actors/datapath.py), on 127.0.0.1."""

from __future__ import annotations

import struct
import threading
import time

import msgspec
import pytest

from actors.datapath import MAX_FRAME, FrameError, Frames, Listener, Peer, connect, frame


def test_frames_come_out_whole_however_the_stream_is_cut() -> None:
    stream = frame(1, b"abc") + frame(2, b"") + frame(3, b"x" * 70_000)
    for cut in (1, 2, 3, 7, 4096, len(stream)):
        frames = Frames()
        out = []
        for i in range(0, len(stream), cut):
            out += frames.feed(stream[i:i + cut])
        assert out == [[1, b"abc"], [2, b""], [3, b"x" * 70_000]], cut


@pytest.mark.parametrize("data", [
    struct.pack("!I", MAX_FRAME + 1),  # a length no frame has
    struct.pack("!I", 3) + b"\xc1\xc1\xc1",  # not msgpack
    struct.pack("!I", 1) + msgspec.msgpack.encode(7),  # not an array
    struct.pack("!I", 100_000) + b"\x91" * 100_000,  # nested too deep for the decoder
])
def test_what_is_not_a_frame_is_refused(data: bytes) -> None:
    with pytest.raises(FrameError):
        Frames().feed(data)


def _read_until(peer: Peer, count: int, timeout: float = 10.0) -> list[list[object]]:
    got: list[list[object]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and not peer.closed and time.monotonic() < deadline:
        got += peer.read()
        time.sleep(0.001)
    return got


def test_a_frame_larger_than_the_socket_buffers_crosses_whole_and_a_close_is_seen() -> None:
    listener = Listener("127.0.0.1", "127.0.0.1")
    client = connect(listener.address, 5)
    try:
        big = b"\x01" * (8 * 1024 * 1024)  # far beyond the kernel's socket buffers
        sender = threading.Thread(target=lambda: client.send(frame(9, big)))
        sender.start()
        got: list[tuple[Peer, list[object]]] = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:  # accept, then read as the data arrives
            got = listener.ready(listener.fds())
            time.sleep(0.001)
        sender.join(10)
        [(server_side, fields)] = got
        assert fields == [9, big]
        assert server_side.send(frame(9, b"ok", 0))
        assert _read_until(client, 1) == [[9, b"ok", 0]]
        client.close()
        deadline = time.monotonic() + 5
        while listener.peers and time.monotonic() < deadline:
            listener.ready(listener.fds())
            time.sleep(0.001)
        assert listener.peers == {}  # the closed connection is forgotten
    finally:
        client.close()
        listener.close()


def test_a_read_with_nothing_arrived_returns_at_once_and_keeps_the_connection() -> None:
    listener = Listener("127.0.0.1", "127.0.0.1")
    client = connect(listener.address, 5)
    try:
        started = time.monotonic()
        assert client.read() == []
        assert time.monotonic() - started < 0.5
        assert not client.closed
    finally:
        client.close()
        listener.close()


def test_both_ends_of_a_batch_connection_send_keepalives() -> None:
    """A gateway host that vanishes without closing must not leave its connection on the shard
    for good (nor a shard's on the gateway)."""
    import socket

    listener = Listener("127.0.0.1", "127.0.0.1")
    try:
        gateway_end = connect(listener.address, timeout=2)
        deadline = time.monotonic() + 2
        while not listener.peers and time.monotonic() < deadline:
            listener.ready([listener.sock.fileno()])
            time.sleep(0.01)
        [shard_end] = listener.peers.values()
        for peer in (gateway_end, shard_end):
            assert peer.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert peer.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        gateway_end.close()
    finally:
        listener.close()
