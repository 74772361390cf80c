"""What the fault scenarios share: the mixed load, the invariant checks, the summary line, and the
ways to run the service (a whole `inventory serve`, or the Procfile's `actors` + `gateway` processes).

Ports of this directory (conftest's free_port; no other test directory uses them): gRPC 50700-50799,
Thespian admin 20400-20499, everything else (TCP proxies, the Catalog double, HTTP) 50800-50899.
Each scenario has a database of its own, `inv_faults_<scenario>` (one service per database: shard locks);
`scenario_database` drops and creates it afresh, so no outbox relay ever sees another run's events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import grpc
from conftest import (
    TEST_DATABASE_URL,
    Service,
    database_url_named,
    drop_database,
    ensure_database,
    free_port,
    running,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))  # the Catalog double lives there
from catalog_double import RunningCatalog, catalog_double, http_get

from gateway import amqp
from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence import reconcile
from persistence.migrate import migrate

VARIANTS = [f"v{i}" for i in range(6)]
GRPC_PORTS = range(50700, 50800)
ACTOR_PORTS = range(20400, 20500)
AUX_PORTS = range(50800, 50900)
AMQP_URL = os.environ.get("INVENTORY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
FIRST_RETRY = 0.2  # the services' first retry delay, seconds
AMQP_HOST, AMQP_PORT = urlsplit(AMQP_URL).hostname or "127.0.0.1", urlsplit(AMQP_URL).port or 5672
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# Client channels reconnect quickly after the server went away (the default backoff starts at 1 s and
# grows to 120 s, which would measure the client, not the service).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]
# Outcomes that are answers about the stock, not failures of the service: insufficient stock (a
# reservation or an issue), a confirm of something already released.
BUSINESS_CODES = frozenset({"FAILED_PRECONDITION"})


@dataclass
class Tally:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    forbidden: list[str] = field(default_factory=list)
    slowest: float = 0.0
    slowest_of: collections.Counter[str] = field(default_factory=collections.Counter)  # op -> slowest (ms)
    reserved: dict[str, str] = field(default_factory=dict)  # reservation id -> last OK state
    uncertain: set[str] = field(default_factory=set)  # a confirm/release failed: it may have committed
    received: dict[str, tuple[str, int]] = field(default_factory=dict)  # OK receipt reference -> (variant, qty)
    details: dict[str, str] = field(default_factory=dict)  # code -> one message of it
    failures: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)  # op, code, details
    restored: float = float("inf")  # when the fault ended
    recovered: float | None = None  # when the first call started after that succeeded
    marks: dict[str, collections.Counter[str]] = field(default_factory=dict)

    failure_marks: dict[str, collections.Counter[tuple[str, str, str]]] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        """Remember the outcomes so far, for `since(name)` and `service_failures(since=name)`."""
        self.marks[name] = collections.Counter(self.outcomes)
        self.failure_marks[name] = collections.Counter(self.failures)

    def since(self, name: str) -> dict[str, int]:
        delta = collections.Counter(self.outcomes)
        delta.subtract(self.marks[name])
        return {k: v for k, v in delta.items() if v}

    def failed(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if k != "OK"}

    def service_failures(self, since: str | None = None) -> dict[str, int]:
        """Failures that are not answers about the stock (BUSINESS_CODES), by code; all of them, or those
        after a mark."""
        failures = collections.Counter(self.failures)
        if since is not None:
            failures.subtract(self.failure_marks[since])
        found: collections.Counter[str] = collections.Counter()
        for (_, code, _), n in failures.items():
            if n > 0 and code not in BUSINESS_CODES:
                found[code] += n
        return dict(found)


async def call(tally: Tally, what: str, coro) -> object | None:
    started = time.monotonic()
    try:
        reply = await coro
    except grpc.aio.AioRpcError as e:
        tally.outcomes[e.code().name] += 1
        tally.details.setdefault(e.code().name, f"{what}: {e.details()}")
        tally.failures[(what, e.code().name, e.details() or "")] += 1
        if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            tally.forbidden.append(f"{what}: {e.code().name}: {e.details()}")
        return None
    finally:
        took = time.monotonic() - started
        tally.slowest = max(tally.slowest, took)
        tally.slowest_of[what] = max(tally.slowest_of[what], int(took * 1000))
    tally.outcomes["OK"] += 1
    if started >= tally.restored and tally.recovered is None:
        tally.recovered = time.monotonic()
    return reply


async def worker(stop: asyncio.Event, tally: Tally, inv: pbg.InventoryServiceStub,
                 admin: pbg.InventoryAdminServiceStub, org: str, seed: int) -> None:
    rnd = random.Random(seed)
    while not stop.is_set():
        op = rnd.choices(["receive", "reserve", "confirm", "release"], [2, 4, 2, 2])[0]
        if op == "receive":
            ref, variant, quantity = str(uuid.uuid4()), rnd.choice(VARIANTS), rnd.randint(1, 5)
            if await call(tally, op, admin.RecordMovement(pb.MovementRequest(
                    organization_id=org, variant_id=variant, warehouse_id="w1", reference_id=ref,
                    type=pb.MOVEMENT_TYPE_RECEIPT, quantity=quantity), timeout=5)) is not None:
                tally.received[ref] = (variant, quantity)
        elif op == "reserve":
            items = [pb.ReserveItem(variant_id=v, quantity=rnd.randint(1, 3)) for v in rnd.sample(VARIANTS, 2)]
            reply = await call(tally, op, inv.ReserveStock(pb.ReserveStockRequest(
                organization_id=org, order_id=str(uuid.uuid4()), items=items, ttl_seconds=600), timeout=5))
            if reply is not None:
                tally.reserved[reply.reservation_id] = "active"  # type: ignore[attr-defined]
        elif tally.reserved:
            rid = rnd.choice(list(tally.reserved))
            if tally.reserved[rid] == "released":
                continue
            if op == "confirm":
                if await call(tally, op, inv.ConfirmReservation(pb.ConfirmRequest(
                        organization_id=org, reservation_id=rid), timeout=5)) is not None:
                    tally.reserved[rid] = "confirmed"
                else:
                    tally.uncertain.add(rid)
            elif await call(tally, op, inv.ReleaseReservation(pb.ReleaseRequest(
                    organization_id=org, reservation_id=rid), timeout=5)) is not None:
                tally.reserved[rid] = "released"
            else:
                tally.uncertain.add(rid)
        await asyncio.sleep(0.01)


async def prepare(admin: pbg.InventoryAdminServiceStub, org: str) -> None:
    await admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id="w1", name="w1", active=True))
    for v in VARIANTS:
        await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id=v, warehouse_id="w1",
                                                      type=pb.MOVEMENT_TYPE_RECEIPT, quantity=50))


@dataclass
class Load:
    """A running mixed load against one target (see `load`)."""

    tally: Tally
    channel: grpc.aio.Channel
    inv: pbg.InventoryServiceStub
    admin: pbg.InventoryAdminServiceStub
    org: str


@contextlib.asynccontextmanager
async def load(target: str, org: str, workers: int = 4, *, warm_up: float = 2.0,
               prepared: bool = False) -> AsyncIterator[Load]:
    """`workers` closed-loop workers of the mixed load on `target` for the body of the `with`; before it,
    the organization's warehouse and stocks (unless `prepared`) and `warm_up` seconds of load, which must
    have had successes."""
    tally = Tally()
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        inv, admin = pbg.InventoryServiceStub(channel), pbg.InventoryAdminServiceStub(channel)
        if not prepared:
            await prepare(admin, org)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(worker(stop, tally, inv, admin, org, seed)) for seed in range(workers)]
        try:
            await asyncio.sleep(warm_up)
            assert tally.outcomes["OK"] > 0, f"no successful call while warming up: {tally.outcomes} {tally.details}"
            yield Load(tally, channel, inv, admin, org)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


async def served_again(admin: pbg.InventoryAdminServiceStub, org: str, deadline: float) -> set[str]:
    """Poll GetStock of every variant until each answered once, or until `deadline` (monotonic); returns
    the variants that never answered."""
    pending = set(VARIANTS)
    while pending and time.monotonic() < deadline:
        for v in sorted(pending):
            try:
                await admin.GetStock(pb.GetStockRequest(organization_id=org, variant_id=v), timeout=2)
                pending.discard(v)
            except grpc.aio.AioRpcError:
                pass
        await asyncio.sleep(0.1)
    return pending


async def sources(database_url: str, org: str) -> dict[str, tuple[str, float]]:
    """reference id -> (ledger source, wall time) of every receipt of `org` made by the load."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT reference_id, source, extract(epoch FROM occurred_at)::float8 AS at "
                                "FROM movements WHERE organization_id = $1 AND type = 'receipt' "
                                "AND reference_id <> ''", org)
    finally:
        await conn.close()
    return {r["reference_id"]: (r["source"], r["at"]) for r in rows}


