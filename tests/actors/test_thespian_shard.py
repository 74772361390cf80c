"""A real StockShard on Thespian's multiprocTCPBase: its own timer fires expiry, and shutdown leaves no process.

The actor system is started from its own launcher process (never forked from the test
process), on a free admin port, against a database of its own so its shard locks never
meet those of another service under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
from thespian.actors import ActorSystem

from actors.datapath import connect, frame
from actors.envelopes import ShardBatch, ShardBatchResult, ShardMap
from actors.messages import (
    ReadStock,
    RecordMovement,
    Rejected,
    ReservationResult,
    ReserveLine,
    ReserveStock,
    decode_replies,
    encode_batch,
)
from actors.system import SYSTEM_BASE, fetch_shard_map, join, thespian_logging
from gateway.bridge import ActorBridge
from persistence.migrate import migrate

BASE_DSN = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
DB_NAME = "inv_actors_test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found


async def _own_database() -> str:
    conn = await asyncpg.connect(BASE_DSN)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB_NAME):
            await conn.execute(f"CREATE DATABASE {DB_NAME}")
    finally:
        await conn.close()
    dsn = BASE_DSN.rsplit("/", 1)[0] + "/" + DB_NAME
    await migrate(dsn)
    return dsn


@pytest.fixture
async def actor_system(tmp_path: Path):
    dsn = await _own_database()
    port = _free_port()
    marker = f"inventory-test-{uuid.uuid4().hex}"
    ready = tmp_path / "ready"
    code = ("import sys, logging; from actors.system import run_node; "
            f"sys.exit(run_node('node-1', {port}, '127.0.0.1:{port}', {dsn!r}, 1, {str(ready)!r}))  # {marker}")
    launcher = subprocess.Popen([sys.executable, "-c", code])  # noqa: ASYNC220 - starts, does not wait
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert launcher.poll() is None, "the launcher exited"
        assert time.monotonic() < deadline, "the actor system did not start"
        await asyncio.sleep(0.05)
    yield port, dsn, marker, launcher
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(30)


def _ask(asys, addr, commands, batch_id):
    reply = asys.ask(addr, ShardBatch(batch_id, encode_batch(commands)), 10)
    assert isinstance(reply, ShardBatchResult), reply
    return decode_replies(reply.payload)


async def test_the_shard_timer_expires_a_reservation_with_no_other_traffic(actor_system) -> None:
    port, dsn, _, _ = actor_system
    asys = join(port)
    [addr] = fetch_shard_map(asys).addresses
    org = "org-" + uuid.uuid4().hex[:12]
    now = time.time()
    _ask(asys, addr, [RecordMovement(org, "v", "w1", "receipt", 5, create_if_missing=True)], 1)
    [r] = _ask(asys, addr, [ReserveStock(org, "r1", "o1", "h", now + 1.0, (ReserveLine("v", "", 2),))], 2)
    assert isinstance(r, ReservationResult)
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 6
        status = None
        while time.monotonic() < deadline:
            status = await conn.fetchval(
                "SELECT status FROM reservation_lines WHERE organization_id = $1", org)
            if status == "expired":
                break
            await asyncio.sleep(0.1)
        assert status == "expired"
        assert await conn.fetchval("SELECT reserved FROM stocks WHERE organization_id = $1", org) == 0
        expired_at = await conn.fetchval(
            "SELECT extract(epoch FROM occurred_at)::float8 FROM movements"
            " WHERE organization_id = $1 AND type = 'expire'", org)
        assert expired_at >= now + 1.0, "expired before its expires_at"
    finally:
        await conn.close()


async def test_stopping_the_launcher_leaves_no_actor_process(actor_system) -> None:
    _, _, marker, launcher = actor_system
    assert len(_processes_with(marker)) >= 2  # launcher, admin, shard, logger...
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(30) == 0
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert _processes_with(marker) == []


# ---------------------------------------------------------------- the batch path (actors/datapath.py)


def _joined(port: int) -> tuple[ActorSystem, ShardMap]:
    """The test's actor system, joined anew (not Thespian's per-process singleton: an earlier
    test's system is gone), and its shard map."""
    asys = ActorSystem(SYSTEM_BASE, capabilities={"Admin Port": port}, logDefs=thespian_logging(),
                       transientUnique=True)
    return asys, fetch_shard_map(asys)


async def _bridge_call(asys, shard_map, command, reply_timeout=10.0, **kw):
    bridge = ActorBridge(asys.private, shard_map.addresses, data_addresses=shard_map.data_addresses,
                         reply_timeout=reply_timeout, **kw)
    bridge.start()
    try:
        reply = await asyncio.wait_for(bridge.call(0, command), 15)
        return reply, {lane.shard: lane.peer for lane in bridge.lanes if lane.peer is not None}
    finally:
        await bridge.stop()


