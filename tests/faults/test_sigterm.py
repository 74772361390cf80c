"""Fault injection: SIGTERM to `inventory serve` under a mixed load, events on (orders placed and shipped
through events, the relay publishing). The service must exit cleanly (code 0, no process left:
conftest's Service.stop), no call may end in INTERNAL/UNKNOWN, every call acknowledged OK must be in
Postgres and the invariants must hold; after a start on the same database the reservations are served
again, and every committed outbox event is published and seen once per event_id (what the stopping
relay flushed, and what the restarted one publishes). A summary line is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from fault_load import (
    EventOrders,
    EventTap,
    FaultService,
    load,
    ordering,
    scenario_database,
    serve_with_events,
    settle_events,
    summary,
    violations,
)

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(180)
SETTLE_LIMIT = 20.0


@pytest.fixture
async def service(tmp_path) -> AsyncIterator[tuple[FaultService, EventTap]]:
    async with serve_with_events(await scenario_database("sigterm"), tmp_path) as running_service:
        yield running_service


async def test_sigterm_under_load_loses_nothing_acknowledged(service):
    svc, tap = service
    org = f"sigterm-{uuid.uuid4()}"
    orders = EventOrders(tap.prefix, org)
    async with load(svc.target, org) as run, ordering(orders, run.admin):
        tally = run.tally
        # One reservation the workers never touch, so there is always an open one to find after the
        # restart; on a variant of its own (the workers may have reserved all of theirs by now).
        await run.admin.RecordMovement(pb.MovementRequest(
            organization_id=org, variant_id="keeper", warehouse_id="w1", type=pb.MOVEMENT_TYPE_RECEIPT,
            quantity=1, idempotency_key="keeper-receipt"), timeout=10)
        keeper = await run.inv.ReserveStock(pb.ReserveStockRequest(
            organization_id=org, order_id="keeper", ttl_seconds=600,
            items=[pb.ReserveItem(variant_id="keeper", quantity=1)]), timeout=10)
        tally.outcomes["OK"] += 1
        tally.reserved[keeper.reservation_id] = "active"
        signalled = time.monotonic()
        code = await svc.stop()  # SIGTERM, wait, no process left
        stopped = time.monotonic() - signalled
        await asyncio.sleep(0.5)  # calls against the stopped service
    found = await violations(svc.database_url, org, tally)
    assert code == 0, svc.log_tail()
    assert not tally.forbidden, tally.forbidden[:5]
    assert not found, found[:10]

    # A start on the same database serves the acknowledged reservations again, and publishes what is left.
    await svc.start()
    open_ones = [rid for rid, state in tally.reserved.items() if state == "active" and rid not in tally.uncertain]
    assert open_ones, tally.reserved
    async with grpc.aio.insecure_channel(svc.target) as channel:
        inv = pbg.InventoryServiceStub(channel)
        for rid in open_ones[:5]:
            await inv.ReleaseReservation(pb.ReleaseRequest(organization_id=org, reservation_id=rid), timeout=10)
            tally.reserved[rid] = "released"
    found = await violations(svc.database_url, org, tally)
    event_found, redelivered, drain = await settle_events(svc.database_url, org, tap, orders, SETTLE_LIMIT)
    found += event_found
    summary("sigterm", tally, None, found, exit_code=code, stopped_in=f"{stopped:.2f} s",
            events_delivered=len(tap.deliveries), redeliveries=redelivered, orders_via_events=len(orders.orders),
            events_settled_in=f"{drain:.2f} s")
    assert not found, found[:10]