async def violations(database_url: str, org: str, tally: Tally) -> list[str]:
    """The invariants: stocks = ledger and open lines, 0 <= reserved <= on_hand, every OK reservation in
    Postgres in the state of its last OK call, every OK receipt in the ledger. One string per violation."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        report = await reconcile.check(conn, org)
        over = await conn.fetch("SELECT variant_id, on_hand, reserved FROM stocks WHERE organization_id = $1 "
                                "AND NOT (0 <= reserved AND reserved <= on_hand)", org)
        states = {r["reservation_id"]: set(r["statuses"]) for r in await conn.fetch(
            "SELECT reservation_id, array_agg(DISTINCT status) AS statuses FROM reservation_lines "
            "WHERE organization_id = $1 GROUP BY reservation_id", org)}
        receipts = {r["reference_id"]: (r["variant_id"], r["on_hand_delta"]) for r in await conn.fetch(
            "SELECT reference_id, variant_id, on_hand_delta FROM movements WHERE organization_id = $1 "
            "AND type = 'receipt' AND reference_id <> ''", org)}
    finally:
        await conn.close()
    found = [f"drift {d.variant_id}/{d.warehouse_id}: {d.describe()}" for d in report.drifts]
    found += [f"oversold {dict(r)}" for r in over]
    found += [f"acknowledged reservation {rid} missing" for rid in tally.reserved if rid not in states]
    found += [f"reservation {rid}: last OK {state}, in Postgres {sorted(states[rid])}"
              for rid, state in tally.reserved.items()
              if rid in states and rid not in tally.uncertain and states[rid] != {state}]
    found += [f"acknowledged receipt {ref} {want}: in the ledger {receipts.get(ref)}"
              for ref, want in tally.received.items() if receipts.get(ref) != want]
    return found


def summary(scenario: str, tally: Tally, recovery: float | None, found: list[str], **extra: object) -> str:
    """The one line each scenario prints: calls, OK, failed by code, recovery, invariant violations."""
    more = "".join(f", {k.replace('_', ' ')} {v}" for k, v in extra.items())
    rec = "n/a" if recovery is None else f"{recovery:.2f} s"
    line = (f"faults/{scenario}: calls {sum(tally.outcomes.values())}, OK {tally.outcomes['OK']}, "
            f"failed {tally.failed()}, recovery {rec}{more}, slowest call {tally.slowest:.2f} s, "
            f"invariant violations {len(found)}")
    print("\n" + line, flush=True)
    return line


@contextlib.asynccontextmanager
async def catalog_for(org: str) -> AsyncIterator[RunningCatalog]:
    """The Catalog double on a port of this directory, knowing the load's variants of `org` (and the one
    orders placed through events use)."""
    async with catalog_double(free_port(AUX_PORTS)) as catalog:
        for v in (*VARIANTS, EventOrders.VARIANT):
            catalog.double.add(org, v)
        yield catalog


async def readiness(http_port: int) -> dict[str, Any]:
    """The service's /readyz, parsed (a 503 has a body too)."""
    _, _, body = await http_get(f"http://127.0.0.1:{http_port}/readyz", timeout=5)
    return json.loads(body)


