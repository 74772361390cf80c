"""The operator's view of a running service: /healthz, /readyz, /metrics, request logs, the dashboard.

One `inventory serve` for the module with every dependency configured: Postgres, the
shards, RabbitMQ (queues under a prefix of these tests' own), Redis and the Catalog double.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from catalog_double import RunningCatalog, Serve, catalog_double, ensure_ops_database, http_get, serving
from prometheus_client.parser import text_string_to_metric_families

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence.store import SHARD_LOCK_NAMESPACE

pytestmark = pytest.mark.timeout(90)
DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "inventory.json"
DEPENDENCIES = ("postgres", "shards", "rabbitmq", "redis", "catalog")
T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def catalog() -> AsyncIterator[RunningCatalog]:
    async with catalog_double() as running:
        yield running


@pytest.fixture(scope="module")
async def service(catalog: RunningCatalog, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Serve]:
    url = await ensure_ops_database()
    serve = Serve(url, tmp_path_factory.mktemp("health"), extra_env={
        "CATALOG_GRPC_HOST": "127.0.0.1", "CATALOG_GRPC_PORT": str(catalog.port),
        "INVENTORY_REDIS_URL": "redis://127.0.0.1:6379/0",
        "INVENTORY_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/", "INVENTORY_AMQP_PREFIX": "ops-health-tests.",
        "INVENTORY_BREAKER_COOLDOWN_SECONDS": "0.5"})
    async with serving(serve):
        yield serve


@pytest.fixture(scope="module")
async def channel(service: Serve) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(service.target) as ch:
        yield ch


@pytest.fixture
async def shop(channel: grpc.aio.Channel, catalog: RunningCatalog) -> tuple[str, pbg.InventoryAdminServiceStub,
                                                                            pbg.InventoryServiceStub]:
    """A fresh organization with warehouse wh1 and 5 units of v1 (a Catalog variant)."""
    org = f"org-{uuid.uuid4()}"
    admin, inventory = pbg.InventoryAdminServiceStub(channel), pbg.InventoryServiceStub(channel)
    catalog.double.add(org, "v1")
    await admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id="wh1", active=True))
    await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id="v1", warehouse_id="wh1",
                                                  type=pb.MOVEMENT_TYPE_RECEIPT, quantity=5))
    return org, admin, inventory


async def readyz(service: Serve) -> tuple[int, dict[str, Any]]:
    status, headers, body = await http_get(service.http + "/readyz")
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


async def metrics(service: Serve) -> dict[str, float]:
    """Every sample as 'name{label="v",...}' (labels sorted) -> value."""
    status, headers, body = await http_get(service.http + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), (status, headers)
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items() if k.split("{", 1)[0] == name and all(w in k for w in want))


# ---------------------------------------------------------------- /healthz and /readyz


async def test_healthz_says_the_process_is_alive(service: Serve) -> None:
    status, headers, body = await http_get(service.http + "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "alive"})
    assert headers["connection"] == "close"


async def test_readyz_reports_each_dependency_with_latency_breaker_and_failures(service: Serve) -> None:
    status, body = await readyz(service)
    assert (status, body["status"], body["stopping"]) == (200, "ready", False), body
    assert set(body["checks"]) == set(DEPENDENCIES)
    for name in DEPENDENCIES:
        check = body["checks"][name]
        assert check["status"] == "healthy", check
        assert check["response_time_ms"] >= 0 and check["last_success"], check
        assert (check["circuit_breaker"], check["failure_count"]) == ("closed", 0), check
    assert body["checks"]["postgres"]["critical"] and body["checks"]["shards"]["critical"]
    assert [s["ready"] for s in body["checks"]["shards"]["shards"]] == [True, True]


async def test_readyz_stays_ready_but_degraded_while_the_catalog_is_down(
        service: Serve, catalog: RunningCatalog) -> None:
    await catalog.stop()
    try:
        async def catalog_checked_down() -> tuple[int, dict[str, Any]] | None:
            status, body = await readyz(service)  # a round of checks is reused for 0.5 s
            return (status, body) if body["checks"]["catalog"]["status"] != "healthy" else None

        status, body = await eventually(catalog_checked_down, 5, "the Catalog check failed")
        check = body["checks"]["catalog"]
        assert (status, body["status"]) == (200, "degraded"), body
        assert check["status"] == "unhealthy" and check["failure_count"] >= 1 and "UNAVAILABLE" in check["error"]
    finally:
        await catalog.restart()

    async def healthy_again() -> bool:
        return (await readyz(service))[1]["checks"]["catalog"]["status"] == "healthy"

    await eventually(healthy_again, 15, "the Catalog check healthy after a restart")


async def test_http_refuses_other_paths_and_methods(service: Serve) -> None:
    assert (await http_get(service.http + "/nope"))[0] == 404
    assert (await http_get(service.http + "/healthz", method="POST"))[0] == 405
    status, _, body = await http_get(service.http + "/metrics", method="HEAD")
    assert (status, body) == (200, b"")


# ---------------------------------------------------------------- /metrics


async def test_metrics_count_rpcs_and_reservations_by_outcome(
        service: Serve, shop: tuple[str, pbg.InventoryAdminServiceStub, pbg.InventoryServiceStub]) -> None:
    org, _, inventory = shop
    before = await metrics(service)
    await inventory.ReserveStock(pb.ReserveStockRequest(
        organization_id=org, order_id="ok", items=[pb.ReserveItem(variant_id="v1", quantity=2)]))
    with pytest.raises(grpc.aio.AioRpcError):
        await inventory.ReserveStock(pb.ReserveStockRequest(
            organization_id=org, order_id="short", items=[pb.ReserveItem(variant_id="v1", quantity=99)]))
    # The interceptor counts a call once its status is sent: the client can ask /metrics first.
    deadline = time.monotonic() + 10
    while True:
        after = await metrics(service)
        failed = total(after, "inventory_grpc_requests_total", method="ReserveStock", code="FAILED_PRECONDITION")
        if failed > total(before, "inventory_grpc_requests_total", method="ReserveStock",
                          code="FAILED_PRECONDITION") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("inventory_grpc_requests_total", method="ReserveStock", code="OK") == 1
    assert grew("inventory_grpc_requests_total", method="ReserveStock", code="FAILED_PRECONDITION") == 1
    assert grew("inventory_grpc_request_duration_seconds_count", method="ReserveStock") == 2
    assert grew("inventory_reservations_total", outcome="reserved") == 1
    assert grew("inventory_reservations_total", outcome="insufficient_stock") == 1
    assert grew("inventory_shard_call_duration_seconds_count") >= 2
    assert total(after, "inventory_catalog_validations_total", source="catalog") >= 1


async def test_metrics_show_shards_bridge_outbox_dependencies_and_breakers(
        service: Serve, shop: tuple[str, pbg.InventoryAdminServiceStub, pbg.InventoryServiceStub]) -> None:
    async def polled() -> dict[str, float] | None:
        m = await metrics(service)
        ok = (total(m, "inventory_shard_resident_stocks") >= 1 and total(m, "inventory_shard_batch_size_count") >= 1
              and total(m, "inventory_shard_commands_total") >= 1
              and all(f'inventory_dependency_up{{dependency="{dep}"}}' in m for dep in DEPENDENCIES))
        return m if ok else None

    # The health loop checks Postgres and the shards; the other dependencies are checked by a
    # readiness request (a kubelet's probe). Run alone, this test must make one itself.
    assert (await readyz(service))[0] == 200
    m = await eventually(polled, 10, "the health loop polled the shards, the bridge and every dependency")
    assert total(m, "inventory_shard_up") == 2
    assert total(m, "inventory_bridge_batches_total") >= 1
    for name in ("inventory_outbox_unsent_events", "inventory_outbox_oldest_unsent_age_seconds"):
        assert any(k.startswith(name + "{") for k in m), name
    for dep in DEPENDENCIES:
        assert m[f'inventory_dependency_up{{dependency="{dep}"}}'] == 1, dep
    for dep in ("catalog", "redis", "postgres"):
        assert m[f'inventory_circuit_breaker_state{{dependency="{dep}"}}'] == 0, dep


async def test_each_postgres_session_of_the_service_says_what_it_is(service: Serve) -> None:
    """In pg_stat_activity an operator tells the shards (each holding its advisory lock), the
    gateway's pool, the relay and the health checks apart by their application_name."""
    assert (await readyz(service))[0] == 200  # (the health checks' own connection is opened by a check)
    conn = await asyncpg.connect(service.database_url)
    try:
        async def named() -> set[str] | None:
            rows = await conn.fetch("SELECT application_name FROM pg_stat_activity WHERE datname = current_database()")
            names = {r[0] for r in rows}
            wanted = {"inventory-shard-0", "inventory-shard-1", "inventory-gateway", "inventory-relay",
                      "inventory-health"}
            return names if wanted <= names else None

        names = await eventually(named, 10, "every session of the service named")
        # the shards' sessions are the ones holding the shard locks
        holders = await conn.fetch(
            "SELECT a.application_name, l.objid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.classid = $1 AND a.datname = current_database()",
            SHARD_LOCK_NAMESPACE)
        assert sorted((r[0], r[1]) for r in holders) == [("inventory-shard-0", 0), ("inventory-shard-1", 1)], names
    finally:
        await conn.close()


