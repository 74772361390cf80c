"""The online reconciler: no drift after a normal workload; a drift injected behind the service's back
(UPDATE stocks on a stock the service never touches afterwards) is reported by `inventory reconcile`,
by the gateway's background job as inventory_reconcile_drift_stocks and by a log line — and repaired
by nobody.

The service is a real `inventory serve` (reconcile every 0.3 s) on a database of its own (inv_security).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import psutil
import pytest
from conftest import (
    INVENTORY,
    TEST_DATABASE_URL,
    Service,
    database_url_named,
    ensure_database,
    eventually,
    free_port,
    running,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence import reconcile
from persistence.migrate import migrate

pytestmark = pytest.mark.timeout(120)
SECURITY_DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_security")


@dataclass
class ConfiguredService(Service):
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return dict(super().env(), **self.extra_env)


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    await ensure_database(SECURITY_DATABASE_URL)
    await migrate(SECURITY_DATABASE_URL)
    svc = ConfiguredService(SECURITY_DATABASE_URL, tmp_path_factory.mktemp("reconcile"),
                            grpc_port=free_port(range(50600, 50700)), actor_port=free_port(range(20300, 20400)),
                            extra_env={"INVENTORY_RECONCILE_INTERVAL_SECONDS": "0.3"})
    async with running(svc):
        yield svc


@pytest.fixture
async def conn() -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(SECURITY_DATABASE_URL, timeout=10)
    try:
        yield c
    finally:
        await c.close()


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


async def metrics_text(svc: Service) -> str:
    """/metrics of the serve process, whose HTTP port is 0 (any): found among its listening sockets."""
    assert svc.process is not None
    ports = {c.laddr.port for c in psutil.Process(svc.process.pid).net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port != svc.grpc_port}
    for port in sorted(ports):
        text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
        if text and "inventory_reconcile_drift_stocks" in text:
            return text
    raise AssertionError(f"no /metrics among the listening ports {ports}")


async def drift_gauge(svc: Service) -> float:
    for family in text_string_to_metric_families(await metrics_text(svc)):
        if family.name == "inventory_reconcile_drift_stocks":
            return family.samples[0].value
    raise AssertionError("inventory_reconcile_drift_stocks not exported")


def cli_reconcile(organization: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env.update(INVENTORY_DATABASE_URL=SECURITY_DATABASE_URL, INVENTORY_LOG_LEVEL="CRITICAL")
    return subprocess.run([str(INVENTORY), "reconcile", "--organization", organization], check=False, env=env,
                          capture_output=True, text=True, timeout=60)


async def workload(admin: pbg.InventoryAdminServiceStub, inventory: pbg.InventoryServiceStub, org: str) -> None:
    """Receipts, an issue, an adjustment, reservations confirmed/released/open, a transfer shipped and received."""
    for w in ("w1", "w2"):
        await admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id=w, name=w, active=True))
    for v in ("a", "b", "c"):
        await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id=v, warehouse_id="w1",
                                                      type=pb.MOVEMENT_TYPE_RECEIPT, quantity=20))
    await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id="a", warehouse_id="w1",
                                                  type=pb.MOVEMENT_TYPE_ISSUE, quantity=2))
    await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id="b", warehouse_id="w1",
                                                  type=pb.MOVEMENT_TYPE_ADJUSTMENT, quantity=-3))
    rids = []
    for i in range(4):
        reply = await inventory.ReserveStock(pb.ReserveStockRequest(
            organization_id=org, order_id=f"o{i}", items=[pb.ReserveItem(variant_id="a", quantity=1),
                                                          pb.ReserveItem(variant_id="b", quantity=2)]))
        rids.append(reply.reservation_id)
    await inventory.ConfirmReservation(pb.ConfirmRequest(organization_id=org, reservation_id=rids[0]))
    await inventory.ConfirmReservation(pb.ConfirmRequest(organization_id=org, reservation_id=rids[1]))
    await inventory.ReleaseReservation(pb.ReleaseRequest(organization_id=org, reservation_id=rids[1]))
    await inventory.ReleaseReservation(pb.ReleaseRequest(organization_id=org, reservation_id=rids[2]))
    await admin.TransferStock(pb.TransferRequest(organization_id=org, variant_id="a", from_warehouse_id="w1",
                                                 to_warehouse_id="w2", quantity=3, transfer_id="t1"))
    await admin.TransferStock(pb.TransferRequest(organization_id=org, variant_id="b", from_warehouse_id="w1",
                                                 to_warehouse_id="w2", quantity=1, transfer_id="t2"))
    await admin.ReceiveTransfer(pb.ReceiveTransferRequest(organization_id=org, transfer_id="t1"))


async def test_no_drift_after_a_workload_and_an_injected_drift_is_reported_not_repaired(service, conn):
    org = f"reconcile-{uuid.uuid4()}"
    async with grpc.aio.insecure_channel(service.target) as channel:
        await workload(pbg.InventoryAdminServiceStub(channel), pbg.InventoryServiceStub(channel), org)

    clean = await reconcile.check(conn, org)
    assert clean.stocks >= 4 and clean.drifts == (), clean
    done = await asyncio.to_thread(cli_reconcile, org)
    assert done.returncode == 0 and "0 drifting" in done.stdout, done
    # The gauge counts every organization of the database (earlier runs may have left drift behind).
    baseline = len((await reconcile.check(conn)).drifts)
    await eventually(lambda: _equals(drift_gauge(service), baseline), timeout=20, what="gauge at baseline")

    # Behind the service's back, on variant "c" (only ever received, never touched again).
    await conn.execute("UPDATE stocks SET on_hand = on_hand + 1 WHERE organization_id = $1 AND variant_id = 'c' "
                       "AND warehouse_id = 'w1'", org)
    try:
        found = await reconcile.check(conn, org)
        assert [(d.variant_id, d.warehouse_id, d.on_hand, d.ledger_on_hand) for d in found.drifts] == [
            ("c", "w1", 21, 20)], found
        assert found.drifts[0].describe() == "on_hand 21 but ledger 20"
        done = await asyncio.to_thread(cli_reconcile, org)
        assert done.returncode == 1, done
        assert f"drift\t{org}\tc\tw1\ton_hand 21 but ledger 20" in done.stdout, done.stdout
        await eventually(lambda: _equals(drift_gauge(service), baseline + 1), timeout=20, what="gauge +1")
        await eventually(lambda: _logged(service, org), timeout=20, what="a drift log line")
        # Nothing repaired it.
        await asyncio.sleep(1)
        assert await conn.fetchval("SELECT on_hand FROM stocks WHERE organization_id = $1 AND variant_id = 'c'",
                                   org) == 21
    finally:
        await conn.execute("UPDATE stocks SET on_hand = on_hand - 1 WHERE organization_id = $1 "
                           "AND variant_id = 'c' AND warehouse_id = 'w1'", org)
    assert (await reconcile.check(conn, org)).drifts == ()


async def _equals(value, expected: float) -> bool:
    return await value == expected


async def _logged(svc: Service, org: str) -> bool:
    return any("stock drift" in line and org in line for line in svc.log_tail(2000).splitlines())


async def test_with_several_gateways_one_reconciles_and_another_takes_over() -> None:
    """Each run scans the ledger: two gateways' jobs on one database must not both run it."""
    url = database_url_named(TEST_DATABASE_URL, "inv_reconcile_lock")
    await ensure_database(url)
    await migrate(url)
    pools = [await asyncpg.create_pool(url, min_size=1, max_size=2) for _ in range(2)]
    runs = [0, 0]

    def counter(i: int):  # type: ignore[no-untyped-def]
        def on_report(report: reconcile.Report) -> None:
            runs[i] += 1
        return on_report

    jobs = [asyncio.create_task(reconcile.run_periodically(p, 0.1, counter(i))) for i, p in enumerate(pools)]
    try:
        await eventually(lambda: _value(max(runs) >= 5), timeout=20, what="reconcile runs")
        assert min(runs) == 0, runs  # one owner; the other never ran
        owner = runs.index(max(runs))
        jobs[owner].cancel()
        await asyncio.gather(jobs[owner], return_exceptions=True)  # it releases the lock
        other = 1 - owner
        await eventually(lambda: _value(runs[other] >= 3), timeout=20, what="the other gateway takes over")
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        for p in pools:
            await p.close()


async def _value(value: object) -> object:
    return value
