"""SIGTERM during a load of ReserveStock calls: every acknowledged reservation is in Postgres, and
nothing the service started outlives it.

`inventory serve` runs with a marker in its environment, inherited by every process it
starts (the actor launcher, the daemonized Thespian admin and the shard processes), so
/proc tells whether any of them is left after it exits.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import grpc
import pytest
from catalog_double import Serve, ensure_ops_database, pids_with

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(120)
WORKERS = 48
VARIANTS = 8


async def test_sigterm_during_load_loses_no_acknowledged_reservation_and_leaves_no_process(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    url = await ensure_ops_database()
    serve = Serve(url, tmp_path_factory.mktemp("shutdown"), extra_env={"INVENTORY_SHUTDOWN_GRACE_SECONDS": "10"})
    org = f"org-{uuid.uuid4()}"
    acked: dict[str, float] = {}  # reservation_id -> when its OK reply arrived
    refused: list[str] = []
    sigterm_at = 0.0
    try:
        await serve.start()
        async with grpc.aio.insecure_channel(serve.target) as channel:
            admin, inventory = pbg.InventoryAdminServiceStub(channel), pbg.InventoryServiceStub(channel)
            await admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id="wh1", active=True))
            for v in range(VARIANTS):
                await admin.RecordMovement(pb.MovementRequest(
                    organization_id=org, variant_id=f"v{v}", warehouse_id="wh1", type=pb.MOVEMENT_TYPE_RECEIPT,
                    quantity=1_000_000))

            async def worker(w: int) -> None:
                for i in range(1_000_000):
                    request = pb.ReserveStockRequest(organization_id=org, order_id=f"o-{w}-{i}", ttl_seconds=3600,
                                                     items=[pb.ReserveItem(variant_id=f"v{i % VARIANTS}", quantity=1)])
                    try:
                        reply = await inventory.ReserveStock(request, timeout=20)
                    except grpc.aio.AioRpcError as e:
                        assert sigterm_at, f"a call failed before SIGTERM: {e.code().name} {e.details()}"
                        refused.append(e.code().name)
                        return
                    acked[reply.reservation_id] = time.monotonic()
                    if sigterm_at and time.monotonic() - sigterm_at > 30:
                        raise AssertionError("the service kept accepting calls 30 s after SIGTERM")

            workers = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
            deadline = time.monotonic() + 30
            while len(acked) < 300:
                assert time.monotonic() < deadline, f"only {len(acked)} reservations in 30 s"
                assert not any(t.done() for t in workers), [t.exception() for t in workers if t.done()]
                await asyncio.sleep(0.01)
            sigterm_at = time.monotonic()
            serve.terminate()
            code = await serve.wait(40)
            await asyncio.wait_for(asyncio.gather(*workers), 30)

        assert code == 0, f"inventory serve exited with {code}:\n{serve.log_tail()}"
        assert await serve.leftovers() == [], "processes outlived inventory serve"
        # An orderly stop places no shard anew (the registrar once did, for each shard that exited),
        # and every process of the service, the actor processes too, logs one JSON object per line.
        lines = [ln for ln in serve.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        assert [ln for ln in lines if "goes to node" in ln] == []
        assert [ln for ln in lines if not ln.startswith("{")] == []
        assert any(t > sigterm_at for t in acked.values()), "no in-flight call finished after SIGTERM"
        assert set(refused) <= {"UNAVAILABLE", "CANCELLED"}, refused

        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT r.reservation_id, count(l.*) FILTER (WHERE l.status = 'active') AS active"
                " FROM reservations r LEFT JOIN reservation_lines l"
                "   ON l.organization_id = r.organization_id AND l.reservation_id = r.reservation_id"
                " WHERE r.organization_id = $1 GROUP BY r.reservation_id", org)
        finally:
            await conn.close()
        stored = {r["reservation_id"]: r["active"] for r in rows}
        lost = [rid for rid in acked if stored.get(rid) != 1]
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged reservations are not in Postgres"
    finally:
        serve.kill_leftovers()
        assert pids_with(serve.marker) == []
