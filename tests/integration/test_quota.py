"""Per-organization request quotas: a noisy organization gets RESOURCE_EXHAUSTED while a quiet one,
in the same moment, is served; the token bucket itself on a fake clock.

The service is a real `inventory serve` with INVENTORY_QUOTA_RPS/BURST on a database of its own
(inv_security) and ports of its own.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from conftest import TEST_DATABASE_URL, Service, database_url_named, ensure_database, free_port, running
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from gateway.quota import TokenBuckets
from persistence.migrate import migrate

pytestmark = pytest.mark.timeout(120)
SECURITY_DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_security")
RATE, BURST = 5, 10


@dataclass
class ConfiguredService(Service):
    """A Service of conftest with settings of its own on top of its environment."""

    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return dict(super().env(), **self.extra_env)


async def security_service(log_dir, **extra_env: str) -> ConfiguredService:
    await ensure_database(SECURITY_DATABASE_URL)
    await migrate(SECURITY_DATABASE_URL)
    return ConfiguredService(SECURITY_DATABASE_URL, log_dir, grpc_port=free_port(range(50600, 50700)),
                             actor_port=free_port(range(20300, 20400)), extra_env=extra_env)


@pytest.fixture(scope="module")
async def quota_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    svc = await security_service(tmp_path_factory.mktemp("quota"), INVENTORY_QUOTA_RPS=str(RATE),
                                 INVENTORY_QUOTA_BURST=str(BURST))
    async with running(svc):
        yield svc


async def outcome(call) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return "OK"


async def test_a_noisy_organization_is_limited_and_a_quiet_one_is_served(quota_service):
    noisy, quiet = f"noisy-{uuid.uuid4()}", f"quiet-{uuid.uuid4()}"
    async with grpc.aio.insecure_channel(quota_service.target) as channel:
        admin, inventory = pbg.InventoryAdminServiceStub(channel), pbg.InventoryServiceStub(channel)

        def noisy_call(i: int):
            if i % 2:
                return admin.ListWarehouses(pb.ListWarehousesRequest(organization_id=noisy), timeout=10)
            return inventory.CheckAvailability(pb.AvailabilityRequest(
                organization_id=noisy, items=[pb.AvailabilityItem(variant_id="v", quantity=1)]), timeout=10)

        noisy_calls = [outcome(noisy_call(i)) for i in range(60)]
        quiet_calls = [outcome(admin.ListWarehouses(pb.ListWarehousesRequest(organization_id=quiet), timeout=10))
                       for _ in range(BURST)]
        results = await asyncio.gather(*noisy_calls, *quiet_calls)
        noisy_seen = collections.Counter(results[:60])
        quiet_seen = collections.Counter(results[60:])
        assert quiet_seen == {"OK": BURST}, quiet_seen
        assert noisy_seen["RESOURCE_EXHAUSTED"] >= 60 - BURST - 5, noisy_seen  # 5/s refill over the burst
        assert noisy_seen["OK"] >= BURST - 1, noisy_seen
        assert set(noisy_seen) <= {"OK", "RESOURCE_EXHAUSTED"}, noisy_seen

        # The noisy organization is served again once its bucket refilled.
        await asyncio.sleep(2.5 / RATE)
        assert await outcome(admin.ListWarehouses(pb.ListWarehousesRequest(organization_id=noisy),
                                                  timeout=10)) == "OK"
        # Health has no organization: never limited.
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(3 * BURST):
            await health.Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    now = [0.0]
    buckets = TokenBuckets(rate=2, burst=3, clock=lambda: now[0], max_tracked=2)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")  # another key, its own bucket
    now[0] = 0.5  # one token back
    assert [buckets.take("a") for _ in range(2)] == [True, False]
    now[0] = 100.0  # never more than the burst
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    buckets.take("c")  # a third key: the least recently used ("b") is forgotten
    assert "b" not in buckets._buckets and len(buckets._buckets) == 2
    assert TokenBuckets(rate=0.5, burst=0).burst == 1
    with pytest.raises(ValueError):
        TokenBuckets(rate=0, burst=1)