# ---------------------------------------------------------------- databases


async def scenario_database(scenario: str) -> str:
    """`inv_faults_<scenario>`, dropped and created afresh (no relay may see another run's outbox), migrated."""
    url = database_url_named(TEST_DATABASE_URL, f"inv_faults_{scenario}")
    await drop_database(url)
    await ensure_database(url)
    await migrate(url)
    return url


def via(url: str, host: str, port: int, proxy_port: int) -> str:
    """`url` with `host:port` replaced by the proxy's 127.0.0.1:proxy_port."""
    replaced = url.replace(f"{host}:{port}", f"127.0.0.1:{proxy_port}", 1)
    assert replaced != url, f"{host}:{port} not in {url}"
    return replaced


# ---------------------------------------------------------------- the service, two ways


@dataclass
class FaultService(Service):
    """conftest's `inventory serve` on this directory's ports, with settings of its own."""

    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.grpc_port:
            self.grpc_port = free_port(GRPC_PORTS)
        if not self.actor_port:
            self.actor_port = free_port(ACTOR_PORTS)
        super().__post_init__()

    def env(self) -> dict[str, str]:
        return dict(super().env(), **self.extra_env)


MARKER = "INVENTORY_FAULTS_MARKER"


def marked_pids(prefix: str) -> list[int]:
    """Live processes with MARKER=<prefix...> in their environment (Thespian's forked processes inherit it)."""
    needle = f"{MARKER}={prefix}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if any(item.startswith(needle) for item in (proc / "environ").read_bytes().split(b"\0")):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _marker(pid: int) -> str:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    return next((item.split(b"=", 1)[1].decode() for item in env if item.startswith(f"{MARKER}=".encode())), "")


