"""Shared fixtures: a real `inventory serve` for the end-to-end tests, and what they need to talk to it.

The e2e tests run the service the way an operator does: `inventory serve` as a
subprocess on a real Postgres, waited for through its stdout announcement and its
grpc.health.v1 status, stopped with SIGTERM. Stopping also checks that none of its
processes outlives it: Thespian's admin daemonizes (setsid + fork), so its actor
processes are not in the process group of `serve` and a leak would go unnoticed.

One Postgres database may be served by one service at a time (each shard takes an
advisory lock per shard id), so the tests read their database from
INVENTORY_TEST_DATABASE_URL, and the restart test runs its own service on a database
of its own (`<name>_restart`). Every test uses its own organization_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg

TEST_DATABASE_URL = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
GRPC_PORTS = range(50100, 50200)
ACTOR_PORTS = range(19700, 19800)
SHARDS = 2
START_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0
INVENTORY = Path(sys.executable).with_name("inventory")

T = TypeVar("T")


# ---------------------------------------------------------------- ports and processes


def free_port(ports: range, taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A port of `ports` nobody listens on (tried in random order: runs right after another differ)."""
    candidates = [p for p in ports if p not in taken]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def service_pids(actor_port: int) -> list[int]:
    """Live processes of the service on `actor_port`: `inventory serve`, the launcher and its actors.

    They are recognised by their command line (`inventory serve` or `gateway.cli actors`)
    together with INVENTORY_ACTOR_PORT=<port> in their environment, which every one of them
    inherits; other engineers' services on this machine run on other admin ports.
    """
    marker = f"INVENTORY_ACTOR_PORT={actor_port}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid == os.getpid():
            continue
        cmdline = _cmdline(pid)
        if "gateway.cli" not in cmdline and "inventory serve" not in cmdline:
            continue
        if f":{actor_port}" in cmdline or marker in _read(proc / "environ").split(b"\0"):
            found.append(pid)
    return found


@dataclass
class Service:
    """One `inventory serve` subprocess with fixed ports and database, startable again after a stop."""

    database_url: str
    log_dir: Path
    shards: int = SHARDS
    grpc_port: int = 0
    actor_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _logs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.grpc_port:
            self.grpc_port = free_port(GRPC_PORTS, _ports_in_use)
        if not self.actor_port:
            self.actor_port = free_port(ACTOR_PORTS, _ports_in_use)
        _ports_in_use.update({self.grpc_port, self.actor_port})

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def env(self) -> dict[str, str]:
        """This machine's environment without its INVENTORY_*/CATALOG_* settings, then ours."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("INVENTORY_", "CATALOG_"))}
        return dict(
            inherited,
            INVENTORY_DATABASE_URL=self.database_url,
            INVENTORY_GRPC_PORT=str(self.grpc_port),
            INVENTORY_ACTOR_PORT=str(self.actor_port),
            INVENTORY_SHARDS=str(self.shards),
            INVENTORY_HTTP_PORT="0",
            INVENTORY_LOG_LEVEL="WARNING",
        )

    def log_tail(self, lines: int = 40) -> str:
        text = b"".join(_read(p) for p in self._logs).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def start(self) -> None:
        """Start `inventory serve` and return once it announced itself and health says SERVING."""
        assert self.process is None, "already running"
        self.starts += 1
        out = self.log_dir / f"serve-{self.actor_port}-{self.starts}.out"
        err = self.log_dir / f"serve-{self.actor_port}-{self.starts}.err"
        self._logs += [out, err]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self.process = await asyncio.to_thread(
                subprocess.Popen, [str(INVENTORY), "serve"], env=self.env(), stdout=stdout, stderr=stderr,
                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        announcement = f"inventory serving gRPC on port {self.grpc_port} with {self.shards} shards".encode()
        while announcement not in _read(out):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"inventory serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"inventory serve did not announce itself in {START_TIMEOUT:.0f} s:\n"
                                   f"{self.log_tail()}")
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = None
            while status != health_pb2.HealthCheckResponse.SERVING:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"health is {status}, not SERVING:\n{self.log_tail()}")
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    status = reply.status
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
        # The leftover check at stop() must be able to see the processes it looks for.
        running = service_pids(self.actor_port)
        assert len(running) >= self.shards + 2, f"only {running} found for actor port {self.actor_port}"

    async def stop(self) -> int:
        """SIGTERM, wait for the exit, then require that no process of the service is left.

        On any failure whatever is left of this service is killed before the error is raised,
        so a failing test never leaves processes behind.
        """
        assert self.process is not None, "not running"
        process, self.process = self.process, None
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(process.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"inventory serve ignored SIGTERM for {STOP_TIMEOUT:.0f} s") from None
            deadline = time.monotonic() + 10
            while left := service_pids(self.actor_port):
                if time.monotonic() > deadline:
                    raise AssertionError(f"processes left 10 s after inventory serve exited: {describe(left)}")
                await asyncio.sleep(0.05)
            return code
        except BaseException as e:
            killed = self._kill(process)
            e.add_note(f"killed what was left of the service: {killed}\n{self.log_tail()}")
            raise

    def _kill(self, process: subprocess.Popen[bytes]) -> list[int]:
        """SIGKILL every process of this service (found by its actor port: ours only)."""
        pids = service_pids(self.actor_port)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait(5)
        return pids


_ports_in_use: set[int] = set()


def describe(pids: list[int]) -> str:
    """pid: command line, for each of `pids`."""
    return "; ".join(f"{pid}: {_cmdline(pid)}" for pid in pids)


def _cmdline(pid: int) -> str:
    return _read(Path(f"/proc/{pid}/cmdline")).replace(b"\0", b" ").decode(errors="replace")


async def eventually(probe: Callable[[], Awaitable[T | None]], *, timeout: float, interval: float = 0.05,
                     what: str = "condition") -> T:
    """Call `probe` until it returns something other than None (or False); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last is not None and last is not False:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s (last probe: {last!r})")
        await asyncio.sleep(interval)


