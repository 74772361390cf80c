"""A restart loses nothing: stock and reservations come back from Postgres, and TTLs keep running.

This test runs its own `inventory serve` (own ports, own database: one database may be
served by one service at a time), stops it with SIGTERM and starts it again on the
same database.
"""

from __future__ import annotations

import time
from datetime import datetime

import asyncpg
import grpc
import pytest

TTL = 6


async def line_status(database_url: str, org: str, reservation_id: str) -> set[str]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT status FROM reservation_lines WHERE organization_id = $1"
                                " AND reservation_id = $2", org, reservation_id)
    finally:
        await conn.close()
    return {r["status"] for r in rows}


@pytest.mark.timeout(120)
async def test_stock_and_reservations_survive_a_restart_and_ttls_keep_running(
        restartable_service, connect, shop_on, org, eventually, grpc_error):
    service = restartable_service
    async with connect(service.target) as clients:
        shop = shop_on(clients, org)
        await shop.receive("shirt", "north", 10)
        expiring = await shop.reserve("order-expiring", ("shirt", 2), ttl_seconds=TTL)
        confirmed = await shop.reserve("order-confirmed", ("shirt", 3), ttl_seconds=TTL)
        await shop.confirm(confirmed.reservation_id)
        expires_at = datetime.fromisoformat(expiring.expires_at).timestamp()

    assert await service.stop() == 0
    await service.start()

    async with connect(service.target) as clients:
        shop = shop_on(clients, org)
        level = await shop.level("shirt", "north")
        checked_at = time.time()
        assert checked_at < expires_at, f"the restart took too long to check before the TTL ({TTL} s) ran out"
        assert (level.on_hand, level.reserved, level.available) == (10, 5, 5)

        # The 6 s reservation expires on its own after the restart (watched in Postgres, not through the API).
        async def expired() -> set[str] | None:
            status = await line_status(service.database_url, org, expiring.reservation_id)
            return status if status == {"expired"} else None

        await eventually(expired, timeout=expires_at - time.time() + 4, interval=0.1,
                         what="the TTL reservation expires")
        assert time.time() >= expires_at - 0.1
        level = await shop.level("shirt", "north")
        assert (level.on_hand, level.reserved, level.available) == (10, 3, 7)
        assert await line_status(service.database_url, org, confirmed.reservation_id) == {"confirmed"}
        await grpc_error(shop.confirm(expiring.reservation_id), grpc.StatusCode.FAILED_PRECONDITION)
        assert (await shop.release(confirmed.reservation_id)).success
        assert (await shop.level("shirt", "north")).reserved == 0