class Procfile:
    """The Procfile's two processes, `inventory actors` and `inventory gateway`, each startable again.

    Every process started carries MARKER=<run>:actors or <run>:gateway from exec on, so the whole actor
    system of the node (launcher, Thespian admin, registrar, shards) is found and killed by its marker,
    and `stop()` can require that nothing outlives the test."""

    def __init__(self, database_url: str, log_dir: Path, *, shards: int = 2, **extra_env: str) -> None:
        self.database_url = database_url
        self.log_dir = log_dir
        self.shards = shards
        self.extra_env = extra_env
        self.run = uuid.uuid4().hex[:10]
        self.grpc_port = free_port(GRPC_PORTS)
        self.actor_port = free_port(ACTOR_PORTS)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: collections.Counter[str] = collections.Counter()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def env(self, role: str) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("INVENTORY_", "CATALOG_"))}
        return dict(inherited, INVENTORY_DATABASE_URL=self.database_url, INVENTORY_GRPC_PORT=str(self.grpc_port),
                    INVENTORY_ACTOR_PORT=str(self.actor_port), INVENTORY_SHARDS=str(self.shards),
                    INVENTORY_HTTP_PORT="0", INVENTORY_LOG_LEVEL="WARNING", **self.extra_env,
                    **{MARKER: f"{self.run}:{role}"})

    def pids(self, role: str) -> list[int]:
        return [pid for pid in marked_pids(f"{self.run}:{role}") if _marker(pid) == f"{self.run}:{role}"]

    def log_path(self, role: str) -> Path:
        return self.log_dir / f"{role}-{self.run}.log"

    def log_text(self) -> str:
        return "\n".join(self.log_path(role).read_text(errors="replace")
                         for role in ("actors", "gateway") if self.log_path(role).exists())

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {role}:\n" + "\n".join(
            self.log_path(role).read_text(errors="replace").splitlines()[-lines:])
            for role in ("actors", "gateway") if self.log_path(role).exists())

    def _spawn(self, role: str, *args: str) -> subprocess.Popen[bytes]:
        self.starts[role] += 1
        with self.log_path(role).open("ab") as log:
            log.write(f"=== start {self.starts[role]} of {role}\n".encode())
            log.flush()
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", role, *args], env=self.env(role),
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[role] = proc
        return proc

    async def start_actors(self, timeout: float = 60.0) -> float:
        """`inventory actors` (as the Procfile or a supervisor runs it); returns when every shard is ready."""
        ready = self.log_dir / f"actors-{self.run}-{self.starts['actors'] + 1}.ready"
        started = time.monotonic()
        proc = self._spawn("actors", "--ready-file", str(ready))
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"inventory actors exited with {proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"inventory actors not ready in {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def start_gateway(self, timeout: float = 60.0) -> float:
        """`inventory gateway`; returns once its health says SERVING."""
        started = time.monotonic()
        proc = self._spawn("gateway")
        async with grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"inventory gateway exited with {proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"inventory gateway not SERVING in {timeout} s:\n{self.log_tail()}")
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)

    def kill(self, role: str) -> list[int]:
        """kill -9 of every process of `role` (the whole actor system, or the gateway), at once."""
        killed: list[int] = []
        deadline = time.monotonic() + 5
        while (pids := self.pids(role)) and time.monotonic() < deadline:  # again: one may have forked meanwhile
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed += [p for p in pids if p not in killed]
            time.sleep(0.05)
        pids = killed
        proc = self.procs.get(role)
        if proc is not None:
            proc.wait(5)
        return pids

    async def stop(self) -> None:
        """SIGTERM to the gateway, then to `inventory actors`; nothing of the run may be left (what is, is
        killed and the test fails)."""
        problems = []
        for role in ("gateway", "actors"):
            proc = self.procs.get(role)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                problems.append(f"{role} ignored SIGTERM for 30 s")
                continue
            if code != 0:
                problems.append(f"{role} exited with {code}")
        # Thespian's shutdown stops the actor processes one by one; on a loaded 2-core machine that once
        # took longer than 10 s. Anything still there after 20 s is left behind.
        deadline = time.monotonic() + 20
        while (left := marked_pids(f"{self.run}:")) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            problems.append(f"processes left 20 s after the stop: {left}")
        assert not problems, f"{problems}\n{self.log_tail()}"


