"""A real StockShard on Thespian's multiprocTCPBase: its own timer fires expiry, and shutdown leaves no process.

The actor system is started from its own launcher process (never forked from the test
process), on a free admin port, against a database of its own so its shard locks never
meet those of another service under test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from actors.envelopes import ShardBatch, ShardBatchResult
from actors.messages import (
    RecordMovement,
    ReservationResult,
    ReserveLine,
    ReserveStock,
    decode_replies,
    encode_batch,
)
from actors.system import fetch_shard_map, join
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
