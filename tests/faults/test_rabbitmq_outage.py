"""Fault injection: RabbitMQ goes away for 10 s under a mixed load and comes back. The service (a real
`inventory serve` with events on) reaches the broker through a TCP proxy this test owns; cutting the proxy
is the outage (the machine's RabbitMQ keeps running, and the test's own consumer and publisher talk to it
directly).

The load is the gRPC mix plus the Order Service's side over the broker: orders placed and shipped with
`order.placed` / `order.shipped` events (published during the outage too: they wait in the queue).
gRPC keeps working throughout (no call fails because of the outage); the outbox grows during it; afterwards
every committed outbox event of the run is published and seen by a consumer bound to the inventory events
exchange, once per event_id after deduplication (copies, if any, identical and counted), each stock's
last `inventory.stock.updated` carries its version and quantities, there is one movement event per
receipt and shipment, and every order sent as events is shipped. Plus the shared invariants.
A summary line is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from conftest import free_port
from fault_load import (
    AMQP_HOST,
    AMQP_PORT,
    AMQP_URL,
    AUX_PORTS,
    EventOrders,
    EventTap,
    FaultService,
    load,
    ordering,
    outbox_of,
    scenario_database,
    serve_with_events,
    settle_events,
    summary,
    via,
    violations,
)
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)
OUTAGE_SECONDS = 10.0
DRAIN_LIMIT = 20.0


@pytest.fixture
async def proxied(tmp_path) -> AsyncIterator[tuple[FaultService, TcpProxy, EventTap]]:
    url = await scenario_database("rabbitmq")
    async with TcpProxy(AMQP_HOST, AMQP_PORT, free_port(AUX_PORTS)) as proxy, \
            serve_with_events(url, tmp_path, via(AMQP_URL, AMQP_HOST, AMQP_PORT, proxy.port)) as (svc, tap):
        yield svc, proxy, tap


async def test_rabbitmq_outage_keeps_grpc_working_and_every_event_is_published_once(proxied):
    svc, proxy, tap = proxied
    org = f"rabbitmq-{uuid.uuid4()}"
    orders = EventOrders(tap.prefix, org)
    async with load(svc.target, org) as run, ordering(orders, run.admin):
        tally = run.tally
        await asyncio.sleep(1)
        tally.mark("outage")
        await proxy.down()
        await asyncio.sleep(OUTAGE_SECONDS)
        during = tally.since("outage")
        backlog = sum(1 for _, sent in (await outbox_of(svc.database_url, org)).values() if not sent)
        await proxy.up()
        restored = time.monotonic()
        recovery = await backlog_published(svc.database_url, org, DRAIN_LIMIT)
        await asyncio.sleep(2)  # load after the outage
    found = await violations(svc.database_url, org, tally)
    event_found, redelivered, drain = await settle_events(svc.database_url, org, tap, orders, DRAIN_LIMIT)
    found += event_found
    settled = time.monotonic() - restored
    outbox = await outbox_of(svc.database_url, org)
    summary("rabbitmq-outage", tally, recovery, found, during_outage=during, outbox_backlog_at_end_of_outage=backlog,
            drained_after_the_load_in=f"{drain:.2f} s", all_settled_after=f"{settled:.2f} s",
            events_committed=len(outbox), events_delivered=len(
                [d for d in tap.deliveries if d[3].get("organization_id") == org]), redeliveries=redelivered,
            orders_via_events=len(orders.orders))
    assert not tally.forbidden, tally.forbidden[:5]
    assert tally.service_failures() == {}, f"calls failed during a broker outage: {tally.failures}"
    assert during.get("OK", 0) > 0, during
    assert backlog > 0, "the outbox did not grow during the outage: was the broker cut?"
    assert len(orders.orders) > 0
    assert not found, found[:10]


async def backlog_published(database_url: str, org: str, timeout: float) -> float:
    """Seconds until every outbox event of `org` unsent now is marked sent (the load goes on meanwhile)."""
    started = time.monotonic()
    waiting = {e for e, (_, sent) in (await outbox_of(database_url, org)).items() if not sent}
    while True:
        outbox = await outbox_of(database_url, org)
        if not [e for e in waiting if not outbox[e][1]]:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"the backlog of the outage is not published in {timeout} s"
        await asyncio.sleep(0.1)