# ---------------------------------------------------------------- events as a consumer sees them


class EventTap:
    """A queue of the test's own bound to <prefix>inventory_events (all routing keys) on the real broker,
    recording every delivery: (event_id, routing key, message_id, payload)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.deliveries: list[tuple[str, str, str, dict[str, Any]]] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(AMQP_URL)
        channel = await self._connection.channel()
        exchange = await amqp.declare_inventory_exchange(channel, self.prefix)
        queue = await channel.declare_queue(f"{self.prefix}faults-tap", durable=False, auto_delete=True)
        await queue.bind(exchange, "#")
        await queue.consume(self._on_message)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        payload = json.loads(message.body)
        self.deliveries.append((str(payload.get("event_id")), message.routing_key or "", message.message_id or "",
                                payload))
        await message.ack()

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def seen(self, org: str) -> collections.Counter[str]:
        return collections.Counter(e for e, _, _, p in self.deliveries if p.get("organization_id") == org)


async def delete_topology(prefix: str) -> None:
    """Delete what a service with INVENTORY_AMQP_PREFIX=`prefix` declared on the shared broker."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        for spec in amqp.CONSUMED:
            names = amqp.Names.of(spec, prefix, FIRST_RETRY)
            for queue in names.all_queues():
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for exchange in (names.exchange, names.dead_letter_exchange):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)
        channel = await connection.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(prefix + amqp.INVENTORY_EXCHANGE)
    finally:
        await connection.close()


