"""Variant validation against the Catalog Service, behind a cache and a circuit breaker.

Before a stock movement the gateway asks whether the variant exists, is active and
tracks inventory (shared/spec/integrations.md, "Integración con Catalog Service").
The order of the answer's sources follows the spec's "Graceful Degradation":

1. the cache (Redis or the in-process LRU): source `cache`;
2. the Catalog over gRPC, unless its breaker is open: source `catalog` (and cached);
3. neither: with degraded mode on (the default) the operation is allowed as if the
   variant were valid, with source `degraded` in the ledger and the log; with it off,
   the caller gets `CatalogUnavailable` (UNAVAILABLE at the gRPC edge).

The client keeps ONE long-lived channel (not one per call as in the spec's sketch);
the spec's retry policy (UNAVAILABLE and DEADLINE_EXCEEDED, 3 attempts, 0.1 s to 1 s
exponential backoff) is the channel's service config, and every call has a 5 s deadline
that covers all its attempts. A call that fails after its retries counts once on the
breaker. "Not found" answers are not cached, so a variant created a moment later is
seen at once; positive answers are, and the Catalog's update/delete events invalidate them.

This module knows nothing of the edges: `gateway.flows.Core.check_variant` turns a
`Validation` into the domain's FlowErrors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.breaker import CircuitBreaker
from gateway.config import Settings
from gateway.pb import catalog_pb2, catalog_pb2_grpc
from gateway.variant_cache import LocalVariantCache, RedisVariantCache, VariantCache, VariantInfo

log = logging.getLogger("inventory.catalog")

NAMES_LOCAL_TTL = 300.0  # seconds the relay keeps names without a shared (invalidated) cache
CATALOG_SERVICE = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name


def service_config(timeout: float) -> str:
    """The spec's retry policy ("Rate Limiting & Retry Logic") as a gRPC service config.

    The deadline is NOT in it: each call passes `timeout` itself, which covers all its attempts. With
    grpcio 1.85 a service-config `timeout` under about 2 s failed every call at once with
    DEADLINE_EXCEEDED (tests/faults/test_catalog_hang.py shows it), so INVENTORY_CATALOG_TIMEOUT_SECONDS=1
    turned every validation into a failure. `timeout` is kept as a parameter for the callers."""
    del timeout
    return json.dumps({
        "methodConfig": [{
            "name": [{"service": CATALOG_SERVICE}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "DEADLINE_EXCEEDED"],
            },
        }],
    })


class CatalogUnavailable(Exception):
    """The Catalog could not answer (after retries), or its breaker is open."""


class CatalogRefused(CatalogUnavailable):
    """The Catalog answered, with an error that is not an outage (PERMISSION_DENIED,
    INVALID_ARGUMENT, ...): the variant is not validated, and not taken as valid either (no
    degraded mode), and the breaker does not count it (one tenant's refusals would open it
    for every tenant)."""


# gRPC codes that mean the Catalog could not answer, as opposed to answered no
OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                          grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})


class CatalogClient:
    """One grpc.aio channel to the Catalog for the life of the gateway."""

    def __init__(self, target: str, timeout: float = 5.0) -> None:
        self.target = target
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.service_config", service_config(timeout)),
            ("grpc.enable_retries", 1),
            # Reconnect soon after an outage, so a half-open trial finds the channel ready.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
            ("grpc.max_receive_message_length", 10 * 1024 * 1024),
        ])
        self.stub = catalog_pb2_grpc.CatalogServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def validate(self, organization_id: str, variant_id: str) -> VariantInfo:
        """Raises CatalogUnavailable when the Catalog did not answer; NOT_FOUND means "does not exist"."""
        request = catalog_pb2.ValidateVariantRequest(organization_id=organization_id, variant_id=variant_id)
        try:
            reply = await self.stub.ValidateVariant(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return VariantInfo(exists=False)
            if e.code() not in OUTAGE_CODES:
                raise CatalogRefused(f"the catalog refused to validate: {e.code().name}: {e.details()}") from None
            raise CatalogUnavailable(f"{e.code().name}: {e.details()}") from None
        return VariantInfo(exists=reply.exists, is_active=reply.is_active, tracks_inventory=reply.tracks_inventory,
                           sku=reply.sku, product_name=reply.product_name)

    async def probe(self, timeout: float = 3.0) -> None:
        """A readiness probe: the standard health service; a Catalog without one still answered."""
        try:
            await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise CatalogUnavailable(f"{e.code().name}: {e.details()}") from None

    async def close(self) -> None:
        await self.channel.close()


@dataclass(frozen=True)
class Validation:
    info: VariantInfo
    source: str  # "catalog", "cache" or "degraded"


DEGRADED = VariantInfo(exists=True, is_active=True, tracks_inventory=True)


class VariantValidator:
    """cache → Catalog (behind its breaker) → degraded mode or CatalogUnavailable."""

    def __init__(self, client: CatalogClient, cache: VariantCache, breaker: CircuitBreaker, *,
                 degraded_mode: bool = True) -> None:
        self.client = client
        self.cache = cache
        self.breaker = breaker
        self.degraded_mode = degraded_mode
        self.counts: dict[str, int] = {"catalog": 0, "cache": 0, "degraded": 0, "unavailable": 0}
        self.last_latency = 0.0

    async def check(self, organization_id: str, variant_id: str) -> Validation:
        cached = await self.cache.get(organization_id, variant_id)
        if cached is not None:
            return self._count(Validation(cached, "cache"))
        if self.breaker.allow():
            started = time.perf_counter()
            try:
                info = await self.client.validate(organization_id, variant_id)
            except CatalogRefused as e:
                self.breaker.record_success()  # (it answered)
                self.counts["unavailable"] += 1
                log.warning("%s: refusing", e, extra={"organization_id": organization_id, "variant_id": variant_id})
                raise
            except CatalogUnavailable as e:
                self.breaker.record_failure(str(e))
                why = str(e)
            else:
                self.last_latency = time.perf_counter() - started
                self.breaker.record_success()
                if info.exists:
                    await self.cache.put(organization_id, variant_id, info)
                return self._count(Validation(info, "catalog"))
        else:
            why = "circuit breaker open"
        ids = {"organization_id": organization_id, "variant_id": variant_id}
        if self.degraded_mode:
            log.warning("catalog unavailable (%s): variant not validated, source degraded", why, extra=ids)
            return self._count(Validation(DEGRADED, "degraded"))
        self.counts["unavailable"] += 1
        log.warning("catalog unavailable (%s) and degraded mode is off: refusing", why, extra=ids)
        raise CatalogUnavailable(f"catalog unavailable ({why}); retry later")

    async def invalidate(self, organization_id: str, variant_id: str) -> None:
        """For the consumer of catalog.variant.updated / catalog.variant.deleted."""
        await self.cache.invalidate(organization_id, variant_id)

    async def close(self) -> None:
        await self.client.close()
        await self.cache.close()

    def _count(self, validation: Validation) -> Validation:
        self.counts[validation.source] += 1
        return validation


def build_validator(settings: Settings, cache: VariantCache, breaker: CircuitBreaker) -> VariantValidator | None:
    """The validator, or None (logged once, here at start-up) when no Catalog is configured."""
    if not settings.catalog_host or not settings.catalog_port:
        if settings.catalog_host or settings.catalog_port:
            log.warning("variant validation is OFF: set both CATALOG_GRPC_HOST and CATALOG_GRPC_PORT "
                        "(got host %r, port %r)", settings.catalog_host, settings.catalog_port)
        else:
            log.info("variant validation is off: CATALOG_GRPC_HOST and CATALOG_GRPC_PORT are unset")
        return None
    target = f"{settings.catalog_host}:{settings.catalog_port}"
    log.info("validating variants against the Catalog at %s (%s cache, degraded mode %s)", target, cache.kind,
             "on" if settings.catalog_degraded_mode else "off")
    return VariantValidator(CatalogClient(target, settings.catalog_timeout_seconds), cache, breaker,
                            degraded_mode=settings.catalog_degraded_mode)


class VariantNames:
    """The sku and product name of a variant, for the events that carry them (`low_level`,
    filled in by the outbox relay): the shared cache, else the Catalog, else "" (the event is
    published without them rather than held). After the Catalog did not answer, it is not asked
    again for `quiet` seconds (a breaker that opens at the first failure), so a backlog of
    events never waits on it one by one."""

    def __init__(self, client: CatalogClient, cache: VariantCache, *, timeout: float = 2.0,
                 quiet: float = 30.0) -> None:
        self.client = client
        self.cache = cache
        self.timeout = timeout
        self.quiet = quiet
        self.breaker = CircuitBreaker("relay-catalog", threshold=1, cooldown=quiet)

    @classmethod
    def build(cls, settings: Settings, breaker: CircuitBreaker) -> VariantNames | None:
        """None when no Catalog is configured. The cache is the gateways' Redis if there is one
        (fenced and invalidated like theirs), else a short-lived one of its own."""
        if not settings.catalog_host or not settings.catalog_port:
            return None
        cache: VariantCache
        if settings.redis_url:
            cache = RedisVariantCache(settings.redis_url, breaker, settings.catalog_cache_ttl_seconds)
        else:  # not invalidated by the Catalog's events: kept briefly
            cache = LocalVariantCache(min(settings.catalog_cache_ttl_seconds, NAMES_LOCAL_TTL), 10_000)
        client = CatalogClient(f"{settings.catalog_host}:{settings.catalog_port}",
                               min(settings.catalog_timeout_seconds, 2.0))
        return cls(client, cache, timeout=client.timeout)

    async def of(self, organization_id: str, variant_id: str, deadline: float | None = None) -> tuple[str, str]:
        """`deadline` (monotonic): the Catalog is asked only if a whole call fits before it (a
        slow Catalog that never fails must not hold a batch of events either)."""
        cached = await self.cache.get(organization_id, variant_id)
        if cached is not None:
            return cached.sku, cached.product_name
        # (the deadline first: a breaker that lets a call through counts on hearing how it went)
        if (deadline is not None and deadline - time.monotonic() < self.timeout) or not self.breaker.allow():
            return "", ""
        try:
            info = await asyncio.wait_for(self.client.validate(organization_id, variant_id), self.timeout + 1.0)
        except (CatalogUnavailable, TimeoutError) as e:
            self.breaker.record_failure(str(e) or type(e).__name__)
            log.warning("variant names: the Catalog did not answer (%s); events go without sku and product name "
                        "for %.0f s", e or type(e).__name__, self.quiet)
            return "", ""
        self.breaker.record_success()
        if info.exists:
            await self.cache.put(organization_id, variant_id, info)
        return info.sku, info.product_name

    async def close(self) -> None:
        await self.client.close()
        await self.cache.close()
