"""gRPC health is NOT_SERVING while Postgres is unreachable, and SERVING again when it is back.

The machine's Postgres is never stopped: the service reaches it through a TCP proxy of
this test's own, and "Postgres down" is the proxy closing its port and every connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from catalog_double import Serve, ensure_ops_database, http_get, serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(90)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def eventually(probe: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


@pytest.fixture
async def proxied_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Serve, TcpProxy]]:
    url = await ensure_ops_database()
    parts = urlsplit(url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        through = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username
                                            else f"127.0.0.1:{proxy.port}"))
        serve = Serve(through, tmp_path_factory.mktemp("pg-down"))
        async with serving(serve):
            yield serve, proxy


async def test_health_is_not_serving_while_postgres_is_unreachable_and_serving_when_back(
        proxied_service: tuple[Serve, TcpProxy]) -> None:
    serve, proxy = proxied_service
    async with grpc.aio.insecure_channel(serve.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status_is(expected: int, service: str = "") -> Callable[[], Awaitable[bool]]:
            async def probe() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                return bool(reply.status == expected)
            return probe

        assert await status_is(SERVING)()
        await proxy.down()
        await eventually(status_is(NOT_SERVING), 10, "NOT_SERVING with Postgres unreachable")
        assert await status_is(NOT_SERVING, "inventory.v1.InventoryService")(), "per service too"
        status, _, body = await http_get(serve.http + "/readyz")
        report = json.loads(body)
        assert (status, report["status"]) == (503, "not_ready"), report
        assert report["checks"]["postgres"]["status"] == "unhealthy"
        assert report["checks"]["postgres"]["failure_count"] >= 1
        assert (await http_get(serve.http + "/healthz"))[0] == 200, "liveness does not depend on Postgres"

        await proxy.up()
        await eventually(status_is(SERVING), 15, "SERVING again once Postgres is reachable")
        assert await status_is(SERVING, "inventory.v1.InventoryAdminService")()
    assert any("NOT_SERVING" in r.get("msg", "") for r in serve.log_records())