async def test_an_expired_reservation_is_counted(
        service: Serve, shop: tuple[str, pbg.InventoryAdminServiceStub, pbg.InventoryServiceStub]) -> None:
    org, _, inventory = shop
    before = total(await metrics(service), "inventory_reservation_expirations_total")
    await inventory.ReserveStock(pb.ReserveStockRequest(
        organization_id=org, order_id="brief", ttl_seconds=1, items=[pb.ReserveItem(variant_id="v1", quantity=1)]))

    async def counted() -> bool:
        return total(await metrics(service), "inventory_reservation_expirations_total") >= before + 1

    await eventually(counted, 15, "the expiration counted")


async def test_the_dashboard_only_plots_metrics_the_service_exports(
        service: Serve, shop: tuple[str, pbg.InventoryAdminServiceStub, pbg.InventoryServiceStub]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"\binventory_\w+", e)}
    _, _, body = await http_get(service.http + "/metrics")
    exported = set()
    for family in text_string_to_metric_families(body.decode()):  # families without samples yet count too
        exported |= {family.name, family.name + "_total"} | {s.name for s in family.samples}
    assert used - exported == set(), "the dashboard plots metrics nobody exports"
    for required in ("inventory_grpc_requests_total", "inventory_grpc_request_duration_seconds",
                     "inventory_reservations_total", "inventory_reservation_expirations_total",
                     "inventory_outbox_unsent_events", "inventory_outbox_oldest_unsent_age_seconds",
                     "inventory_amqp_consumer_lag_messages", "inventory_amqp_dead_lettered_messages_total",
                     "inventory_shard_batch_size", "inventory_shard_call_duration_seconds",
                     "inventory_shard_resident_stocks", "inventory_circuit_breaker_state"):
        assert required in used, f"the dashboard does not plot {required}"


