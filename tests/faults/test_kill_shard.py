"""Fault injection: `kill -9` of one shard process of `inventory serve` under a mixed load, events on
(orders placed and shipped through events, the relay publishing). Calls may fail (never INTERNAL/UNKNOWN)
until the shard is back; the service must serve every variant again by itself (the registrar replaces
the shard), and the invariants must hold: every OK reservation and receipt in Postgres, stocks = ledger
and open lines, every committed outbox event published and seen once per event_id.

The shard process is found through the advisory lock it holds in Postgres (namespace
persistence.store.SHARD_LOCK_NAMESPACE): pg_stat_activity gives the client port of the locking
session, the process with that local port is the shard.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator

import asyncpg
import psutil
import pytest
from conftest import service_pids
from fault_load import (
    EventOrders,
    EventTap,
    FaultService,
    load,
    ordering,
    scenario_database,
    serve_with_events,
    served_again,
    settle_events,
    summary,
    violations,
)

from persistence.store import SHARD_LOCK_NAMESPACE

pytestmark = pytest.mark.timeout(180)
RECOVERY_LIMIT = 20.0


@pytest.fixture
async def service(tmp_path) -> AsyncIterator[tuple[FaultService, EventTap]]:
    async with serve_with_events(await scenario_database("kill_shard"), tmp_path) as running_service:
        yield running_service


async def shard_pids(svc: FaultService) -> list[int]:
    """The processes of `svc` holding a shard's advisory lock on its database (not the relay's, sweep's...)."""
    conn = await asyncpg.connect(svc.database_url, timeout=10)
    try:
        ports = {r["client_port"] for r in await conn.fetch(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $1 "
            "AND a.datname = current_database()", SHARD_LOCK_NAMESPACE)}
    finally:
        await conn.close()
    # Matched on both ends: a local port alone is not unique (Linux gives connections to different
    # destinations the same ephemeral port; a gateway's connection to a shard's batch socket once
    # shared one with a shard's Postgres connection, and the gateway was counted as a shard).
    pg_port = urllib.parse.urlsplit(svc.database_url).port or 5432
    found = []
    for pid in service_pids(svc.actor_port):
        try:
            local = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
                     if c.laddr and c.raddr and c.raddr.port == pg_port}
        except psutil.Error:
            continue
        if local & ports:
            found.append(pid)
    return sorted(found)


async def test_kill_9_of_a_shard_under_load(service):
    svc, tap = service
    org = f"kill-shard-{uuid.uuid4()}"
    orders = EventOrders(tap.prefix, org)
    shards = await shard_pids(svc)
    assert len(shards) == svc.shards, f"shards holding locks: {shards}"
    async with load(svc.target, org) as run, ordering(orders, run.admin):
        tally = run.tally
        os.kill(shards[0], signal.SIGKILL)
        tally.restored = killed = time.monotonic()
        pending = await served_again(run.admin, org, killed + RECOVERY_LIMIT)
        assert not pending, (
            f"variants {sorted(pending)} not served {RECOVERY_LIMIT} s after kill -9 of shard process {shards[0]}; "
            f"shard lock holders before {shards}, now {await shard_pids(svc)}\n{svc.log_tail()}")
        recovery = time.monotonic() - killed
        await asyncio.sleep(2)  # load on the recovered service
    found = await violations(svc.database_url, org, tally)
    event_found, redelivered, drain = await settle_events(svc.database_url, org, tap, orders, RECOVERY_LIMIT)
    found += event_found
    summary("kill-9-shard", tally, recovery, found, events_delivered=len(tap.deliveries),
            redeliveries=redelivered, orders_via_events=len(orders.orders), events_settled_in=f"{drain:.2f} s")
    assert not tally.forbidden, tally.forbidden[:5]
    assert not found, found[:10]
    assert len(await shard_pids(svc)) == svc.shards
