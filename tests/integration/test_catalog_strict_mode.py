"""With INVENTORY_CATALOG_DEGRADED_MODE=false, a Catalog outage refuses uncached variants (UNAVAILABLE).

A service of its own (the degraded-mode setting is fixed at start), with no Redis
configured, so this also covers the in-process cache end to end.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from catalog_double import Serve, catalog_double, ensure_ops_database, serving

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(90)


async def test_with_degraded_mode_off_a_catalog_outage_is_unavailable_unless_cached(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    url = await ensure_ops_database()
    org = f"org-{uuid.uuid4()}"
    async with catalog_double() as catalog:
        serve = Serve(url, tmp_path_factory.mktemp("strict"), extra_env={
            "CATALOG_GRPC_HOST": "127.0.0.1", "CATALOG_GRPC_PORT": str(catalog.port),
            "INVENTORY_CATALOG_DEGRADED_MODE": "false"})
        async with serving(serve), grpc.aio.insecure_channel(serve.target) as channel:
            admin = pbg.InventoryAdminServiceStub(channel)
            await admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id="wh1", active=True))
            catalog.double.add(org, "cached")
            catalog.double.add(org, "uncached")

            def receipt(variant: str) -> pb.MovementRequest:
                return pb.MovementRequest(organization_id=org, variant_id=variant, warehouse_id="wh1",
                                          type=pb.MOVEMENT_TYPE_RECEIPT, quantity=1)

            await admin.RecordMovement(receipt("cached"))
            await catalog.stop()

            reply = await admin.RecordMovement(receipt("cached"))
            assert reply.stock.on_hand == 2, "a cached variant needs no Catalog"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.RecordMovement(receipt("uncached"))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert "catalog unavailable" in (refused.value.details() or "")
            levels = await admin.GetStock(pb.GetStockRequest(organization_id=org, variant_id="uncached"))
            assert list(levels.levels) == []

            await catalog.restart()
            deadline = time.monotonic() + 10
            while True:  # the channel reconnects after its backoff (at most 5 s)
                try:
                    catalog_back = await admin.RecordMovement(receipt("uncached"))
                    break
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e.details()
                    await asyncio.sleep(0.05)
            assert catalog_back.stock.on_hand == 1
