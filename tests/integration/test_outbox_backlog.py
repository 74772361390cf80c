"""The outbox backlog gauge: exact while small, bounded work while large (every gateway polls it)."""

from __future__ import annotations

import asyncpg
import pytest
from conftest import TEST_DATABASE_URL, database_url_named, drop_database, ensure_database

from persistence import queries
from persistence.migrate import migrate


@pytest.fixture
async def conn():
    url = database_url_named(TEST_DATABASE_URL, "inv_outbox_backlog")
    await drop_database(url)
    await ensure_database(url)
    await migrate(url)
    c = await asyncpg.connect(url)
    yield c
    await c.close()
    await drop_database(url)


async def add(conn: asyncpg.Connection, n: int, sent: bool, age_seconds: float = 0.0) -> None:
    await conn.execute(
        "INSERT INTO outbox (event_id, event_name, organization_id, payload, created_at, sent_at)"
        " SELECT gen_random_uuid(), 'inventory.stock.updated', 'o', '{}',"
        "        now() - make_interval(secs => $2), CASE WHEN $3 THEN now() END"
        " FROM generate_series(1, $1)", n, age_seconds, sent)


async def test_the_backlog_counts_unsent_rows_and_ages_the_oldest(conn: asyncpg.Connection) -> None:
    assert await queries.outbox_backlog(conn) == (0, 0.0)
    await add(conn, 3, sent=True, age_seconds=600)
    await add(conn, 5, sent=False, age_seconds=90)
    await add(conn, 2, sent=False)
    depth, age = await queries.outbox_backlog(conn)
    assert depth == 7
    assert 89 <= age < 120


async def test_past_the_limit_the_backlog_is_the_span_of_unsent_ids(conn: asyncpg.Connection,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, "BACKLOG_COUNT_LIMIT", 10)
    await add(conn, 25, sent=False)
    depth, _ = await queries.outbox_backlog(conn)
    assert depth == 25  # not the capped 11