async def outbox_of(database_url: str, org: str) -> dict[str, tuple[str, bool]]:
    """event_id -> (event name, sent) of every outbox row of `org`."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT event_id::text, event_name, sent_at IS NOT NULL AS sent FROM outbox "
                                "WHERE organization_id = $1", org)
    finally:
        await conn.close()
    return {r["event_id"]: (r["event_name"], r["sent"]) for r in rows}


async def event_violations(database_url: str, org: str, tap: EventTap) -> tuple[list[str], int]:
    """Every committed outbox event of `org` published and seen by the tap, under its own routing key and
    message id, and nothing seen that is not in the outbox; copies (at-least-once) must be identical.
    Returns (violations, redeliveries): a consumer deduplicating by event_id sees each exactly once."""
    outbox = await outbox_of(database_url, org)
    seen = tap.seen(org)
    payloads: dict[str, dict[str, Any]] = {}
    found = []
    for event_id, key, message_id, payload in tap.deliveries:
        if payload.get("organization_id") != org:
            continue
        if event_id not in outbox:
            found.append(f"event {event_id} ({key}) seen but not in the outbox")
            continue
        if key != outbox[event_id][0] or message_id != event_id:
            found.append(f"event {event_id}: routing key {key!r}, message id {message_id!r}, outbox {outbox[event_id]}")
        if payloads.setdefault(event_id, payload) != payload:
            found.append(f"event {event_id}: two different payloads under one event_id")
    found += [f"outbox event {e} {name} never marked sent" for e, (name, sent) in outbox.items() if not sent]
    found += [f"outbox event {e} {name} not seen by the consumer" for e, (name, sent) in outbox.items()
              if e not in seen]
    return found, sum(n - 1 for n in seen.values() if n > 1)


async def drained(database_url: str, org: str, tap: EventTap, timeout: float) -> float:
    """Wait until every outbox row of `org` is sent and seen by the tap; returns the seconds it took."""
    started = time.monotonic()
    while True:
        outbox = await outbox_of(database_url, org)
        seen = tap.seen(org)
        if all(sent for _, sent in outbox.values()) and all(e in seen for e in outbox):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            unsent = sum(1 for _, sent in outbox.values() if not sent)
            unseen = sum(1 for e in outbox if e not in seen)
            raise AssertionError(f"outbox not drained in {timeout} s: {len(outbox)} events, {unsent} unsent, "
                                 f"{unseen} not seen by the consumer")
        await asyncio.sleep(0.1)


async def ledger_event_violations(database_url: str, org: str, tap: EventTap) -> list[str]:
    """Every committed change has its event: per stock, the last `inventory.stock.updated` seen carries
    the stock's version and quantities in Postgres; one movement event per receipt and shipment."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        stocks = await conn.fetch("SELECT variant_id, warehouse_id, on_hand, reserved, version FROM stocks "
                                  "WHERE organization_id = $1", org)
        moved = dict(await conn.fetch("SELECT type, count(*) FROM movements WHERE organization_id = $1 "
                                      "AND type IN ('receipt', 'ship') GROUP BY type", org))
    finally:
        await conn.close()
    unique = {e: p for e, _, _, p in tap.deliveries if p.get("organization_id") == org}
    last: dict[tuple[str, str], dict[str, Any]] = {}
    events_of: collections.Counter[str] = collections.Counter()
    for p in unique.values():
        if p.get("event") == "inventory.stock.updated":
            key = (p["data"]["variant_id"], p["data"]["warehouse_id"])
            if key not in last or p["sequence"] > last[key]["sequence"]:
                last[key] = p
        elif str(p.get("event", "")).startswith("inventory.movement."):
            events_of[p["data"]["movement_type"]] += 1
    found = []
    for s in stocks:
        p = last.get((s["variant_id"], s["warehouse_id"]))
        got = None if p is None else (p["sequence"], p["data"]["on_hand"], p["data"]["reserved"])
        if got != (s["version"], s["on_hand"], s["reserved"]):
            found.append(f"stock {s['variant_id']}/{s['warehouse_id']}: version, on_hand, reserved "
                         f"{(s['version'], s['on_hand'], s['reserved'])} but the last stock.updated seen {got}")
    found += [f"{n} {kind} movements in the ledger, {events_of[kind]} movement events seen"
              for kind, n in moved.items() if events_of[kind] != n]
    return found


class EventOrders:
    """The Order Service's side of the load: each order is `order.placed` (1 of variant EVENT_VARIANT) then
    `order.shipped`, published to <prefix>order_events on the real broker (never through the service's
    proxy). `shipped()` says which orders' reservations Postgres has as shipped."""

    VARIANT = "ev"

    def __init__(self, prefix: str, org: str) -> None:
        self.prefix = prefix
        self.org = org
        self.orders: list[str] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def run(self, stop: asyncio.Event, interval: float = 0.1) -> None:
        self._connection = await aio_pika.connect_robust(AMQP_URL)
        try:
            channel = await self._connection.channel()
            exchange = await channel.declare_exchange(self.prefix + amqp.ORDERS.exchange, aio_pika.ExchangeType.TOPIC,
                                                      durable=True)
            while not stop.is_set():
                order = str(uuid.uuid4())
                for event, data in (("order.placed", {"order_id": order, "ttl_seconds": 600,
                                                      "items": [{"variant_id": self.VARIANT, "quantity": 1}]}),
                                    ("order.shipped", {"order_id": order})):
                    body = {"event": event, "event_id": str(uuid.uuid4()), "organization_id": self.org, "data": data}
                    await exchange.publish(aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                           routing_key=event)
                self.orders.append(order)
                await asyncio.sleep(interval)
        finally:
            await self._connection.close()

    async def unshipped(self, database_url: str) -> list[str]:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            shipped = {r["order_id"] for r in await conn.fetch(
                "SELECT DISTINCT order_id FROM reservation_lines WHERE organization_id = $1 AND status = 'shipped'",
                self.org)}
        finally:
            await conn.close()
        return [o for o in self.orders if o not in shipped]