async def test_batches_reach_the_shard_by_its_socket_or_as_thespian_messages_alike(actor_system) -> None:
    port, dsn, _, _ = actor_system
    asys, shard_map = _joined(port)
    # (on the IP of the shard's Thespian address, as Thespian's own traffic)
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+:\d+", shard_map.data_addresses[0]), shard_map.data_addresses
    org = "org-" + uuid.uuid4().hex[:12]
    received, peers = await _bridge_call(
        asys, shard_map, RecordMovement(org, "v", "w1", "receipt", 5, create_if_missing=True))
    assert not isinstance(received, Rejected), received
    assert list(peers) == [0]  # by the socket
    reserved, peers = await _bridge_call(
        asys, shard_map, ReserveStock(org, "r1", "o1", "h", time.time() + 60, (ReserveLine("v", "", 2),)),
        data_path=False)
    assert isinstance(reserved, ReservationResult), reserved
    assert peers == {}  # as a Thespian message
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT reserved FROM stocks WHERE organization_id = $1", org) == 2
    finally:
        await conn.close()


async def test_the_shard_drops_a_connection_that_sends_no_batch_and_serves_the_others(actor_system) -> None:
    port, _, _, _ = actor_system
    _, shard_map = _joined(port)
    org = "org-" + uuid.uuid4().hex[:12]
    nested = b"\x91" * 100_000  # msgpack arrays 100,000 deep: a RecursionError in the decoder
    for garbage in (frame("not", "a", "batch"),
                    frame(1, encode_batch([]), 5),  # a batch for another shard (a stale map)
                    struct.pack("!I", len(nested)) + nested):
        hostile = connect(shard_map.data_addresses[0], 5)
        try:
            assert hostile.send(garbage)
            deadline = time.monotonic() + 5
            while not hostile.closed and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                hostile.read()
            assert hostile.closed, f"the shard kept a connection that sent {garbage[:20]!r}"
        finally:
            hostile.close()
    # a well-formed batch on a connection of its own is answered
    friend = connect(shard_map.data_addresses[0], 5)
    try:
        assert friend.send(frame(7, encode_batch([RecordMovement(org, "v", "w1", "receipt", 3,
                                                                 create_if_missing=True)]), 0))
        answers: list[list[object]] = []
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            answers = friend.read()
        [[batch_id, payload, shard_id]] = answers
        assert batch_id == 7 and shard_id == 0
        [reply] = decode_replies(payload)  # type: ignore[arg-type]
        assert not isinstance(reply, Rejected), reply
    finally:
        friend.close()


async def test_a_batch_whose_connection_is_lost_fails_unavailable_at_once(actor_system) -> None:
    """A shard process that dies with a batch in flight closes its socket: the callers get
    `unavailable` at once, not after the reply timeout (here a server that reads and hangs up)."""
    port, _, _, _ = actor_system
    asys, shard_map = _joined(port)
    server = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def hang_up_after_one_read() -> None:
        conn, _ = server.accept()
        got.append(conn.recv(1 << 16))
        conn.close()

    thread = threading.Thread(target=hang_up_after_one_read, daemon=True)
    thread.start()
    fake = dataclasses.replace(shard_map, data_addresses=(f"127.0.0.1:{server.getsockname()[1]}",))
    try:
        started = time.monotonic()
        reply, _ = await _bridge_call(asys, fake, ReadStock("org", "v"))
        assert isinstance(reply, Rejected) and reply.code == "unavailable", reply
        assert "lost the connection" in reply.message
        assert time.monotonic() - started < 5  # the reply timeout is 10 s
        assert got and got[0]
    finally:
        thread.join(5)
        server.close()


async def test_a_connection_that_never_answers_is_replaced_after_the_reply_timeout(actor_system) -> None:
    """A connection black-holed without a close: the batch fails at the reply timeout, and the
    connection is dropped, not used for every later batch too."""
    port, _, _, _ = actor_system
    asys, shard_map = _joined(port)
    server = socket.create_server(("127.0.0.1", 0))
    kept: list[socket.socket] = []
    thread = threading.Thread(target=lambda: kept.append(server.accept()[0]), daemon=True)
    thread.start()
    fake = dataclasses.replace(shard_map, data_addresses=(f"127.0.0.1:{server.getsockname()[1]}",))
    try:
        reply, peers = await _bridge_call(asys, fake, ReadStock("org", "v"), reply_timeout=1.0)
        assert isinstance(reply, Rejected) and "did not answer in time" in reply.message, reply
        assert peers == {}
    finally:
        thread.join(5)
        for conn in kept:
            conn.close()
        server.close()
