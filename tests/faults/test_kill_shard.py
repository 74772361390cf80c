"""Fault injection: `kill -9` of one shard process of `inventory serve` under a mixed load. Calls may fail
(never INTERNAL/UNKNOWN) until the shard is back; the service must serve every variant again by itself,
and the invariants must hold (every OK reservation in Postgres, stocks = ledger and open lines).

The shard process is found through the advisory lock it holds in Postgres: pg_stat_activity gives the
client port of the locking session, the process with that local port is the shard.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import psutil
import pytest
from conftest import (
    TEST_DATABASE_URL,
    Service,
    database_url_named,
    ensure_database,
    free_port,
    running,
    service_pids,
)
from fault_load import ACTOR_PORTS, GRPC_PORTS, VARIANTS, Tally, prepare, violations, worker

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence.migrate import migrate

pytestmark = pytest.mark.timeout(180)
DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_faults_kill_shard")
RECOVERY_LIMIT = 20.0


@pytest.fixture
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    await ensure_database(DATABASE_URL)
    await migrate(DATABASE_URL)
    svc = Service(DATABASE_URL, tmp_path_factory.mktemp("kill-shard"), grpc_port=free_port(GRPC_PORTS),
                  actor_port=free_port(ACTOR_PORTS))
    async with running(svc):
        yield svc


async def shard_pids(svc: Service) -> list[int]:
    """The processes of `svc` holding a shard's advisory lock on our database."""
    conn = await asyncpg.connect(DATABASE_URL, timeout=10)
    try:
        ports = {r["client_port"] for r in await conn.fetch(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()")}
    finally:
        await conn.close()
    found = []
    for pid in service_pids(svc.actor_port):
        try:
            local = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr}
        except psutil.Error:
            continue
        if local & ports:
            found.append(pid)
    return sorted(found)


async def test_kill_9_of_a_shard_under_load(service):
    org = f"kill-shard-{uuid.uuid4()}"
    tally = Tally()
    shards = await shard_pids(service)
    assert len(shards) == service.shards, f"shards holding locks: {shards}"
    async with grpc.aio.insecure_channel(service.target) as channel:
        inv, admin = pbg.InventoryServiceStub(channel), pbg.InventoryAdminServiceStub(channel)
        await prepare(admin, org)
        stop = asyncio.Event()
        workers = [asyncio.create_task(worker(stop, tally, inv, admin, org, seed)) for seed in range(4)]
        try:
            await asyncio.sleep(2)
            assert tally.outcomes["OK"] > 0, tally.outcomes
            os.kill(shards[0], signal.SIGKILL)
            tally.restored = killed = time.monotonic()
            # Every variant (on every shard) answers again.
            deadline = killed + RECOVERY_LIMIT
            pending = set(VARIANTS)
            while pending:
                for v in sorted(pending):
                    try:
                        await admin.GetStock(pb.GetStockRequest(organization_id=org, variant_id=v), timeout=2)
                        pending.discard(v)
                    except grpc.aio.AioRpcError:
                        pass
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"variants {sorted(pending)} not served {RECOVERY_LIMIT} s after kill -9 of shard process "
                        f"{shards[0]}; shard lock holders before {shards}, now {await shard_pids(service)}\n"
                        f"{service.log_tail()}")
                await asyncio.sleep(0.1)
            recovery = time.monotonic() - killed
            await asyncio.sleep(2)  # load on the recovered service
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
    found = await violations(DATABASE_URL, org, tally)
    print(f"\nfaults/kill-9-shard: calls {sum(tally.outcomes.values())}, OK {tally.outcomes['OK']}, "
          f"failed { {k: v for k, v in tally.outcomes.items() if k != 'OK'} }, recovery {recovery:.2f} s, "
          f"invariant violations {len(found)}")
    assert not tally.forbidden, tally.forbidden[:5]
    assert not found, found[:10]
    assert len(await shard_pids(service)) == service.shards
