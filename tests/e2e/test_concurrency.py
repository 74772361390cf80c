"""Many callers at once: no overselling, no double reservation, and a ledger that adds up.

Besides the API's answers, these tests read Postgres directly (asyncpg): the stock
snapshot, the open reservation lines and the movements must agree with one another.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import grpc

from actors.keys import shard_of

SHARDS = 2  # the session service's shard count (tests/conftest.py)


async def outcomes(calls: list[Any]) -> tuple[list[Any], Counter[str]]:
    """Run the calls at once; the successful replies and a count of the error codes."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = Counter(r.code().name for r in results if isinstance(r, grpc.aio.AioRpcError))
    unexpected = [r for r in results
                  if isinstance(r, BaseException) and not isinstance(r, grpc.aio.AioRpcError)]
    assert not unexpected, unexpected[:3]
    return [r for r in results if not isinstance(r, BaseException)], errors


async def ledger_disagreements(db: asyncpg.Pool, org: str) -> list[str]:
    """Every stock of `org` whose snapshot disagrees with its open lines or its movements."""
    rows = await db.fetch(
        """SELECT s.variant_id, s.warehouse_id, s.on_hand, s.reserved, s.in_transit, s.version,
                  (SELECT coalesce(sum(l.quantity), 0) FROM reservation_lines l
                    WHERE l.organization_id = s.organization_id AND l.variant_id = s.variant_id
                      AND l.warehouse_id = s.warehouse_id
                      AND l.status IN ('active', 'confirmed')) AS open_lines,
                  m.on_hand AS m_on_hand, m.reserved AS m_reserved, m.in_transit AS m_in_transit,
                  m.versions, m.last_version
           FROM stocks s
           CROSS JOIN LATERAL (
               SELECT coalesce(sum(on_hand_delta), 0) AS on_hand,
                      coalesce(sum(reserved_delta), 0) AS reserved,
                      coalesce(sum(in_transit_delta), 0) AS in_transit, count(DISTINCT version) AS versions,
                      coalesce(max(version), 0) AS last_version
               FROM movements m
               WHERE m.organization_id = s.organization_id AND m.variant_id = s.variant_id
                 AND m.warehouse_id = s.warehouse_id) m
           WHERE s.organization_id = $1""", org)
    assert rows, f"no stock of organization {org} in Postgres"
    bad = []
    for r in rows:
        checks = {
            "reserved = open lines": (r["reserved"], r["open_lines"]),
            "on_hand = ledger": (r["on_hand"], r["m_on_hand"]),
            "reserved = ledger": (r["reserved"], r["m_reserved"]),
            "in_transit = ledger": (r["in_transit"], r["m_in_transit"]),
            "version = last movement": (r["version"], r["last_version"]),
            "one movement per version": (r["version"], r["versions"]),
        }
        bad += [f"{r['variant_id']}@{r['warehouse_id']}: {name} {a} != {b}"
                for name, (a, b) in checks.items() if a != b]
    return bad


async def test_200_concurrent_reservations_of_one_unit_on_50_sell_exactly_50(shop, db):
    await shop.receive("shirt", "north", 50)

    reserved, errors = await outcomes(
        [shop.reserve(f"order-{i}", ("shirt", 1), timeout=60) for i in range(200)])

    assert len(reserved) == 50
    assert errors == Counter({"FAILED_PRECONDITION": 150})
    assert len({r.reservation_id for r in reserved}) == 50
    level = await shop.level("shirt", "north")
    assert (level.on_hand, level.reserved, level.available) == (50, 50, 0)
    stock = await db.fetchrow("SELECT on_hand, reserved FROM stocks WHERE organization_id = $1"
                              " AND variant_id = 'shirt' AND warehouse_id = 'north'", shop.org)
    lines = await db.fetchrow("SELECT count(*) AS n, coalesce(sum(quantity), 0) AS q FROM reservation_lines"
                              " WHERE organization_id = $1 AND status IN ('active', 'confirmed')", shop.org)
    ledger = await db.fetchrow("SELECT sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved"
                               " FROM movements WHERE organization_id = $1", shop.org)
    assert (stock["on_hand"], stock["reserved"]) == (50, 50)
    assert (lines["n"], lines["q"]) == (50, 50)
    assert (ledger["on_hand"], ledger["reserved"]) == (50, 50)
    assert await ledger_disagreements(db, shop.org) == []


async def test_concurrent_retries_of_one_order_reserve_once(shop, db):
    await shop.receive("shirt", "north", 10)

    reserved, errors = await outcomes([shop.reserve("order-1", ("shirt", 3), timeout=60) for _ in range(50)])

    assert errors == Counter()
    assert len({r.reservation_id for r in reserved}) == 1
    assert {r.expires_at for r in reserved} == {reserved[0].expires_at}
    level = await shop.level("shirt", "north")
    assert (level.reserved, level.available) == (3, 7)
    assert await ledger_disagreements(db, shop.org) == []


async def test_concurrent_reservations_across_shards_stay_all_or_nothing(shop, db):
    by_shard: dict[int, str] = {}
    n = 0
    while len(by_shard) < SHARDS:
        by_shard.setdefault(shard_of(shop.org, f"sku-{n}", SHARDS), f"sku-{n}")
        n += 1
    scarce, plenty = by_shard[0], by_shard[1]
    await shop.receive(scarce, "north", 30)
    await shop.receive(plenty, "north", 100)

    reserved, errors = await outcomes(
        [shop.reserve(f"order-{i}", (scarce, 1), (plenty, 1), timeout=60) for i in range(100)])

    assert len(reserved) == 30
    assert errors == Counter({"FAILED_PRECONDITION": 70})
    # The 70 failed orders reserved `plenty` in its shard and were compensated.
    assert (await shop.level(scarce, "north")).reserved == 30
    assert (await shop.level(plenty, "north")).reserved == 30
    assert await ledger_disagreements(db, shop.org) == []
