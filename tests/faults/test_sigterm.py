"""Fault injection: SIGTERM to `inventory serve` under a mixed load. The service must exit cleanly (code
0, no process left: conftest's Service.stop), no call may end in INTERNAL/UNKNOWN, every call acknowledged
OK must be in Postgres and the invariants must hold; after a start on the same database the
reservations are served again. A summary line is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import TEST_DATABASE_URL, Service, database_url_named, ensure_database, free_port, running
from fault_load import ACTOR_PORTS, GRPC_PORTS, VARIANTS, Tally, prepare, violations, worker

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence.migrate import migrate

pytestmark = pytest.mark.timeout(180)
DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_faults_sigterm")


@pytest.fixture
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    await ensure_database(DATABASE_URL)
    await migrate(DATABASE_URL)
    svc = Service(DATABASE_URL, tmp_path_factory.mktemp("sigterm"), grpc_port=free_port(GRPC_PORTS),
                  actor_port=free_port(ACTOR_PORTS))
    async with running(svc):
        yield svc


async def test_sigterm_under_load_loses_nothing_acknowledged(service):
    org = f"sigterm-{uuid.uuid4()}"
    tally = Tally()
    async with grpc.aio.insecure_channel(service.target) as channel:
        inv, admin = pbg.InventoryServiceStub(channel), pbg.InventoryAdminServiceStub(channel)
        await prepare(admin, org)
        # One reservation the workers never touch, so there is always an open one to find after the restart.
        keeper = await inv.ReserveStock(pb.ReserveStockRequest(
            organization_id=org, order_id="keeper", ttl_seconds=600,
            items=[pb.ReserveItem(variant_id=VARIANTS[0], quantity=1)]), timeout=10)
        tally.outcomes["OK"] += 1
        tally.reserved[keeper.reservation_id] = "active"
        stop = asyncio.Event()
        workers = [asyncio.create_task(worker(stop, tally, inv, admin, org, seed)) for seed in range(4)]
        try:
            await asyncio.sleep(2)
            assert tally.outcomes["OK"] > 0, tally.outcomes
            signalled = time.monotonic()
            code = await service.stop()  # SIGTERM, wait, no process left
            stopped = time.monotonic() - signalled
            await asyncio.sleep(0.5)  # calls against the stopped service
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
    found = await violations(DATABASE_URL, org, tally)
    print(f"\nfaults/sigterm: calls {sum(tally.outcomes.values())}, OK {tally.outcomes['OK']}, "
          f"failed { {k: v for k, v in tally.outcomes.items() if k != 'OK'} }, exit code {code}, "
          f"stopped in {stopped:.2f} s, invariant violations {len(found)}")
    assert code == 0, service.log_tail()
    assert not tally.forbidden, tally.forbidden[:5]
    assert not found, found[:10]

    # A start on the same database serves the acknowledged reservations again.
    await service.start()
    open_ones = [rid for rid, state in tally.reserved.items() if state == "active" and rid not in tally.uncertain]
    assert open_ones, tally.reserved
    async with grpc.aio.insecure_channel(service.target) as channel:
        inv = pbg.InventoryServiceStub(channel)
        for rid in open_ones[:5]:
            await inv.ReleaseReservation(pb.ReleaseRequest(organization_id=org, reservation_id=rid), timeout=10)
            tally.reserved[rid] = "released"
    assert await violations(DATABASE_URL, org, tally) == []
