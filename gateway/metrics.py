"""Prometheus metrics of one gateway, and the gRPC interceptor that measures and logs every call.

Each gateway owns a `Metrics` with its own registry (two gateways in one test process
do not mix their numbers); `/metrics` (gateway/http.py) renders it. Values come from
three places:

* the hot path increments them directly: RPCs by method and code (the interceptor),
  reservations by outcome (gateway/flows.py), shard call latency (`MeasuredBridge`),
  AMQP consumption, lag and dead letters (the AMQP consumers);
* the health loop (gateway/health.py) polls what lives elsewhere: the outbox depth and
  the age of its oldest unsent event, reservation expirations (new
  `inventory.reservation.expired` outbox rows), each shard's `ShardStatus`, bridge batches;
* a collector reads the circuit breakers and the Catalog validator at scrape time.

The interceptor also gives every request a request id (the caller's `x-request-id`
metadata, else a generated one) and puts it, with the request's organization_id,
order_id, reservation_id, variant_id and warehouse_id, on every log record emitted
while the request runs (`RequestContextFilter`).
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from actors.messages import Command, Reply
from gateway.breaker import STATE_VALUE, Breakers
from gateway.bridge import ActorBridge, BridgeStats
from gateway.interceptors import UnaryInterceptor

if TYPE_CHECKING:
    from gateway.catalog import VariantValidator

log = logging.getLogger("inventory.requests")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _child(cache: dict[Any, Any], metric: Any, value: object) -> Any:
    """`metric.labels(str(value))`, made once per value: labels() is a lookup under a lock, on
    the hot path of every call."""
    child = cache.get(value)
    if child is None:
        child = cache[value] = metric.labels(str(value))
    return child


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_requests = Counter(
            "inventory_grpc_requests", "gRPC calls handled, by method and status code",
            ["service", "method", "code"], registry=r)
        self.rpc_latency = Histogram(
            "inventory_grpc_request_duration_seconds", "gRPC call latency, by method and status code",
            ["service", "method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.reservations = Counter(
            "inventory_reservations", "ReserveStock outcomes (reserved, replayed, or the rejection code)",
            ["outcome"], registry=r)
        self.expirations = Counter(
            "inventory_reservation_expirations",
            "Reservations expired by their TTL (inventory.reservation.expired events written since start)",
            registry=r)
        self.outbox_unsent = Gauge(
            "inventory_outbox_unsent_events", "Outbox events not yet published", registry=r)
        self.outbox_oldest_age = Gauge(
            "inventory_outbox_oldest_unsent_age_seconds", "Age of the oldest unpublished outbox event (0: none)",
            registry=r)
        self.consumed = Counter(
            "inventory_amqp_consumed_messages", "Incoming AMQP messages, by queue and outcome (ack, retry, dead)",
            ["queue", "outcome"], registry=r)
        self.consumer_lag = Gauge(
            "inventory_amqp_consumer_lag_messages", "Messages waiting in a consumed queue", ["queue"], registry=r)
        self.dead_lettered = Counter(
            "inventory_amqp_dead_lettered_messages", "Incoming messages sent to the dead-letter queue",
            ["queue", "reason"], registry=r)
        self.batch_size = Histogram(
            "inventory_shard_batch_size", "Commands per batch sent to a shard (sampled by the health loop)",
            buckets=BATCH_BUCKETS, registry=r)
        self.shard_call_latency = Histogram(
            "inventory_shard_call_duration_seconds",
            "From handing a command to the bridge to the shard's committed reply (queueing + batch commit)",
            ["shard"], buckets=LATENCY_BUCKETS, registry=r)
        self.resident_stocks = Gauge(
            "inventory_shard_resident_stocks", "Stocks held in a shard's memory", ["shard"], registry=r)
        self.pending_timers = Gauge(
            "inventory_shard_pending_timers", "Reservation expiry timers pending in a shard", ["shard"], registry=r)
        self.shard_up = Gauge(
            "inventory_shard_up", "1 when the shard answered its status and holds its database lock",
            ["shard"], registry=r)
        self.dependency_up = Gauge(
            "inventory_dependency_up", "1 when the last check of a dependency succeeded (-1: not configured)",
            ["dependency"], registry=r)
        self.dependency_latency = Gauge(
            "inventory_dependency_check_latency_seconds", "Latency of the last check of a dependency",
            ["dependency"], registry=r)
        self.reconcile_drift = Gauge(
            "inventory_reconcile_drift_stocks",
            "Stocks whose snapshot differs from their ledger or open reservation lines at the last reconcile "
            "run (-1: no run yet)", registry=r)
        self.reconcile_drift.set(-1)
        self.sweep_runs = Counter(
            "inventory_reservation_sweep_runs",
            "Runs of the overdue reservation sweep made by this gateway (while it holds the sweep lock)", registry=r)
        self.sweep_lines = Counter(
            "inventory_reservation_sweep_lines",
            "Overdue reservation lines the sweep found in Postgres and handed to their shard, by outcome "
            "(expired, unchanged, failed)", ["outcome"], registry=r)
        self.snapshots = SnapshotCollector()
        r.register(self.snapshots)
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._shard_children: dict[Any, Any] = {}
        self._reservation_children: dict[Any, Any] = {}
        self._bridge_seen = 0

    # ------------------------------------------------------------ hot path

    def rpc(self, method: str, code: str, seconds: float) -> None:
        children = self._rpc_children.get((method, code))
        if children is None:
            service, _, name = method.lstrip("/").partition("/")
            children = (self.rpc_requests.labels(service, name, code), self.rpc_latency.labels(service, name, code))
            self._rpc_children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def reservation(self, outcome: str) -> None:
        _child(self._reservation_children, self.reservations, outcome).inc()

    def shard_call(self, shard: int, seconds: float) -> None:
        _child(self._shard_children, self.shard_call_latency, shard).observe(seconds)

    # ------------------------------------------------------------ polled

    def observe_bridge(self, stats: BridgeStats) -> None:
        """Feed the batch-size histogram with the batches sent since the last poll (the last 1,024 at most)."""
        new = stats.batches - self._bridge_seen
        if new <= 0:
            return
        for _ in range(3):  # the bridge thread appends concurrently; a copy may have to be retried
            try:
                sizes = list(stats.batch_sizes)
                break
            except RuntimeError:
                continue
        else:
            return
        self._bridge_seen = stats.batches
        for size in sizes[-new:]:
            self.batch_size.observe(size)


class SnapshotCollector(Collector):
    """Values read at scrape time from objects the gateway holds (breakers, validator, bridge)."""

    def __init__(self) -> None:
        self.breakers: Breakers | None = None
        self.validator: VariantValidator | None = None
        self.bridge: ActorBridge | None = None
        # shard -> (batches, commands, commits, commit seconds) from its ShardStatus
        self.shard_totals: dict[int, tuple[int, int, int, float, int, int]] = {}

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("inventory_circuit_breaker_state",
                                  "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open",
                                  labels=["dependency"])
        failures = GaugeMetricFamily("inventory_circuit_breaker_failures",
                                     "Consecutive failures counted by a dependency's breaker", labels=["dependency"])
        for name, breaker in sorted((self.breakers or {}).items()):
            state.add_metric([name], STATE_VALUE[breaker.state])
            failures.add_metric([name], breaker.failures)
        yield state
        yield failures
        validations = CounterMetricFamily("inventory_catalog_validations",
                                          "Variant validations by the source of the answer (catalog, cache, "
                                          "degraded) or unavailable", labels=["source"])
        if self.validator is not None:
            for source, n in sorted(self.validator.counts.items()):
                validations.add_metric([source], n)
        yield validations
        if self.bridge is not None:
            stats = self.bridge.stats
            yield CounterMetricFamily("inventory_bridge_batches", "Batches the bridge sent to shards",
                                      value=stats.batches)
            yield CounterMetricFamily("inventory_bridge_commands", "Commands the bridge sent to shards",
                                      value=stats.commands)
            yield CounterMetricFamily("inventory_bridge_timeouts", "Batches a shard did not answer in time",
                                      value=stats.timeouts)
        batches = CounterMetricFamily("inventory_shard_batches", "Batches a shard processed (its ShardStatus)",
                                      labels=["shard"])
        commands = CounterMetricFamily("inventory_shard_commands", "Commands a shard processed (its ShardStatus)",
                                       labels=["shard"])
        commit = SummaryMetricFamily("inventory_shard_commit_seconds",
                                     "Time a shard spends committing a batch's transaction (its ShardStatus)",
                                     labels=["shard"])
        merged = CounterMetricFamily(
            "inventory_shard_merged_batches",
            "Gateway batches a shard committed together with another gateway's (its ShardStatus)", labels=["shard"])
        redecided = CounterMetricFamily(
            "inventory_shard_redecided_batches",
            "Batches a shard decided twice because one retried a reservation that had closed (its ShardStatus)",
            labels=["shard"])
        for shard, (b, c, n, seconds, m, r) in sorted(self.shard_totals.items()):
            batches.add_metric([str(shard)], b)
            commands.add_metric([str(shard)], c)
            commit.add_metric([str(shard)], count_value=n, sum_value=seconds)
            merged.add_metric([str(shard)], m)
            redecided.add_metric([str(shard)], r)
        yield batches
        yield commands
        yield commit
        yield merged
        yield redecided


class MeasuredBridge(ActorBridge):
    """The ActorBridge, timing every call from hand-over to the shard's (committed) reply."""

    metrics: Metrics | None = None

    async def call(self, shard: int, command: Command) -> Reply:
        started = time.perf_counter()
        reply = await super().call(shard, command)
        if self.metrics is not None:
            self.metrics.shard_call(shard, time.perf_counter() - started)
        return reply