@pytest.fixture(name="eventually", scope="session")
def eventually_fixture() -> Callable[..., Awaitable[Any]]:
    return eventually


# ---------------------------------------------------------------- databases


def database_url_named(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "test"


async def ensure_database(url: str) -> None:
    """Create the database of `url` (connecting through the test database) if it does not exist."""
    name = database_name(url)
    conn = await asyncpg.connect(TEST_DATABASE_URL, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(url: str) -> None:
    conn = await asyncpg.connect(TEST_DATABASE_URL, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database_name(url)}" WITH (FORCE)')
    finally:
        await conn.close()


# The session's service gets a database of its own, so two test runs on one machine (or a
# developer's service on the test database) never meet on a shard lock.
E2E_DATABASE_URL = database_url_named(TEST_DATABASE_URL, f"{database_name(TEST_DATABASE_URL)}_e2e_{os.getpid()}")


@pytest.fixture(scope="session")
async def e2e_database() -> AsyncIterator[str]:
    await drop_database(E2E_DATABASE_URL)
    await ensure_database(E2E_DATABASE_URL)
    try:
        yield E2E_DATABASE_URL
    finally:
        await drop_database(E2E_DATABASE_URL)


@pytest.fixture(scope="session")
async def db(e2e_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the e2e database, for checks the API cannot make (ledger sums, reservation lines)."""
    pool = await asyncpg.create_pool(e2e_database, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


# ---------------------------------------------------------------- the services


@contextlib.asynccontextmanager
async def running(service: Service) -> AsyncIterator[Service]:
    """Start `service`, hand it over, and on the way out stop it (a failed stop fails the test)."""
    try:
        if service.process is None:
            await service.start()
        yield service
    finally:
        if service.process is not None:
            await service.stop()


@pytest.fixture(scope="session")
async def service(tmp_path_factory: pytest.TempPathFactory, e2e_database: str) -> AsyncIterator[Service]:
    """ONE `inventory serve` with 2 shards for the e2e tests, stopped (and checked) at the end."""
    svc = Service(e2e_database, tmp_path_factory.mktemp("service"))
    async with running(svc):
        yield svc


@pytest.fixture
async def restartable_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    """A service of its own (own ports, own database, dropped afterwards) that a test may stop and start."""
    url = database_url_named(TEST_DATABASE_URL, database_name(TEST_DATABASE_URL) + "_restart")
    await ensure_database(url)
    svc = Service(url, tmp_path_factory.mktemp("restart"))
    try:
        async with running(svc):
            yield svc
    finally:
        _ports_in_use.difference_update({svc.grpc_port, svc.actor_port})
    await drop_database(url)


# ---------------------------------------------------------------- clients


@dataclass
class Clients:
    channel: grpc.aio.Channel
    inventory: pbg.InventoryServiceStub
    admin: pbg.InventoryAdminServiceStub


def clients_for(channel: grpc.aio.Channel) -> Clients:
    return Clients(channel, pbg.InventoryServiceStub(channel), pbg.InventoryAdminServiceStub(channel))


@pytest.fixture(scope="session")
async def clients(service: Service) -> AsyncIterator[Clients]:
    async with grpc.aio.insecure_channel(service.target) as channel:
        yield clients_for(channel)


@pytest.fixture(scope="session")
def connect() -> Callable[[str], contextlib.AbstractAsyncContextManager[Clients]]:
    """`async with connect(target) as clients`: a channel of its own, e.g. to a restarted service."""

    @contextlib.asynccontextmanager
    async def open_clients(target: str) -> AsyncIterator[Clients]:
        async with grpc.aio.insecure_channel(target) as channel:
            yield clients_for(channel)

    return open_clients


@pytest.fixture
def inventory(clients: Clients) -> pbg.InventoryServiceStub:
    return clients.inventory


@pytest.fixture
def admin(clients: Clients) -> pbg.InventoryAdminServiceStub:
    return clients.admin


@pytest.fixture
def org() -> str:
    """A fresh organization_id: no test sees another's warehouses, stocks or reservations."""
    return str(uuid.uuid4())


Item = tuple[str, int] | tuple[str, int, str]


@dataclass
class Shop:
    """One organization's view of a running service, with the steps most tests begin with."""

    org: str
    inventory: pbg.InventoryServiceStub
    admin: pbg.InventoryAdminServiceStub
    known_warehouses: set[str] = field(default_factory=set)

    async def warehouse(self, warehouse_id: str, *, active: bool = True, name: str = "") -> pb.Warehouse:
        reply = await self.admin.UpsertWarehouse(pb.Warehouse(
            organization_id=self.org, warehouse_id=warehouse_id, name=name or f"warehouse {warehouse_id}",
            active=active))
        self.known_warehouses.add(warehouse_id)
        return reply

    async def receive(self, variant_id: str, warehouse_id: str, quantity: int, **extra: Any) -> pb.StockLevel:
        """Create the warehouse if this shop has not yet, then record a receipt of `quantity`."""
        if warehouse_id not in self.known_warehouses:
            await self.warehouse(warehouse_id)
        reply = await self.admin.RecordMovement(pb.MovementRequest(
            organization_id=self.org, variant_id=variant_id, warehouse_id=warehouse_id,
            type=pb.MOVEMENT_TYPE_RECEIPT, quantity=quantity, **extra))
        return reply.stock

    async def levels(self, variant_id: str) -> dict[str, pb.StockLevel]:
        reply = await self.admin.GetStock(pb.GetStockRequest(organization_id=self.org, variant_id=variant_id))
        return {lv.warehouse_id: lv for lv in reply.levels}

    async def level(self, variant_id: str, warehouse_id: str) -> pb.StockLevel:
        reply = await self.admin.GetStock(pb.GetStockRequest(
            organization_id=self.org, variant_id=variant_id, warehouse_id=warehouse_id))
        assert len(reply.levels) == 1, reply
        return reply.levels[0]

    async def reserve(self, order_id: str, *items: Item, ttl_seconds: int = 0,
                      timeout: float = 30) -> pb.ReserveStockResponse:
        return await self.inventory.ReserveStock(pb.ReserveStockRequest(
            organization_id=self.org, order_id=order_id, ttl_seconds=ttl_seconds,
            items=[pb.ReserveItem(variant_id=it[0], quantity=it[1], warehouse_id=it[2] if len(it) > 2 else "")
                   for it in items]), timeout=timeout)

    async def release(self, reservation_id: str, reason: str = "") -> pb.ReleaseResponse:
        return await self.inventory.ReleaseReservation(pb.ReleaseRequest(
            organization_id=self.org, reservation_id=reservation_id, reason=reason))

    async def confirm(self, reservation_id: str) -> pb.ConfirmResponse:
        return await self.inventory.ConfirmReservation(pb.ConfirmRequest(
            organization_id=self.org, reservation_id=reservation_id))


@pytest.fixture
def shop(org: str, clients: Clients) -> Shop:
    return Shop(org, clients.inventory, clients.admin)


@pytest.fixture(scope="session")
def shop_on() -> Callable[[Clients, str], Shop]:
    """Make a Shop on other clients (another service instance, or another organization)."""
    return lambda c, organization_id: Shop(organization_id, c.inventory, c.admin)


@pytest.fixture(scope="session")
def grpc_error() -> Callable[..., Awaitable[grpc.aio.AioRpcError]]:
    """Await a call that must fail; return its error (fails the test if the call succeeds)."""

    async def expect(call: Awaitable[Any], code: grpc.StatusCode | None = None) -> grpc.aio.AioRpcError:
        try:
            reply = await call
        except grpc.aio.AioRpcError as e:
            if code is not None:
                assert e.code() == code, f"expected {code.name}, got {e.code().name}: {e.details()}"
            return e
        raise AssertionError(f"expected {code.name if code else 'an error'}, got a reply: {reply!r}")

    return expect