# ---------------------------------------------------------------- request logs


async def test_request_logs_carry_the_request_id_and_the_domain_ids(
        service: Serve, shop: tuple[str, pbg.InventoryAdminServiceStub, pbg.InventoryServiceStub]) -> None:
    org, admin, inventory = shop
    request_id = f"req-{uuid.uuid4()}"
    with pytest.raises(grpc.aio.AioRpcError):
        await inventory.ReserveStock(pb.ReserveStockRequest(
            organization_id=org, order_id="o-77", items=[pb.ReserveItem(variant_id="v1", quantity=999)]),
            metadata=(("x-request-id", request_id),))
    with pytest.raises(grpc.aio.AioRpcError):
        await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id="ghost", warehouse_id="wh1",
                                                      type=pb.MOVEMENT_TYPE_RECEIPT, quantity=1))

    def logged(**fields: str) -> dict[str, Any] | None:
        return next((r for r in service.log_records() if r.get("logger") == "inventory.requests"
                     and all(r.get(k) == v for k, v in fields.items())), None)

    async def both_logged() -> tuple[dict[str, Any], dict[str, Any]] | None:
        a, b = logged(request_id=request_id), logged(organization_id=org, variant_id="ghost")
        return (a, b) if a and b else None

    reserve, movement = await eventually(both_logged, 5, "the request log lines")
    assert (reserve["organization_id"], reserve["order_id"], reserve["variant_id"]) == (org, "o-77", "v1")
    assert "FAILED_PRECONDITION" in reserve["msg"] and reserve["level"] == "info"
    assert "NOT_FOUND" in movement["msg"] and movement["warehouse_id"] == "wh1" and movement["request_id"]