# ---------------------------------------------------------------- request context and the interceptor

REQUEST_FIELDS = ("organization_id", "order_id", "reservation_id", "variant_id", "warehouse_id")
_ids = itertools.count(1)
_id_prefix = f"{os.getpid():x}-{int(time.time()) & 0xFFFFFF:x}-"
_fields_of: dict[type, tuple[tuple[str, ...], bool]] = {}


class RequestInfo:
    """The running request, for its log lines. The ids are read only when something is logged:
    most successful calls log nothing, and the hot path should not pay for them."""

    __slots__ = ("_ids", "context", "message")

    def __init__(self, message: Any, context: grpc.aio.ServicerContext) -> None:
        self.message = message
        self.context = context
        self._ids: dict[str, str] | None = None

    def ids(self) -> dict[str, str]:
        if self._ids is None:
            self._ids = _request_ids(self.message, self.context)
        return self._ids


request_context: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "inventory_request_context", default=None)


class RequestContextFilter(logging.Filter):
    """Adds the running request's ids to every record that does not carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = request_context.get()
        if info is not None:
            for key, value in info.ids().items():
                if getattr(record, key, None) is None:
                    setattr(record, key, value)
        return True


def install_request_logging() -> None:
    """Put the filter on the root handlers (once): records of every logger pass through them."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestContextFilter) for f in handler.filters):
            handler.addFilter(RequestContextFilter())


