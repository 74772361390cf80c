"""Fault injection: Postgres goes away for 10 s under a mixed load and comes back, without a restart of
the service. The outage is a TCP proxy this test owns between the service and Postgres (the machine's
Postgres is never stopped): it stops listening and cuts every open connection, then listens again.

Events are on (the relay publishes to the real broker; orders are placed and shipped through events),
so the outage also hits the relay, the consumers' inbox and the health loop.

During the outage calls must fail fast (never INTERNAL/UNKNOWN, never hang past their deadline); after
it the service must serve again by itself; at the end the invariants hold: for every stock
reserved = sum of open lines, 0 <= reserved <= on_hand, on_hand/reserved/in_transit = the ledger's sums
(persistence/reconcile.py), every reservation and receipt acknowledged OK is in Postgres, and every
committed outbox event is published and seen once per event_id. A summary line is printed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from conftest import free_port
from fault_load import (
    AUX_PORTS,
    EventOrders,
    EventTap,
    FaultService,
    load,
    ordering,
    scenario_database,
    serve_with_events,
    settle_events,
    summary,
    via,
    violations,
)
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(180)
OUTAGE_SECONDS = 10.0
RECOVERY_LIMIT = 30.0


@pytest.fixture
async def proxied_service(tmp_path) -> AsyncIterator[tuple[FaultService, TcpProxy, EventTap, str]]:
    url = await scenario_database("postgres")
    pg = urlsplit(url)
    async with TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432, free_port(AUX_PORTS)) as proxy, \
            serve_with_events(via(url, pg.hostname or "127.0.0.1", pg.port or 5432, proxy.port), tmp_path) as (svc, tap):
        yield svc, proxy, tap, url


async def test_postgres_outage_fails_fast_recovers_and_keeps_the_invariants(proxied_service):
    svc, proxy, tap, direct_url = proxied_service
    org = f"faults-{uuid.uuid4()}"
    orders = EventOrders(tap.prefix, org)
    async with load(svc.target, org) as run, ordering(orders, run.admin):
        tally = run.tally
        tally.mark("outage")
        await proxy.down()
        await asyncio.sleep(OUTAGE_SECONDS)
        during = tally.since("outage")
        await proxy.up()
        tally.restored = restored = time.monotonic()
        deadline = restored + RECOVERY_LIMIT
        while tally.recovered is None:
            assert time.monotonic() < deadline, (
                f"no successful call {RECOVERY_LIMIT} s after Postgres came back: {tally.outcomes}\n"
                f"{svc.log_tail()}")
            await asyncio.sleep(0.1)
        recovery = tally.recovered - restored
        await asyncio.sleep(2)  # load on the recovered service
    # the checks read Postgres directly, not through the proxy
    found = await violations(direct_url, org, tally)
    event_found, redelivered, drain = await settle_events(direct_url, org, tap, orders, RECOVERY_LIMIT)
    found += event_found
    summary("postgres-outage", tally, recovery, found, during_outage=during,
            events_delivered=len(tap.deliveries), redeliveries=redelivered, orders_via_events=len(orders.orders),
            events_settled_in=f"{drain:.2f} s")
    assert not tally.forbidden, tally.forbidden[:5]
    assert sum(v for k, v in during.items() if k != "OK") > 0, f"the outage was not noticed: {during}"
    assert tally.slowest < 6.0, "a call outlived its 5 s deadline"
    assert not found, found[:10]
