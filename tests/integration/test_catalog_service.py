"""Variant validation through the real service: `inventory serve` asks the Catalog double.

One service for the module (its own database and ports), with Redis as the cache and a
short breaker cool-down; each test uses its own organization.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from catalog_double import RunningCatalog, Serve, catalog_double, ensure_ops_database, serving

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
async def catalog() -> AsyncIterator[RunningCatalog]:
    async with catalog_double() as running:
        yield running


@pytest.fixture(scope="module")
async def service(catalog: RunningCatalog, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Serve]:
    url = await ensure_ops_database()
    serve = Serve(url, tmp_path_factory.mktemp("catalog-service"), extra_env={
        "CATALOG_GRPC_HOST": "127.0.0.1", "CATALOG_GRPC_PORT": str(catalog.port),
        "INVENTORY_REDIS_URL": "redis://127.0.0.1:6379/0", "INVENTORY_BREAKER_COOLDOWN_SECONDS": "0.5"})
    async with serving(serve):
        yield serve


@pytest.fixture(scope="module")
async def admin(service: Serve) -> AsyncIterator[pbg.InventoryAdminServiceStub]:
    async with grpc.aio.insecure_channel(service.target) as channel:
        yield pbg.InventoryAdminServiceStub(channel)


@pytest.fixture(scope="module")
async def inventory(service: Serve) -> AsyncIterator[pbg.InventoryServiceStub]:
    async with grpc.aio.insecure_channel(service.target) as channel:
        yield pbg.InventoryServiceStub(channel)


@pytest.fixture
async def org(admin: pbg.InventoryAdminServiceStub, catalog: RunningCatalog) -> AsyncIterator[str]:
    """A fresh organization with warehouses wh1 and wh2; the Catalog healthy again afterwards."""
    organization = f"org-{uuid.uuid4()}"
    for wh in ("wh1", "wh2"):
        await admin.UpsertWarehouse(pb.Warehouse(organization_id=organization, warehouse_id=wh, active=True))
    yield organization
    catalog.double.fail_with = None


def movement(org: str, variant: str, quantity: int = 10, kind: int = pb.MOVEMENT_TYPE_RECEIPT,
             warehouse: str = "wh1") -> pb.MovementRequest:
    return pb.MovementRequest(organization_id=org, variant_id=variant, warehouse_id=warehouse, type=kind,
                              quantity=quantity)


async def sources(admin: pbg.InventoryAdminServiceStub, org: str, variant: str) -> list[str]:
    """The ledger source of each movement in order ("created", the stock record's birth, has none)."""
    reply = await admin.ListMovements(pb.ListMovementsRequest(organization_id=org, variant_id=variant))
    return [m.source for m in reversed(reply.movements) if m.type != "created"]


async def expect(call: object, code: grpc.StatusCode) -> str:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()}"
        return e.details() or ""
    raise AssertionError(f"expected {code.name}, got a reply")


async def test_movements_of_a_catalog_variant_record_where_the_answer_came_from(
        admin: pbg.InventoryAdminServiceStub, catalog: RunningCatalog, org: str) -> None:
    catalog.double.add(org, "v1")
    await admin.RecordMovement(movement(org, "v1", 10))
    await admin.RecordMovement(movement(org, "v1", 3, pb.MOVEMENT_TYPE_ISSUE))
    await admin.RecordMovement(movement(org, "v1", -1, pb.MOVEMENT_TYPE_ADJUSTMENT))
    assert await sources(admin, org, "v1") == ["catalog", "cache", "cache"]


async def test_a_movement_of_a_variant_the_catalog_does_not_know_is_not_found(
        admin: pbg.InventoryAdminServiceStub, org: str) -> None:
    details = await expect(admin.RecordMovement(movement(org, "ghost")), grpc.StatusCode.NOT_FOUND)
    assert details == "variant ghost does not exist"
    reply = await admin.GetStock(pb.GetStockRequest(organization_id=org, variant_id="ghost"))
    assert list(reply.levels) == [], "no stock record was created"


async def test_inactive_or_untracked_variants_refuse_movements_and_transfers(
        admin: pbg.InventoryAdminServiceStub, catalog: RunningCatalog, org: str) -> None:
    catalog.double.add(org, "off", is_active=False)
    catalog.double.add(org, "untracked", tracks_inventory=False)
    assert "inactive" in await expect(admin.RecordMovement(movement(org, "off")),
                                      grpc.StatusCode.FAILED_PRECONDITION)
    assert "does not track inventory" in await expect(
        admin.RecordMovement(movement(org, "untracked", kind=pb.MOVEMENT_TYPE_RETURN)),
        grpc.StatusCode.FAILED_PRECONDITION)
    await expect(admin.TransferStock(pb.TransferRequest(
        organization_id=org, variant_id="off", from_warehouse_id="wh1", to_warehouse_id="wh2", quantity=1)),
        grpc.StatusCode.FAILED_PRECONDITION)


async def test_a_transfer_of_a_valid_variant_goes_through(
        admin: pbg.InventoryAdminServiceStub, catalog: RunningCatalog, org: str) -> None:
    catalog.double.add(org, "v1")
    await admin.RecordMovement(movement(org, "v1", 5))
    reply = await admin.TransferStock(pb.TransferRequest(
        organization_id=org, variant_id="v1", from_warehouse_id="wh1", to_warehouse_id="wh2", quantity=2))
    assert (reply.source.on_hand, reply.destination.in_transit) == (3, 2)


async def test_reservations_never_call_the_catalog(
        admin: pbg.InventoryAdminServiceStub, inventory: pbg.InventoryServiceStub, catalog: RunningCatalog,
        org: str) -> None:
    catalog.double.add(org, "v1")
    await admin.RecordMovement(movement(org, "v1", 10))
    calls = catalog.double.calls
    catalog.double.fail_with = grpc.StatusCode.UNAVAILABLE
    reply = await inventory.ReserveStock(pb.ReserveStockRequest(
        organization_id=org, order_id="o1", items=[pb.ReserveItem(variant_id="v1", quantity=4)]))
    assert reply.success
    await inventory.ConfirmReservation(pb.ConfirmRequest(organization_id=org, reservation_id=reply.reservation_id))
    await inventory.CheckAvailability(pb.AvailabilityRequest(
        organization_id=org, items=[pb.AvailabilityItem(variant_id="v1", quantity=1)]))
    assert catalog.double.calls == calls


async def test_with_the_catalog_down_an_uncached_variant_moves_in_degraded_mode(
        admin: pbg.InventoryAdminServiceStub, catalog: RunningCatalog, service: Serve, org: str) -> None:
    catalog.double.fail_with = grpc.StatusCode.UNAVAILABLE
    reply = await admin.RecordMovement(movement(org, "new-variant", 7))
    assert reply.stock.on_hand == 7
    assert await sources(admin, org, "new-variant") == ["degraded"]
    logged = [r for r in service.log_records()
              if r.get("logger") == "inventory.catalog" and r.get("organization_id") == org]
    assert logged and logged[0]["variant_id"] == "new-variant" and "degraded" in logged[0]["msg"], logged


async def test_variant_validation_is_announced_once_at_start(service: Serve) -> None:
    said = [r["msg"] for r in service.log_records() if r.get("logger") == "inventory.catalog"
            and r["msg"].startswith("validating variants")]
    assert len(said) == 1 and f"127.0.0.1:{service.extra_env['CATALOG_GRPC_PORT']}" in said[0], said
