"""Fault injection: Postgres goes away for 10 s under a mixed load and comes back, without a restart of
the service. The outage is a TCP proxy this test owns between the service and Postgres (the machine's
Postgres is never stopped): it stops listening and cuts every open connection, then listens again.

During the outage calls must fail (never INTERNAL/UNKNOWN, never hang past their deadline); after it
the service must serve again by itself; at the end the invariants hold: for every stock
reserved = sum of open lines, 0 <= reserved <= on_hand, on_hand/reserved/in_transit = the ledger's sums
(persistence/reconcile.py), and every reservation acknowledged OK is in Postgres.
A summary line is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import grpc
import pytest
from conftest import TEST_DATABASE_URL, Service, database_url_named, ensure_database, free_port, running
from fault_load import ACTOR_PORTS, AUX_PORTS, GRPC_PORTS, Tally, prepare, violations, worker
from tcp_proxy import TcpProxy

from gateway.pb import inventory_pb2_grpc as pbg
from persistence.migrate import migrate

pytestmark = pytest.mark.timeout(180)
DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_faults_postgres")
OUTAGE_SECONDS = 10.0
RECOVERY_LIMIT = 30.0
VARIANTS = [f"v{i}" for i in range(6)]


@pytest.fixture
async def proxied_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Service, TcpProxy]]:
    await ensure_database(DATABASE_URL)
    await migrate(DATABASE_URL)
    pg = urlsplit(DATABASE_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432, free_port(AUX_PORTS))
    await proxy.up()
    via_proxy = DATABASE_URL.replace(f"{pg.hostname}:{pg.port or 5432}", f"127.0.0.1:{proxy.port}", 1)
    assert via_proxy != DATABASE_URL
    svc = Service(via_proxy, tmp_path_factory.mktemp("faults"), grpc_port=free_port(GRPC_PORTS),
                  actor_port=free_port(ACTOR_PORTS))
    try:
        async with running(svc):
            yield svc, proxy
    finally:
        await proxy.down()  # idempotent: also when the test left it down


async def test_postgres_outage_fails_fast_recovers_and_keeps_the_invariants(proxied_service):
    svc, proxy = proxied_service
    org = f"faults-{uuid.uuid4()}"
    tally = Tally()
    async with grpc.aio.insecure_channel(svc.target) as channel:
        inv, admin = pbg.InventoryServiceStub(channel), pbg.InventoryAdminServiceStub(channel)
        await prepare(admin, org)
        stop = asyncio.Event()
        workers = [asyncio.create_task(worker(stop, tally, inv, admin, org, seed)) for seed in range(4)]
        try:
            await asyncio.sleep(2)
            assert tally.outcomes["OK"] > 0, tally.outcomes
            before_outage = dict(tally.outcomes)
            await proxy.down()
            await asyncio.sleep(OUTAGE_SECONDS)
            during = collections.Counter(tally.outcomes)
            during.subtract(before_outage)
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
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)

    found = await violations(DATABASE_URL, org, tally)
    print(f"\nfaults/postgres-outage: calls {sum(tally.outcomes.values())}, OK {tally.outcomes['OK']}, "
          f"failed { {k: v for k, v in tally.outcomes.items() if k != 'OK'} }, during outage "
          f"{dict(during)}, recovery {recovery:.2f} s, slowest call {tally.slowest:.2f} s, "
          f"invariant violations {len(found)}")
    assert not tally.forbidden, tally.forbidden[:5]
    assert sum(v for k, v in during.items() if k != "OK") > 0, f"the outage was not noticed: {during}"
    assert tally.slowest < 6.0, "a call outlived its 5 s deadline"
    assert not found, found[:10]