_QUIET = {"OK"}
_EXPECTED = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS", "CANCELLED"}
_TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def _request_ids(request: Any, context: grpc.aio.ServicerContext) -> dict[str, str]:
    fields = _fields_of.get(type(request))
    if fields is None:
        names = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
        fields = _fields_of[type(request)] = (tuple(f for f in REQUEST_FIELDS if f in names), "items" in names)
    ids: dict[str, str] = {}
    for key in fields[0]:
        value = getattr(request, key)
        if isinstance(value, str) and value:
            ids[key] = value
    if fields[1] and "variant_id" not in ids and len(request.items) == 1:
        variant = getattr(request.items[0], "variant_id", "")
        if variant:
            ids["variant_id"] = variant
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            request_id = value[:128]
            break
    ids["request_id"] = request_id or f"{_id_prefix}{next(_ids):x}"
    return ids


class RpcInterceptor(UnaryInterceptor):
    """Counts and times unary calls by method and code, and logs them with the request's ids."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def wrap(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        metrics = self.metrics
        short = method.rsplit("/", 1)[-1]

        async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
            info = RequestInfo(request, context)
            request_context.set(info)
            started = time.perf_counter()
            failure: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                failure = e
                raise
            finally:
                elapsed = time.perf_counter() - started
                code = _code_of(context, failure)
                metrics.rpc(method, code, elapsed)
                _log_call(short, code, elapsed, info, context, failure)

        return measured


def _code_of(context: grpc.aio.ServicerContext, failure: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if failure is None:
        return "OK"
    if isinstance(failure, (KeyboardInterrupt, SystemExit)):
        return "UNKNOWN"
    return "CANCELLED" if type(failure).__name__ == "CancelledError" else "UNKNOWN"


def _log_call(method: str, code: str, elapsed: float, info: RequestInfo, context: grpc.aio.ServicerContext,
              failure: BaseException | None) -> None:
    if code in _QUIET:
        level = logging.DEBUG
    elif code in _EXPECTED:
        level = logging.INFO
    elif code in _TRANSIENT:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if not log.isEnabledFor(level):
        return
    details = context.details() if code != "OK" else None
    unexpected = level == logging.ERROR and failure is not None and type(failure).__name__ != "AbortError"
    log.log(level, "rpc %s %s in %.1f ms%s", method, code, elapsed * 1000, f": {details}" if details else "",
            extra=info.ids(), exc_info=failure if unexpected else None)
