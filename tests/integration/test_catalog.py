"""Variant validation against a real grpc.aio Catalog (the test double), with the machine's Redis.

Every test uses its own organization id, so keys never collide with another test's or
another engineer's. The Redis-down test runs a Redis of its own and kills it; the
machine's Redis is never stopped.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import redis.asyncio as aioredis
from catalog_double import RunningCatalog, catalog_double

from gateway.breaker import CircuitBreaker
from gateway.catalog import (
    CatalogClient,
    CatalogRefused,
    CatalogUnavailable,
    VariantValidator,
    service_config,
)
from gateway.variant_cache import (
    CacheUnavailable,
    LocalVariantCache,
    RedisVariantCache,
    VariantInfo,
    cache_key,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def poll(probe: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def org() -> str:
    return f"org-{uuid.uuid4()}"


@pytest.fixture
async def catalog() -> AsyncIterator[RunningCatalog]:
    async with catalog_double() as running:
        yield running


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


def validator_for(catalog: RunningCatalog | str, *, redis_url: str | None = REDIS_URL, degraded: bool = True,
                  cooldown: float = 30.0, timeout: float = 5.0) -> VariantValidator:
    target = catalog if isinstance(catalog, str) else catalog.target
    cache = (RedisVariantCache(redis_url, CircuitBreaker("redis", 5, cooldown)) if redis_url
             else LocalVariantCache(ttl=3600))
    return VariantValidator(CatalogClient(target, timeout), cache, CircuitBreaker("catalog", 5, cooldown),
                            degraded_mode=degraded)


@pytest.fixture
async def validator(catalog: RunningCatalog) -> AsyncIterator[VariantValidator]:
    v = validator_for(catalog)
    yield v
    await v.close()


# ---------------------------------------------------------------- cache: hit, miss, invalidation


async def test_a_validated_variant_is_cached_in_redis_under_its_key_for_an_hour(
        catalog: RunningCatalog, validator: VariantValidator, redis_client: aioredis.Redis, org: str) -> None:
    catalog.double.add(org, "v1", sku="SKU-1", product_name="Shirt")
    first = await validator.check(org, "v1")
    assert first.source == "catalog"
    assert first.info == VariantInfo(exists=True, is_active=True, tracks_inventory=True, sku="SKU-1",
                                     product_name="Shirt")
    assert await redis_client.exists(f"variant:{org}:v1") == 1
    assert 3590 <= await redis_client.ttl(f"variant:{org}:v1") <= 3600

    second = await validator.check(org, "v1")
    assert (second.source, second.info) == ("cache", first.info)
    assert catalog.double.calls == 1, "a cache hit must not call the Catalog"


async def test_a_miss_asks_the_catalog_and_unknown_variants_are_not_cached(
        catalog: RunningCatalog, validator: VariantValidator, redis_client: aioredis.Redis, org: str) -> None:
    missing = await validator.check(org, "nope")
    assert (missing.source, missing.info.exists) == ("catalog", False)
    assert await redis_client.exists(f"variant:{org}:nope") == 0
    # created in the Catalog a moment later: seen at once, no stale "does not exist"
    catalog.double.add(org, "nope")
    assert (await validator.check(org, "nope")).info.exists
    assert catalog.double.calls == 2


async def test_invalidation_by_a_catalog_event_makes_the_next_check_ask_the_catalog(
        catalog: RunningCatalog, validator: VariantValidator, redis_client: aioredis.Redis, org: str) -> None:
    catalog.double.add(org, "v1")
    assert (await validator.check(org, "v1")).info.is_active
    catalog.double.add(org, "v1", is_active=False)  # catalog.variant.updated
    assert (await validator.check(org, "v1")).source == "cache", "still cached until the event is handled"

    await validator.invalidate(org, "v1")
    assert await redis_client.exists(f"variant:{org}:v1") == 0
    after = await validator.check(org, "v1")
    assert (after.source, after.info.is_active) == ("catalog", False)


async def test_cache_keys_of_two_organizations_never_collide() -> None:
    assert cache_key("acme", "var_789") == "variant:acme:var_789"
    assert cache_key("a:b", "c") != cache_key("a", "b:c")


async def test_without_redis_the_cache_is_a_bounded_lru_with_a_ttl(org: str) -> None:
    cache = LocalVariantCache(ttl=3600, max_entries=3)
    info = VariantInfo(exists=True, is_active=True, tracks_inventory=True)
    for v in ("a", "b", "c"):
        await cache.put(org, v, info)
    assert await cache.get(org, "a") == info  # "a" is now the most recently used
    await cache.put(org, "d", info)
    assert len(cache) == 3
    assert await cache.get(org, "b") is None, "the least recently used entry is evicted"
    assert await cache.get(org, "a") == info

    short = LocalVariantCache(ttl=0.05)
    await short.put(org, "x", info)
    deadline = time.monotonic() + 2
    while await short.get(org, "x") is not None:
        assert time.monotonic() < deadline, "the entry did not expire"
        await asyncio.sleep(0.01)


async def test_with_no_redis_configured_the_validator_caches_in_process(catalog: RunningCatalog, org: str) -> None:
    validator = validator_for(catalog, redis_url=None)
    try:
        catalog.double.add(org, "v1")
        assert (await validator.check(org, "v1")).source == "catalog"
        assert (await validator.check(org, "v1")).source == "cache"
        await validator.invalidate(org, "v1")
        assert (await validator.check(org, "v1")).source == "catalog"
    finally:
        await validator.close()


# ---------------------------------------------------------------- retries, breaker, degraded mode


async def test_the_channel_retries_unavailable_three_times_per_call(catalog: RunningCatalog, org: str) -> None:
    config = service_config(5.0)
    assert '"maxAttempts": 3' in config and '"UNAVAILABLE"' in config and '"DEADLINE_EXCEEDED"' in config
    client = CatalogClient(catalog.target)
    try:
        catalog.double.fail_with = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(CatalogUnavailable):
            await client.validate(org, "v1")
        assert catalog.double.calls == 3
        catalog.double.fail_with = grpc.StatusCode.INTERNAL  # not retryable
        with pytest.raises(CatalogUnavailable):
            await client.validate(org, "v1")
        assert catalog.double.calls == 4
    finally:
        await client.close()


async def test_the_breaker_opens_after_five_failures_and_closes_after_a_successful_trial(
        catalog: RunningCatalog, org: str) -> None:
    validator = validator_for(catalog, cooldown=0.3)
    try:
        catalog.double.add(org, "v1")
        catalog.double.fail_with = grpc.StatusCode.UNAVAILABLE
        for i in range(5):
            assert validator.breaker.state == "closed", f"opened after {i} failures"
            assert (await validator.check(org, "v1")).source == "degraded"
        assert validator.breaker.state == "open"
        assert catalog.double.calls == 15, "five calls of three attempts each"

        assert (await validator.check(org, "v1")).source == "degraded"
        assert catalog.double.calls == 15, "an open breaker must not call the Catalog"

        catalog.double.fail_with = None
        sources: list[str] = []

        async def recovered() -> bool:
            sources.append((await validator.check(org, "v1")).source)
            return sources[-1] == "catalog"

        await poll(recovered, 5, "a successful trial after the cool-down")
        assert validator.breaker.state == "closed" and validator.breaker.failures == 0
        assert set(sources[:-1]) <= {"degraded"}
        assert (await validator.check(org, "v1")).source == "cache"
    finally:
        await validator.close()


async def test_a_failed_trial_opens_the_breaker_again() -> None:
    clock = [0.0]
    breaker = CircuitBreaker("catalog", threshold=5, cooldown=10, clock=lambda: clock[0])
    for _ in range(5):
        assert breaker.allow()
        breaker.record_failure("boom")
    assert (breaker.state, breaker.allow()) == ("open", False)
    clock[0] = 10.0
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow(), "only one trial while half-open"
    breaker.record_failure("still down")
    assert (breaker.state, breaker.allow()) == ("open", False)
    clock[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert (breaker.state, breaker.failures, breaker.allow()) == ("closed", 0, True)


async def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    breaker = CircuitBreaker("x", threshold=5)
    for _ in range(4):
        breaker.record_failure()
    breaker.record_success()
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"


async def test_a_cached_variant_is_served_while_the_catalog_is_down(catalog: RunningCatalog, org: str) -> None:
    validator = validator_for(catalog)
    try:
        catalog.double.add(org, "v1", is_active=False)
        await validator.check(org, "v1")
        await catalog.stop()
        cached = await validator.check(org, "v1")
        assert (cached.source, cached.info.is_active) == ("cache", False)
    finally:
        await validator.close()


async def test_degraded_mode_allows_an_uncached_variant_when_the_catalog_is_unreachable(org: str) -> None:
    nobody = f"127.0.0.1:{_free_port()}"
    validator = validator_for(nobody, degraded=True)
    try:
        result = await validator.check(org, "v1")
        assert (result.source, result.info.exists, result.info.is_active) == ("degraded", True, True)
        assert validator.breaker.failures == 1
    finally:
        await validator.close()


async def test_with_degraded_mode_off_an_unreachable_catalog_is_unavailable(org: str) -> None:
    nobody = f"127.0.0.1:{_free_port()}"
    validator = validator_for(nobody, degraded=False)
    try:
        with pytest.raises(CatalogUnavailable):
            await validator.check(org, "v1")
    finally:
        await validator.close()


async def test_a_slow_catalog_fails_the_call_at_its_deadline(catalog: RunningCatalog, org: str) -> None:
    validator = validator_for(catalog, degraded=False, timeout=0.3)
    try:
        catalog.double.delay = 2.0
        started = time.monotonic()
        with pytest.raises(CatalogUnavailable, match="DEADLINE_EXCEEDED"):
            await validator.check(org, "v1")
        assert time.monotonic() - started < 1.5
    finally:
        catalog.double.delay = 0.0
        await validator.close()


# ---------------------------------------------------------------- Redis stopped


@pytest.fixture
def own_redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A Redis of this test's own (never the machine's), killed at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("own redis-server did not start") from None
                time.sleep(0.02)
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


async def test_redis_going_down_never_fails_a_validation(
        catalog: RunningCatalog, own_redis: tuple[subprocess.Popen[bytes], str], org: str) -> None:
    proc, url = own_redis
    validator = validator_for(catalog, redis_url=url)
    try:
        catalog.double.add(org, "v1")
        await validator.check(org, "v1")
        assert (await validator.check(org, "v1")).source == "cache"
        proc.kill()
        proc.wait(5)

        started = time.monotonic()
        for _ in range(8):
            result = await validator.check(org, "v1")
            assert (result.source, result.info.is_active) == ("catalog", True), "the cache is skipped"
        assert time.monotonic() - started < 3
        cache = validator.cache
        assert isinstance(cache, RedisVariantCache)
        assert cache.breaker.state == "open", "Redis failures open its breaker: no more waiting on it"
        # An invalidation, though, says it failed: its event is retried (a lost one would leave
        # the old entry in Redis, served until its TTL once Redis is back).
        with pytest.raises(CacheUnavailable):
            await validator.invalidate(org, "v1")
    finally:
        await validator.close()


# ---------------------------------------------------------------- invalidation races, refusals


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_an_answer_fetched_before_an_invalidation_is_not_cached_after_it(
        catalog: RunningCatalog, org: str, kind: str) -> None:
    """A check is waiting on the Catalog when the variant is deleted and its event invalidates the
    cache; the answer from before the delete must not be cached (it would pass for an hour)."""
    validator = validator_for(catalog, redis_url=REDIS_URL if kind == "redis" else None)
    try:
        catalog.double.add(org, "v1")
        catalog.double.delay = 0.5
        check = asyncio.ensure_future(validator.check(org, "v1"))
        await asyncio.sleep(0.2)  # the call is out (its answer may be from before the change) ...
        await validator.invalidate(org, "v1")  # ... when the change's event is handled
        assert (await check).source == "catalog"
        catalog.double.delay = 0.0
        assert await validator.cache.get(org, "v1") is None, "an answer from before the event was cached after it"
        catalog.double.add(org, "v1", is_active=False)
        after = await validator.check(org, "v1")
        assert (after.source, after.info.is_active) == ("catalog", False)
    finally:
        await validator.close()


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_the_fence_of_an_invalidation_ends(org: str, kind: str) -> None:
    cache = (RedisVariantCache(REDIS_URL, CircuitBreaker("redis", 5, 30), fence=1) if kind == "redis"
             else LocalVariantCache(fence=0.5))
    try:
        info = VariantInfo(exists=True, is_active=True, tracks_inventory=True)
        await cache.invalidate(org, "v1")
        await cache.put(org, "v1", info)
        assert await cache.get(org, "v1") is None
        await asyncio.sleep(1.2)
        await cache.put(org, "v1", info)
        assert await cache.get(org, "v1") == info
    finally:
        await cache.close()


async def test_an_invalidation_that_cannot_reach_redis_raises_so_that_its_event_is_retried(org: str) -> None:
    cache = RedisVariantCache(f"redis://127.0.0.1:{_free_port()}/0", CircuitBreaker("redis", 5, 30), timeout=0.2)
    try:
        with pytest.raises(CacheUnavailable):
            await cache.invalidate(org, "v1")
    finally:
        await cache.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT])
async def test_a_catalog_that_refuses_is_not_an_outage(catalog: RunningCatalog, org: str,
                                                       code: grpc.StatusCode) -> None:
    """Not validated, not taken as valid (degraded mode is for outages), and not counted on the
    breaker: one tenant's refusals must not open it for every tenant."""
    validator = validator_for(catalog, degraded=True)
    try:
        catalog.double.fail_with = code
        for _ in range(6):
            with pytest.raises(CatalogRefused):
                await validator.check(org, "v1")
        assert validator.breaker.state == "closed" and validator.breaker.failures == 0
        catalog.double.fail_with = None
        assert (await validator.check(org, "unknown")).info.exists is False  # not degraded: asked
    finally:
        await validator.close()
