"""Fault injection: Redis, the variant cache, goes away for 8 s under a mixed load and comes back. The
service (a real `inventory serve` validating variants against the Catalog double, degraded mode OFF so a
validation that silently stopped working would fail calls) reaches Redis through a TCP proxy this test
owns; cutting it is the outage (the machine's Redis keeps running).

No request fails because of it: the cache falls back (a miss, so the Catalog answers: ledger source
`catalog` during the outage instead of `cache`); Catalog validation still works (a variant the Catalog
does not know is still NOT_FOUND during the outage); after it the cache is used again (source `cache`:
the recovery time). The shared invariants hold. A summary line is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import free_port
from fault_load import (
    AUX_PORTS,
    REDIS_HOST,
    REDIS_PORT,
    EventOrders,
    EventTap,
    FaultService,
    catalog_for,
    load,
    ordering,
    scenario_database,
    serve_with_events,
    settle_events,
    sources,
    summary,
    violations,
)
from tcp_proxy import TcpProxy

from gateway.pb import inventory_pb2 as pb

pytestmark = pytest.mark.timeout(120)
OUTAGE_SECONDS = 8.0
COOLDOWN = 1.0  # the redis breaker's: after the outage the cache is tried again within about this
RECOVERY_LIMIT = 10.0


@pytest.fixture
async def setup(tmp_path) -> AsyncIterator[tuple[FaultService, TcpProxy, object, str, EventTap]]:
    org = f"redis-{uuid.uuid4()}"
    url = await scenario_database("redis")
    async with TcpProxy(REDIS_HOST, REDIS_PORT, free_port(AUX_PORTS)) as proxy, catalog_for(org) as catalog, \
            serve_with_events(
                url, tmp_path, INVENTORY_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
                CATALOG_GRPC_HOST="127.0.0.1", CATALOG_GRPC_PORT=str(catalog.port),
                INVENTORY_CATALOG_DEGRADED_MODE="false",
                INVENTORY_BREAKER_COOLDOWN_SECONDS=str(COOLDOWN)) as (svc, tap):
        yield svc, proxy, catalog, org, tap


async def unknown_variant(admin, org: str, outcomes: collections.Counter[str]) -> None:
    """A receipt of a variant the Catalog does not know: must be NOT_FOUND (validation is working)."""
    try:
        await admin.RecordMovement(pb.MovementRequest(
            organization_id=org, variant_id=f"unknown-{uuid.uuid4().hex[:8]}", warehouse_id="w1",
            type=pb.MOVEMENT_TYPE_RECEIPT, quantity=1), timeout=5)
        outcomes["OK"] += 1
    except grpc.aio.AioRpcError as e:
        outcomes[e.code().name] += 1


async def test_redis_outage_fails_no_request_and_validation_goes_on(setup):
    svc, proxy, catalog, org, tap = setup
    unknown: collections.Counter[str] = collections.Counter()
    orders = EventOrders(tap.prefix, org)
    async with load(svc.target, org) as run, ordering(orders, run.admin):
        tally = run.tally
        await unknown_variant(run.admin, org, unknown)
        before = set(tally.received)
        tally.mark("outage")
        catalog_calls = catalog.double.calls
        await proxy.down()
        outage_started = time.time()
        for _ in range(int(OUTAGE_SECONDS / 0.5)):
            await asyncio.sleep(0.5)
            await unknown_variant(run.admin, org, unknown)
        during = tally.since("outage")
        catalog_calls = catalog.double.calls - catalog_calls
        during_refs = set(tally.received) - before
        await proxy.up()
        restored = time.time()
        await asyncio.sleep(COOLDOWN + 3)  # load after the outage
        after_refs = set(tally.received) - before - during_refs
    found = await violations(svc.database_url, org, tally)
    event_found, redelivered, _ = await settle_events(svc.database_url, org, tap, orders, RECOVERY_LIMIT)
    found += event_found
    ledger = await sources(svc.database_url, org)
    by_phase = {phase: collections.Counter(ledger[r][0] for r in refs) for phase, refs in (
        ("before", before), ("during", during_refs), ("after", after_refs))}
    # The receipts that started after the first second of the outage (the breaker needs a few failures).
    settled = [r for r in during_refs if ledger[r][1] > outage_started + 1.0]
    found += [f"receipt {r} during the outage answered from {ledger[r][0]!r}, not the Catalog"
              for r in settled if ledger[r][0] != "catalog"]
    back = sorted(at for r, (source, at) in ledger.items() if source == "cache" and r in after_refs)
    recovery = back[0] - restored if back else None
    summary("redis-outage", tally, recovery, found, during_outage=during, ledger_sources=by_phase,
            unknown_variant_receipts=dict(unknown), catalog_calls_during_outage=catalog_calls,
            events_delivered=len(tap.deliveries), redeliveries=redelivered, orders_via_events=len(orders.orders))
    assert not tally.forbidden, tally.forbidden[:5]
    assert tally.service_failures() == {}, f"calls failed during a Redis outage: {tally.failures}"
    assert during.get("OK", 0) > 0 and settled, (during, len(settled))
    assert by_phase["before"]["cache"] > 0, f"the cache was not in use before the outage: {by_phase}"
    assert unknown == {"NOT_FOUND": int(OUTAGE_SECONDS / 0.5) + 1}, unknown
    assert catalog_calls > 0
    assert recovery is not None and recovery < RECOVERY_LIMIT, f"the cache was not used again: {by_phase}"
    assert not found, found[:10]
