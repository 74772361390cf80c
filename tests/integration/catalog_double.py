"""A real grpc.aio Catalog Service for tests (catalog.proto plus gRPC health), and `inventory serve`.

The Catalog is another team's service, so the tests run this stand-in on a real port.
It knows the variants a test gives it, counts every call (retries included), and can be
told to fail with a status code, to answer slowly, or to hang (`hang()`: accept calls and never
answer them until `resume()`), to drive the deadline, the breaker and degraded mode.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.pb import catalog_pb2 as cpb
from gateway.pb import catalog_pb2_grpc as cpbg
from persistence.migrate import migrate

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Variant:
    is_active: bool = True
    tracks_inventory: bool = True
    sku: str = ""
    product_name: str = ""


@dataclass
class CatalogDouble(cpbg.CatalogServiceServicer):  # type: ignore[misc]
    variants: dict[tuple[str, str], Variant] = field(default_factory=dict)
    calls: int = 0  # ValidateVariant attempts received (each retry counts)
    fail_with: grpc.StatusCode | None = None
    delay: float = 0.0
    in_flight: int = 0  # calls received and not yet answered (or given up by their caller)
    _answering: asyncio.Event | None = None  # cleared while hanging
    health_hangs: bool = True  # with `hang(health=False)` the health service keeps answering

    def add(self, organization_id: str, variant_id: str, **fields: object) -> None:
        self.variants[(organization_id, variant_id)] = Variant(**fields)  # type: ignore[arg-type]

    def hang(self, health: bool = True) -> None:
        """From now on every call is accepted and never answered, until `resume()` (or its caller's deadline:
        grpc cancels the handler then). `health=False`: the health service still answers (a server whose
        process is up while its Catalog calls hang)."""
        self.health_hangs = health
        if self._answering is None:
            self._answering = asyncio.Event()
        self._answering.clear()

    def resume(self) -> None:
        if self._answering is not None:
            self._answering.set()

    async def answering(self) -> None:
        """Return at once, or, while hanging, when resumed."""
        if self._answering is not None:
            await self._answering.wait()

    async def _answer(self, context: grpc.aio.ServicerContext) -> None:
        self.calls += 1
        self.in_flight += 1
        try:
            await self.answering()
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.fail_with is not None:
            await context.abort(self.fail_with, "catalog double told to fail")

    async def ValidateVariant(self, request: cpb.ValidateVariantRequest,
                              context: grpc.aio.ServicerContext) -> cpb.ValidateVariantResponse:
        await self._answer(context)
        v = self.variants.get((request.organization_id, request.variant_id))
        if v is None:
            return cpb.ValidateVariantResponse(exists=False)
        return cpb.ValidateVariantResponse(exists=True, is_active=v.is_active, tracks_inventory=v.tracks_inventory,
                                           sku=v.sku, product_name=v.product_name)

    async def GetVariantDetails(self, request: cpb.VariantRequest,
                                context: grpc.aio.ServicerContext) -> cpb.VariantResponse:
        await self._answer(context)
        v = self.variants.get((request.organization_id, request.variant_id))
        if v is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"variant {request.variant_id} not found")
        assert v is not None
        return cpb.VariantResponse(variant_id=request.variant_id, sku=v.sku, product_name=v.product_name,
                                   is_active=v.is_active, tracks_inventory=v.tracks_inventory)

    async def CheckVariantActive(self, request: cpb.VariantRequest,
                                 context: grpc.aio.ServicerContext) -> cpb.ActiveStatusResponse:
        await self._answer(context)
        v = self.variants.get((request.organization_id, request.variant_id))
        return cpb.ActiveStatusResponse(variant_id=request.variant_id, is_active=bool(v and v.is_active))


@dataclass
class RunningCatalog:
    double: CatalogDouble
    server: grpc.aio.Server
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(0)

    async def restart(self) -> None:
        """Serve again on the same port (after stop), keeping the variants."""
        self.server = await _serve(self.double, self.port)


class _Health(health.aio.HealthServicer):  # type: ignore[misc]
    """The standard health service, hanging with the double (a hung server answers nothing)."""

    def __init__(self, double: CatalogDouble) -> None:
        super().__init__()
        self._double = double

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if self._double.health_hangs:
            await self._double.answering()
        return await super().Check(request, context)


async def _serve(double: CatalogDouble, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    cpbg.add_CatalogServiceServicer_to_server(double, server)
    checker = _Health(double)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if port and bound != port:
        raise OSError(f"cannot bind 127.0.0.1:{port}")
    server.bound_port = bound  # type: ignore[attr-defined]
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    return server


@asynccontextmanager
async def catalog_double(port: int = 0) -> AsyncIterator[RunningCatalog]:
    double = CatalogDouble()
    server = await _serve(double, port)
    running = RunningCatalog(double, server, server.bound_port)  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        await running.server.stop(0)


# ---------------------------------------------------------------- `inventory serve` for the ops tests
#
# Kept here, next to the double it usually talks to, so the catalog, health and shutdown
# tests share one way to run the service: its own database (`inv_ops`, one service at a
# time), its own ports (gRPC 50300-50399, actor admin 19900-19999, HTTP 8300-8399), and a
# marker in its environment by which every process it starts can be found in /proc.

OPS_DATABASE = "inv_ops"
GRPC_PORTS, ACTOR_PORTS, HTTP_PORTS = range(50300, 50400), range(19900, 20000), range(8300, 8400)
MARKER_KEY = "INVENTORY_OPS_TEST_MARKER"
INVENTORY = Path(sys.executable).with_name("inventory")


def free_port(ports: range) -> int:
    candidates = list(ports)
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def database_url(name: str = "test") -> str:
    base = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
    return urlunsplit(urlsplit(base)._replace(path="/" + name))


async def ensure_ops_database() -> str:
    """Create `inv_ops` (through the test database) if missing and migrate it; returns its URL."""
    url = database_url(OPS_DATABASE)
    conn = await asyncpg.connect(database_url(), timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", OPS_DATABASE):
            try:
                await conn.execute(f'CREATE DATABASE "{OPS_DATABASE}"')
            except asyncpg.DuplicateDatabaseError:
                pass
    finally:
        await conn.close()
    await migrate(url)
    return url


def pids_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (KEY=value): serve, the launcher, the actors."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@dataclass
class Serve:
    """One `inventory serve` subprocess; `stop()` requires a clean exit and no process left behind."""

    database_url: str
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    shards: int = 2
    grpc_port: int = field(default_factory=lambda: free_port(GRPC_PORTS))
    actor_port: int = field(default_factory=lambda: free_port(ACTOR_PORTS))
    http_port: int = field(default_factory=lambda: free_port(HTTP_PORTS))
    marker: str = field(default_factory=lambda: f"{MARKER_KEY}={uuid.uuid4().hex}")
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def env(self) -> dict[str, str]:
        key, value = self.marker.split("=", 1)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CATALOG_GRPC_", "INVENTORY_"))}
        env.update(INVENTORY_DATABASE_URL=self.database_url, INVENTORY_GRPC_PORT=str(self.grpc_port),
                   INVENTORY_ACTOR_PORT=str(self.actor_port), INVENTORY_HTTP_PORT=str(self.http_port),
                   INVENTORY_SHARDS=str(self.shards), INVENTORY_LOG_LEVEL="INFO",
                   INVENTORY_HEALTH_INTERVAL_SECONDS="0.2", **{key: value})
        env.update(self.extra_env)
        return env

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / f"serve-{self.grpc_port}.out"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"serve-{self.grpc_port}.err"

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])

    async def start(self, timeout: float = 60.0) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [str(INVENTORY), "serve"], env=self.env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        announcement = f"inventory serving gRPC on port {self.grpc_port}".encode()
        while announcement not in self.stdout_path.read_bytes():
            if self.process.poll() is not None:
                raise RuntimeError(f"inventory serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"inventory serve did not start in {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != SERVING:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"health never SERVING:\n{self.log_tail()}")
                await asyncio.sleep(0.05)

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 40.0) -> int:
        assert self.process is not None
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"inventory serve ignored SIGTERM for {timeout} s:\n{self.log_tail()}") from None

    async def leftovers(self, timeout: float = 15.0) -> list[int]:
        """Poll until no process carries the marker; returns what is still there at the deadline."""
        deadline = time.monotonic() + timeout
        while (left := pids_with(self.marker)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return left

    async def stop(self) -> None:
        """SIGTERM; require exit code 0 and no process of this service left (killed if any, then fail)."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self.terminate()
            code = await self.wait()
            left = await self.leftovers()
            assert code == 0, f"inventory serve exited with {code}:\n{self.log_tail()}"
            assert left == [], f"processes outlived inventory serve: {left}"
        finally:
            self.kill_leftovers()
            self.process = None

    def kill_leftovers(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        for pid in pids_with(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@asynccontextmanager
async def serving(serve: Serve) -> AsyncIterator[Serve]:
    try:
        await serve.start()
        yield serve
    finally:
        await serve.stop()


async def http_get(url: str, timeout: float = 10.0, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 request on a fresh connection: (status, headers, body)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), timeout)
    try:
        writer.write(f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return status, headers, body
