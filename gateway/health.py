"""Health, readiness and the periodic checks of one gateway; `Operations` wires them at start-up.

* gRPC health (`grpc.health.v1`) says SERVING only while Postgres answers: a loop checks
  it every `health_interval_seconds` on a connection of its own (a busy pool must not
  look like an outage) and flips the status both ways. Shutdown sets NOT_SERVING for
  good (`Gateway.stop`).
* `/healthz` is liveness: the event loop answers. `/readyz` checks every dependency at
  once, like the spec's `IntegrationHealthCheck`: status, latency, breaker state and
  consecutive failure count each. Postgres and the shards are critical (503 without
  them); RabbitMQ, Redis and the Catalog are not, because the service degrades without
  them (the outbox waits, the cache is skipped, validation degrades), so they make the
  status "degraded", not unready. During shutdown /readyz is 503.
* The same loop polls what /metrics cannot see from here: the outbox backlog, new
  expirations, each shard's ShardStatus and the bridge's batches.

Other parts of the gateway may add their own probe (`HealthMonitor.add_probe`), e.g. the
AMQP consumers reporting their live connection instead of the default connect-and-close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from actors.envelopes import ShardStatus, ShardStatusRequest
from gateway.breaker import Breakers, CircuitBreaker
from gateway.catalog import VariantValidator, build_validator
from gateway.config import Settings
from gateway.flows import Core
from gateway.http import HttpServer, Response
from gateway.variant_cache import LocalVariantCache, RedisVariantCache, VariantCache
from persistence import queries, session

log = logging.getLogger("inventory.health")

Probe = Callable[[], Awaitable[dict[str, Any] | None]]  # raises when unhealthy; may return details
CHECK_TIMEOUT = 3.0
READINESS_REUSE_SECONDS = 0.5  # /readyz hammered by many callers checks the dependencies at most this often
EXPIRED_EVENT = "inventory.reservation.expired"

_json = msgspec.json.Encoder().encode


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ShardProbe:
    """Asks every shard for its ShardStatus through a Thespian context of its own (in a thread)."""

    def __init__(self, context_factory: Callable[[], Any], addresses: list[object], timeout: float = 3.0) -> None:
        self.context_factory = context_factory
        self.addresses = addresses  # the bridge's own list: it follows shards that move
        self.timeout = timeout
        self._lock = asyncio.Lock()

    async def statuses(self) -> dict[int, ShardStatus | None]:
        async with self._lock:  # one context at a time
            return await asyncio.to_thread(self._ask_all)

    def _ask_all(self) -> dict[int, ShardStatus | None]:
        found: dict[int, ShardStatus | None] = {i: None for i in range(len(self.addresses))}
        with self.context_factory() as ctx:
            for address in list(self.addresses):
                if address is not None:  # None: the shard is being moved or recreated
                    ctx.tell(address, ShardStatusRequest())
            deadline = time.monotonic() + self.timeout
            while any(s is None for s in found.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                msg = ctx.listen(left)
                if isinstance(msg, ShardStatus) and msg.shard_id in found:
                    found[msg.shard_id] = msg
        return found


@dataclass
class Dependency:
    name: str
    probe: Probe | None  # None: not configured
    breaker: CircuitBreaker
    critical: bool = False
    closes_breaker: bool = True
    """False when the breaker guards real calls (Catalog validation, the Redis cache): a health check
    that answers proves the server is up, not that those calls work, so only failures are recorded
    and the breaker closes through its own half-open trial call."""
    last_check: float | None = None
    last_success: float | None = None
    latency: float | None = None
    healthy: bool | None = None
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        if self.probe is None:
            status = "disabled"
        else:
            status = "healthy" if self.healthy else "unhealthy"
        out: dict[str, Any] = {
            "service": self.name, "status": status, "critical": self.critical,
            "response_time_ms": None if self.latency is None else round(self.latency * 1000, 2),
            "last_check": _iso(self.last_check), "last_success": _iso(self.last_success),
            "circuit_breaker": self.breaker.state, "failure_count": self.breaker.failures,
        }
        if self.error:
            out["error"] = self.error
        if self.details:
            out.update(self.details)
        return out


class HealthMonitor:
    def __init__(self, settings: Settings, core: Core, shard_probe: ShardProbe, breakers: Breakers,
                 validator: VariantValidator | None, cache: VariantCache) -> None:
        self.settings = settings
        self.core = core
        self.shard_probe = shard_probe
        self.metrics = core.metrics
        self.stopping = False
        self.serving: bool | None = None
        self._pg: asyncpg.Connection | None = None
        self._pg_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._expired_after: int | None = None
        self._checking: asyncio.Future[None] | None = None
        self._checked_at = -1e9
        self.dependencies: dict[str, Dependency] = {}
        self.add_probe("postgres", self._check_postgres, critical=True, breaker=breakers.of("postgres"))
        self.add_probe("shards", self._check_shards, critical=True, breaker=breakers.of("shards"))
        self.add_probe("rabbitmq", self._check_rabbitmq if settings.amqp_url else None,
                       breaker=breakers.of("rabbitmq"))
        redis_probe = None
        if isinstance(cache, RedisVariantCache):
            redis_cache = cache

            async def redis_probe() -> dict[str, Any] | None:
                await redis_cache.ping()
                return None
        self.add_probe("redis", redis_probe, breaker=breakers.of("redis"), closes_breaker=False)
        catalog_probe = None
        if validator is not None:
            client = validator.client

            async def catalog_probe() -> dict[str, Any] | None:
                await client.probe(CHECK_TIMEOUT)
                return {"target": client.target, "degraded_mode": validator.degraded_mode}
        self.add_probe("catalog", catalog_probe, breaker=breakers.of("catalog"), closes_breaker=False)

    def add_probe(self, name: str, probe: Probe | None, *, critical: bool = False,
                  breaker: CircuitBreaker | None = None, closes_breaker: bool = True) -> None:
        """Add or replace the check of a dependency (None: not configured, reported as disabled)."""
        old = self.dependencies.get(name)
        self.dependencies[name] = Dependency(
            name, probe, breaker or (old.breaker if old else CircuitBreaker(name)), critical, closes_breaker)
        if probe is None:
            self.metrics.dependency_up.labels(name).set(-1)

    # ------------------------------------------------------------ checks

    async def check(self, name: str) -> Dependency:
        dep = self.dependencies[name]
        if dep.probe is None:
            return dep
        started = time.perf_counter()
        try:
            details = await asyncio.wait_for(dep.probe(), CHECK_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - any failure makes the dependency unhealthy
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if dep.healthy is not False:
                log.warning("%s is unhealthy: %s", name, error)
            dep.healthy, dep.error = False, error
            dep.breaker.record_failure(error)
        else:
            if dep.healthy is False:
                log.info("%s is healthy again", name)
            dep.healthy, dep.error = True, ""
            dep.details = details or {}
            dep.last_success = time.time()
            if dep.closes_breaker:
                dep.breaker.record_success()
        dep.latency = time.perf_counter() - started
        dep.last_check = time.time()
        self.metrics.dependency_up.labels(name).set(1 if dep.healthy else 0)
        self.metrics.dependency_latency.labels(name).set(dep.latency)
        return dep

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        if not self.stopping:  # while stopping the answer is 503 anyway, with the last known checks
            await self._check_all()
        deps = self.dependencies.values()
        ready = not self.stopping and all(d.healthy for d in deps if d.critical and d.probe is not None)
        degraded = any(d.probe is not None and not d.healthy for d in deps if not d.critical)
        status = "not_ready" if not ready else "degraded" if degraded else "ready"
        return ready, {"status": status, "stopping": self.stopping,
                       "checks": {d.name: d.report() for d in deps}}

    async def _check_all(self) -> None:
        """Check every dependency; concurrent callers share one round, and a fresh round is reused."""
        if time.monotonic() - self._checked_at < READINESS_REUSE_SECONDS:
            return
        if self._checking is None:
            self._checking = asyncio.ensure_future(self._check_round())
        task = self._checking
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._checking is task:
                self._checking = None

    async def _check_round(self) -> None:
        await asyncio.gather(*(self.check(name) for name in self.dependencies))
        self._checked_at = time.monotonic()

    async def _pg_connection(self) -> asyncpg.Connection:
        if self._pg is None or self._pg.is_closed():
            assert self.settings.database_url
            self._pg = await asyncpg.connect(
                self.settings.database_url, timeout=CHECK_TIMEOUT, statement_cache_size=0,
                server_settings=session.settings(self.settings.database_url, "inventory-health"))
        return self._pg

    async def _check_postgres(self) -> dict[str, Any] | None:
        async with self._pg_lock:
            try:
                conn = await self._pg_connection()
                await conn.fetchval("SELECT 1", timeout=CHECK_TIMEOUT)
            except BaseException:
                await self._drop_pg()
                raise
        return None

    async def _drop_pg(self) -> None:
        conn, self._pg = self._pg, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _check_shards(self) -> dict[str, Any] | None:
        statuses = await self.shard_probe.statuses()
        self._record_shards(statuses)
        report = [{"shard": i, "ready": bool(s and s.ready), "resident_stocks": s.resident_stocks if s else None,
                   "error": (s.error if s else "no answer") or None} for i, s in sorted(statuses.items())]
        down = [r["shard"] for r in report if not r["ready"]]
        if down:
            raise RuntimeError(f"shards not ready: {down}")
        return {"shards": report}

    async def _check_rabbitmq(self) -> dict[str, Any] | None:
        import aio_pika

        assert self.settings.amqp_url
        connection = await aio_pika.connect(self.settings.amqp_url, timeout=CHECK_TIMEOUT)
        await connection.close()
        return None

    # ------------------------------------------------------------ the periodic loop

    def start(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        self._task = asyncio.create_task(self._loop(set_serving), name="health-loop")

    async def stop(self) -> None:
        """For shutdown: /readyz says 503 from now on and gRPC health is never set SERVING again."""
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._checking is not None:
            self._checking.cancel()
        async with self._pg_lock:
            await self._drop_pg()

    async def _loop(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        while not self.stopping:
            started = time.monotonic()
            try:
                await self.tick(set_serving)
            except Exception:
                log.exception("health loop iteration failed")
            await asyncio.sleep(max(0.05, self.settings.health_interval_seconds - (time.monotonic() - started)))

    async def tick(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        pg = await self.check("postgres")
        if pg.healthy != self.serving and not self.stopping:
            was, self.serving = self.serving, bool(pg.healthy)
            if not pg.healthy:
                log.error("Postgres is unreachable: gRPC health NOT_SERVING (%s)", pg.error)
            elif was is not None:
                log.info("Postgres is reachable again: gRPC health SERVING")
            await set_serving(self.serving)
        if pg.healthy:
            await self._poll_outbox()
        await self.check("shards")
        self.metrics.observe_bridge(self.core.bridge.stats)

    async def _poll_outbox(self) -> None:
        try:
            async with self._pg_lock:
                conn = await self._pg_connection()
                depth, age = await queries.outbox_backlog(conn)
                if self._expired_after is None:
                    self._expired_after = await queries.outbox_high_water(conn)
                else:
                    expired, self._expired_after = await queries.outbox_events_since(
                        conn, self._expired_after, EXPIRED_EVENT)
                    if expired:
                        self.metrics.expirations.inc(expired)
        except (TimeoutError, OSError, asyncpg.PostgresError) as e:
            log.warning("outbox metrics not updated: %s", e)
            return
        self.metrics.outbox_unsent.set(depth)
        self.metrics.outbox_oldest_age.set(age)

    def _record_shards(self, statuses: dict[int, ShardStatus | None]) -> None:
        m = self.metrics
        for shard, status in statuses.items():
            label = str(shard)
            m.shard_up.labels(label).set(1 if status is not None and status.ready else 0)
            if status is not None:
                m.resident_stocks.labels(label).set(status.resident_stocks)
                m.pending_timers.labels(label).set(status.pending_timers)
                m.snapshots.shard_totals[shard] = (status.batches, status.commands, status.commits,
                                                   status.commit_seconds, status.merged_batches,
                                                   status.redecided_batches)


# ---------------------------------------------------------------- HTTP routes


def routes(monitor: HealthMonitor) -> dict[str, Callable[[], Awaitable[Response]]]:
    registry = monitor.metrics.registry

    async def healthz() -> Response:
        return 200, "application/json", _json({"status": "alive"})

    async def readyz() -> Response:
        ready, body = await monitor.readiness()
        return (200 if ready else 503), "application/json", _json(body)

    async def metrics() -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


# ---------------------------------------------------------------- wiring


@dataclass
class Operations:
    """Everything of issue 4 one gateway runs: breakers, variant validation, health loop, HTTP."""

    breakers: Breakers
    cache: VariantCache
    validator: VariantValidator | None
    monitor: HealthMonitor
    http: HttpServer
    http_port: int

    @classmethod
    async def start(cls, settings: Settings, core: Core, shard_probe: ShardProbe) -> Operations:
        """Build and attach to `core` (validator, breakers); bind the HTTP port. The loop starts later."""
        breakers = Breakers(settings.breaker_failure_threshold, settings.breaker_cooldown_seconds)
        cache: VariantCache
        if settings.redis_url:
            cache = RedisVariantCache(settings.redis_url, breakers.of("redis"), settings.catalog_cache_ttl_seconds)
        else:
            cache = LocalVariantCache(settings.catalog_cache_ttl_seconds, settings.catalog_cache_max_entries)
        validator = build_validator(settings, cache, breakers.of("catalog"))
        core.validator = validator
        core.breakers = breakers
        core.metrics.snapshots.breakers = breakers
        core.metrics.snapshots.validator = validator
        core.metrics.snapshots.bridge = core.bridge
        monitor = HealthMonitor(settings, core, shard_probe, breakers, validator, cache)
        http = HttpServer(routes(monitor), settings.http_host, settings.http_port)
        try:
            port = await http.start()
        except OSError as e:
            await (validator.close() if validator is not None else cache.close())
            raise OSError(f"cannot bind the HTTP port {settings.http_host}:{settings.http_port}: {e}") from e
        log.info("HTTP health and metrics on port %d", port)
        return cls(breakers, cache, validator, monitor, http, port)

    async def close(self) -> None:
        await self.monitor.stop()
        await self.http.close()
        if self.validator is not None:
            await self.validator.close()
        else:
            await self.cache.close()
