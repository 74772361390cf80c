"""The batch path between gateways and shards: a plain TCP socket beside Thespian's transport.

Thespian carries everything else (placement, configuration, status, the registrar's map,
supervision); batches and their replies, the hot path, go over this socket. Each Thespian
message cost about 1.7 ms of the gateway's CPU per batch (its bridge thread was a quarter of
the gateway's samples, under the GIL that the gRPC event loop needs) and about 0.8 ms of the
shard's (pickling, the acknowledgement each message waits for, the transport's loop).

The shard listens on the IP address of its Thespian address, port chosen by the system,
and reports `host:port` in its ShardStatus; the registrar hands it to gateways in the
ShardMap. The shard's actor watches the sockets with `ThespianWatch`, so a batch from a
socket is handled in the actor's one thread, in turn with its other messages, exactly as
a Thespian ShardBatch is. A gateway that loses the connection fails that shard's batches
in flight with `unavailable` (as when a Thespian send fails) and connects again when it
next has work for the shard, to the address in the current map.

Frames: a 4-byte big-endian length, then msgpack: `[batch_id, payload, shard_id]` both
ways, payloads as actors.messages encodes them. A shard closes a connection that sends it
anything else, or a batch for another shard id (a gateway with a stale map reaching a
port that another shard now uses); a gateway fails a reply from the wrong shard.

Nothing here blocks for long: sockets are non-blocking, a read takes at most READ_CHUNK
bytes per call (the poll loop comes back for the rest), and a send that cannot finish
within SEND_TIMEOUT (the peer does not read) drops the connection: well under the
registrar's three seconds after which a silent shard is replaced.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
from collections.abc import Iterable

import msgspec

log = logging.getLogger("inventory.datapath")

_HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a batch of 512 commands of 500 items each is about 15 MB
READ_CHUNK = 4 * 1024 * 1024  # bytes one `Peer.read` takes at most
SEND_TIMEOUT = 1.0  # seconds a send may wait without progress for a peer that does not read


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol: drop the connection."""


def frame(*fields: object) -> bytes:
    body = msgspec.msgpack.encode(fields)
    return _HEADER.pack(len(body)) + body


class Frames:
    """Reassembles frames from the bytes a stream socket delivers."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[object]]:
        self._buf += data
        out: list[list[object]] = []
        start = 0
        try:
            while len(self._buf) - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buf, start)
                if size > MAX_FRAME:
                    raise FrameError(f"frame of {size} bytes")
                end = start + _HEADER.size + size
                if len(self._buf) < end:
                    break
                try:
                    fields = msgspec.msgpack.decode(bytes(self._buf[start + _HEADER.size:end]))
                except Exception as e:  # noqa: BLE001 - DecodeError, but also RecursionError on deep nesting
                    raise FrameError(f"not msgpack: {type(e).__name__}") from None
                if not isinstance(fields, list):
                    raise FrameError("a frame is not an array")
                out.append(fields)
                start = end
        finally:
            if start:
                del self._buf[:start]
        return out


KEEPALIVE = (30, 10, 3)  # idle seconds before probes, seconds between them, probes lost: a dead peer in about a minute


def tune(sock: socket.socket) -> socket.socket:
    """Non-blocking (a read takes what has arrived), small frames leave at once (no Nagle delay),
    and TCP keepalive: a peer whose host vanished without closing is dropped, not kept for good."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # (Linux; elsewhere the system's defaults)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setblocking(False)
    return sock


class Peer:
    """One connected socket: frames in (`read`, when the socket is ready), frames out (`send`)."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = tune(sock)
        self.fd = sock.fileno()  # (kept: a closed socket's fileno() is -1)
        self.name = name
        self.frames = Frames()
        self.closed = False

    def read(self) -> list[list[object]]:
        """The frames now complete; `closed` is set when the peer closed or broke the protocol
        (the frames complete before that are still returned)."""
        out: list[list[object]] = []
        taken = 0
        while taken < READ_CHUNK and not self.closed:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.info("connection %s lost: %s", self.name, e)
                self.close()
                break
            if not data:
                self.close()
                break
            taken += len(data)
            try:
                out += self.frames.feed(data)
            except FrameError as e:
                log.warning("connection %s dropped: %s", self.name, e)
                self.close()
        return out

    def send(self, data: bytes) -> bool:
        """Send all of `data`, or close: the peer may let SEND_TIMEOUT pass without progress."""
        if self.closed:
            return False
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[self.sock.send(view):]
                except (BlockingIOError, InterruptedError):
                    poll = select.poll()
                    poll.register(self.sock, select.POLLOUT)
                    if not poll.poll(SEND_TIMEOUT * 1000):
                        raise TimeoutError(f"the peer read nothing for {SEND_TIMEOUT:.0f} s") from None
            return True
        except OSError as e:
            log.info("connection %s lost while sending: %s", self.name, e)
            self.close()
            return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


WILDCARDS = ("", "0.0.0.0", "::")


def stream_socket(host: str) -> socket.socket:
    """A TCP socket of the family `host` (an IPv4 or IPv6 address) needs."""
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6 host]:port` as advertised by a Listener -> (host, port); ValueError if not."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Listener:
    """The shard's end: a listening socket and the gateways connected to it.

    `host` is where to listen; `advertise` the host gateways are told (needed when `host`
    is a wildcard, which no gateway can connect to)."""

    def __init__(self, host: str, advertise: str) -> None:
        if advertise in WILDCARDS:
            raise ValueError("a shard must advertise an address gateways can reach, not a wildcard")
        self.sock = stream_socket(host)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, 0))
            self.sock.listen(128)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        port = self.sock.getsockname()[1]
        self.address = f"[{advertise}]:{port}" if ":" in advertise else f"{advertise}:{port}"
        self.peers: dict[int, Peer] = {}

    def fds(self) -> list[int]:
        """What to watch: the listening socket and the open connections (closed ones are forgotten)."""
        if any(p.closed for p in self.peers.values()):
            self.peers = {fd: p for fd, p in self.peers.items() if not p.closed}
        return [self.sock.fileno(), *self.peers]

    def ready(self, fds: Iterable[int]) -> list[tuple[Peer, list[object]]]:
        """Accept new gateways and read the ready ones: (peer, frame) for every complete frame
        of a connection still open (a gateway that closed has failed its batches in flight)."""
        out: list[tuple[Peer, list[object]]] = []
        for fd in fds:
            if fd == self.sock.fileno():
                self._accept()
                continue
            peer = self.peers.get(fd)
            if peer is None:
                continue
            frames = peer.read()
            if peer.closed:
                del self.peers[fd]
                continue
            out += [(peer, fields) for fields in frames]
        return out

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: the gateway retries
                log.warning("batch path: accept failed: %s", e)
                return
            peer = Peer(sock, f"{addr[0]}:{addr[1]}")
            self.peers[peer.fd] = peer

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers.clear()
        self.sock.close()


def connect(address: str, timeout: float) -> Peer:
    """The gateway's end: a connection to a shard's `host:port` (raises OSError or ValueError)."""
    sock = socket.create_connection(split_address(address), timeout=timeout)
    return Peer(sock, address)
