"""Variant data from the Catalog, cached: in Redis when INVENTORY_REDIS_URL is set, else in process.

Keys are `variant:{organization_id}:{variant_id}` with a TTL (1 h by default); the
Catalog's `catalog.variant.updated` / `.deleted` events delete them (`invalidate`).
A `:` or `%` inside an id is percent-encoded, so two organizations' keys can never
collide (`org "a:b", variant "c"` vs `org "a", variant "b:c"`); ordinary ids are used as is.

Redis being down must never fail a request: every Redis error is logged (once per
outage), counted on the `redis` circuit breaker, and the cache is skipped (a miss).
While the breaker is open Redis is not even tried, so an outage costs no latency. An
invalidation that fails raises CacheUnavailable instead: its event is retried, or the old
entry would be served until its TTL.

An invalidation also leaves a fence for FENCE seconds (at least the Catalog call's deadline):
a `put` of an answer fetched before the invalidation, arriving after it, would otherwise
bring back what the event just removed (a variant deleted, cached as existing for an hour).
While the fence stands nothing is cached for that variant; the Catalog answers each check.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Protocol

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.breaker import CircuitBreaker

log = logging.getLogger("inventory.cache")


class VariantInfo(msgspec.Struct, frozen=True):
    """What the Catalog says of one variant (ValidateVariantResponse)."""

    exists: bool
    is_active: bool = False
    tracks_inventory: bool = False
    sku: str = ""
    product_name: str = ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(VariantInfo).decode


FENCE = 60.0  # seconds an invalidation keeps answers fetched before it out of the cache


class CacheUnavailable(Exception):
    """An invalidation did not reach the cache: the caller retries it."""


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def cache_key(organization_id: str, variant_id: str) -> str:
    return f"variant:{_escape(organization_id)}:{_escape(variant_id)}"


def fence_key(organization_id: str, variant_id: str) -> str:
    return f"variant-fence:{_escape(organization_id)}:{_escape(variant_id)}"


class VariantCache(Protocol):
    kind: str

    async def get(self, organization_id: str, variant_id: str) -> VariantInfo | None: ...

    async def put(self, organization_id: str, variant_id: str, info: VariantInfo) -> None: ...

    async def invalidate(self, organization_id: str, variant_id: str) -> None: ...

    async def close(self) -> None: ...


class LocalVariantCache:
    """A bounded in-process LRU with the same TTL, for when no Redis is configured."""

    kind = "memory"

    def __init__(self, ttl: float = 3600.0, max_entries: int = 10_000, fence: float = FENCE) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.fence = fence
        self._entries: OrderedDict[str, tuple[float, VariantInfo]] = OrderedDict()
        self._fences: OrderedDict[str, float] = OrderedDict()  # key -> until (in the order set)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, organization_id: str, variant_id: str) -> VariantInfo | None:
        key = cache_key(organization_id, variant_id)
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return hit[1]

    async def put(self, organization_id: str, variant_id: str, info: VariantInfo) -> None:
        key = cache_key(organization_id, variant_id)
        now = time.monotonic()
        while self._fences and next(iter(self._fences.values())) <= now:
            self._fences.popitem(last=False)
        if key in self._fences:
            return
        self._entries[key] = (now + self.ttl, info)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def invalidate(self, organization_id: str, variant_id: str) -> None:
        key = cache_key(organization_id, variant_id)
        self._entries.pop(key, None)
        self._fences.pop(key, None)
        self._fences[key] = time.monotonic() + self.fence

    async def close(self) -> None:
        self._entries.clear()


class RedisVariantCache:
    """The shared cache: every gateway sees what another fetched, and one delete invalidates all."""

    kind = "redis"

    def __init__(self, url: str, breaker: CircuitBreaker, ttl: float = 3600.0, timeout: float = 0.5,
                 max_connections: int = 128, fence: float = FENCE) -> None:
        self.ttl = max(1, int(ttl))
        self.fence = max(1, int(fence))
        self.breaker = breaker
        # One quick retry (a pooled connection may be stale after a Redis restart), no backoff:
        # a cache must answer fast or not at all.
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1),
            max_connections=max_connections)
        # put, unless an invalidation's fence stands (atomic: a fence set meanwhile is seen)
        self._put = self.client.register_script(
            "if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end")

    async def get(self, organization_id: str, variant_id: str) -> VariantInfo | None:
        if not self.breaker.allow():
            return None
        try:
            raw = await self.client.get(cache_key(organization_id, variant_id))
        except (RedisError, OSError) as e:
            self._failed("get", e)
            return None
        self._succeeded()
        if raw is None:
            return None
        try:
            return _decode(raw)
        except msgspec.DecodeError:
            return None  # written by something else: treat as a miss, the next put overwrites it

    async def put(self, organization_id: str, variant_id: str, info: VariantInfo) -> None:
        if not self.breaker.allow():
            return
        try:
            await self._put(keys=[cache_key(organization_id, variant_id), fence_key(organization_id, variant_id)],
                            args=[_encode(info), self.ttl])
        except (RedisError, OSError) as e:
            self._failed("put", e)
            return
        self._succeeded()

    async def invalidate(self, organization_id: str, variant_id: str) -> None:
        """Delete the entry and set its fence, or raise CacheUnavailable. Tried even while the
        breaker is open: a missed delete serves stale data."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(fence_key(organization_id, variant_id), b"1", ex=self.fence)
                pipe.delete(cache_key(organization_id, variant_id))
                await pipe.execute()
        except (RedisError, OSError) as e:
            self._failed("invalidate", e)
            raise CacheUnavailable(f"could not invalidate the cached variant: {type(e).__name__}: {e}") from None
        self._succeeded()

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()

    def _failed(self, op: str, e: BaseException) -> None:
        if self.breaker.failures == 0:
            log.warning("redis %s failed, skipping the cache: %s: %s", op, type(e).__name__, e)
        self.breaker.record_failure(f"{type(e).__name__}: {e}")

    def _succeeded(self) -> None:
        if self.breaker.state != "closed" or self.breaker.failures:
            log.info("redis is reachable again")
        self.breaker.record_success()