@contextlib.asynccontextmanager
async def serve_with_events(database_url: str, tmp_path: Path, amqp_url: str = AMQP_URL,
                            **env: str) -> AsyncIterator[tuple[FaultService, EventTap]]:
    """`inventory serve` on `database_url` with `env`, events on under names of its own, with the test's
    consumer of what it publishes."""
    prefix = f"faults-{uuid.uuid4().hex[:8]}."
    async with broker_side(prefix) as tap:
        svc = FaultService(database_url, tmp_path, extra_env={**env, **events_env(prefix, amqp_url)})
        async with running(svc):
            yield svc, tap


@contextlib.asynccontextmanager
async def procfile_with_events(tmp_path: Path, scenario: str, **env: str) -> AsyncIterator[tuple[Procfile, EventTap]]:
    """The Procfile's `actors` and `gateway` on the scenario's database, events on, with the test's
    consumer of what they publish; stopped (nothing may be left) afterwards."""
    url = await scenario_database(scenario)
    prefix = f"faults-{uuid.uuid4().hex[:8]}."
    async with broker_side(prefix) as tap:
        node = Procfile(url, tmp_path, **env, **events_env(prefix))
        try:
            await node.start_actors()
            await node.start_gateway()
            yield node, tap
        finally:
            await node.stop()


def events_env(prefix: str, amqp_url: str = AMQP_URL) -> dict[str, str]:
    """The service's settings for events on, on names of its own (`prefix`), retrying quickly."""
    return {"INVENTORY_AMQP_URL": amqp_url, "INVENTORY_AMQP_PREFIX": prefix, "INVENTORY_AMQP_RETRY_SECONDS": str(FIRST_RETRY),
            "INVENTORY_AMQP_MAX_ATTEMPTS": "8", "INVENTORY_RELAY_POLL_SECONDS": "0.02"}


@contextlib.asynccontextmanager
async def broker_side(prefix: str) -> AsyncIterator[EventTap]:
    """The test's consumer of <prefix>inventory_events for the body of the `with`; afterwards the run's
    exchanges and queues are deleted from the shared broker."""
    tap = EventTap(prefix)
    try:
        await tap.start()
        yield tap
    finally:
        await tap.close()
        await delete_topology(prefix)


@contextlib.asynccontextmanager
async def ordering(orders: EventOrders, admin: pbg.InventoryAdminServiceStub) -> AsyncIterator[None]:
    """Orders placed and shipped through events for the body of the `with` (stock for them received first)."""
    await admin.RecordMovement(pb.MovementRequest(
        organization_id=orders.org, variant_id=EventOrders.VARIANT, warehouse_id="w1",
        type=pb.MOVEMENT_TYPE_RECEIPT, quantity=10_000), timeout=10)
    stop = asyncio.Event()
    task = asyncio.create_task(orders.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def settle_events(database_url: str, org: str, tap: EventTap, orders: EventOrders | None,
                        timeout: float) -> tuple[list[str], int, float]:
    """After the load: wait (bounded) until the orders sent as events are shipped and the outbox of `org` is
    published and seen, then check the events. Returns (violations, redeliveries, seconds it took)."""
    started = time.monotonic()
    unshipped: list[str] = []
    if orders is not None:
        while (unshipped := await orders.unshipped(database_url)) and time.monotonic() - started < timeout:
            await asyncio.sleep(0.2)
    found = [f"order {o} sent as events, not shipped {timeout:.0f} s after the load" for o in unshipped]
    try:
        await drained(database_url, org, tap, max(1.0, timeout - (time.monotonic() - started)))
    except AssertionError as e:
        found.append(str(e))
    took = time.monotonic() - started
    event_found, redelivered = await event_violations(database_url, org, tap)
    found += event_found + await ledger_event_violations(database_url, org, tap)
    return found, redelivered, took
