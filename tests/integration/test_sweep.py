"""The periodic Postgres sweep of overdue reservations (gateway/sweep.py) on a real `inventory serve`.

A line no timer will ever fire is made the only way one can exist: behind the shards' backs.
After the service started (so no shard's `load_due` saw them) the test writes, in one
transaction, a complete and consistent history for variants no shard has in memory: the
stocks, their ledger (receipt, reserve), a reservation header and its lines, with
`expires_at` a minute in the past. That is exactly what a shard leaves behind when its
timer was lost (a Thespian wakeup dropped, a crash between a timer and its commit): rows in
Postgres, and nothing in any timer heap. Nothing touches those stocks afterwards, so only
the sweep can expire them, and it must do so through the owning shard: one
`inventory.reservation.expired` for the reservation (its lines are in both shards),
`reserved` back down, the ledger and the reconciler agreeing. A confirmed line (no TTL) and
a line that is not yet due are left alone.

The service runs on a database of its own (inv_sec2_sweep) with a sweep every 0.3 s.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from conftest import (
    TEST_DATABASE_URL,
    Service,
    database_url_named,
    drop_database,
    ensure_database,
    eventually,
    free_port,
    running,
)
from prometheus_client.parser import text_string_to_metric_families

from actors.keys import items_hash, reservation_id, shard_hash, shard_of
from gateway.config import ConfigError, Settings
from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from gateway.sweep import OverdueSweeper
from persistence import reconcile
from persistence.migrate import migrate

pytestmark = pytest.mark.timeout(120)
DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_sec2_sweep")
SHARDS = 2


@dataclass
class SweepingService(Service):
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return dict(super().env(), **self.extra_env)


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    await drop_database(DATABASE_URL)
    await ensure_database(DATABASE_URL)
    await migrate(DATABASE_URL)
    svc = SweepingService(DATABASE_URL, tmp_path_factory.mktemp("sweep"), shards=SHARDS,
                          grpc_port=free_port(range(50700, 50800)), actor_port=free_port(range(20400, 20500)),
                          extra_env={"INVENTORY_SWEEP_INTERVAL_SECONDS": "0.3",
                                     "INVENTORY_RECONCILE_INTERVAL_SECONDS": "0",
                                     "INVENTORY_HTTP_PORT": str(free_port(range(8500, 8600)))})
    async with running(svc):
        yield svc
    await drop_database(DATABASE_URL)


@pytest.fixture
async def conn() -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(DATABASE_URL, timeout=10)
    try:
        yield c
    finally:
        await c.close()


def variants_in_each_shard(org: str) -> tuple[str, str]:
    """Two variant ids of `org` that live in different shards."""
    by_shard: dict[int, str] = {}
    for i in range(100):
        by_shard.setdefault(shard_of(org, f"var-{i}", SHARDS), f"var-{i}")
        if len(by_shard) == SHARDS:
            return by_shard[0], by_shard[1]
    raise AssertionError("no variants in both shards")


async def write_behind_the_shards(conn: asyncpg.Connection, org: str, warehouse: str,
                                  reservations: list[tuple[str, str, list[tuple[str, int]], str]],
                                  on_hand: int) -> None:
    """Stocks of every variant named (on_hand received), reserved by `reservations`:
    (order_id, status of its lines, [(variant, quantity)], expires_at as a Postgres interval from now).
    Snapshot, ledger, headers and lines agree, as a shard's commit would have left them."""
    reserved: dict[str, list[tuple[str, str, int]]] = {}
    async with conn.transaction():
        for order, status, lines, offset in reservations:
            rid = reservation_id(org, order)
            digest = items_hash((v, warehouse, q) for v, q in lines)
            open_lines = len(lines)
            await conn.execute(
                "INSERT INTO reservations (reservation_id, organization_id, order_id, items_hash, expires_at,"
                " status, open_lines) VALUES ($1, $2, $3, $4, now() + $5::text::interval, $6, $7)",
                rid, org, order, digest, offset, status, open_lines)
            for variant, quantity in lines:
                await conn.execute(
                    "INSERT INTO reservation_lines (reservation_id, organization_id, variant_id, warehouse_id,"
                    " shard_hash, order_id, quantity, expires_at, items_hash, status)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, now() + $8::text::interval, $9, $10)",
                    rid, org, variant, warehouse, shard_hash(org, variant), order, quantity, offset, digest, status)
                reserved.setdefault(variant, []).append((rid, status, quantity))
        for variant, held in sorted(reserved.items()):
            version = 1
            await conn.execute(
                "INSERT INTO movements (organization_id, variant_id, warehouse_id, type, on_hand_delta, version)"
                " VALUES ($1, $2, $3, 'receipt', $4, 1)", org, variant, warehouse, on_hand)
            for rid, status, quantity in held:
                version += 1
                await conn.execute(
                    "INSERT INTO movements (organization_id, variant_id, warehouse_id, type, reserved_delta,"
                    " reference_id, version) VALUES ($1, $2, $3, 'reserve', $4, $5, $6)",
                    org, variant, warehouse, quantity, rid, version)
                if status == "confirmed":
                    version += 1
                    await conn.execute(
                        "INSERT INTO movements (organization_id, variant_id, warehouse_id, type, reference_id,"
                        " version) VALUES ($1, $2, $3, 'confirm', $4, $5)", org, variant, warehouse, rid, version)
            await conn.execute(
                "INSERT INTO stocks (organization_id, variant_id, warehouse_id, shard_hash, on_hand, reserved,"
                " version) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                org, variant, warehouse, shard_hash(org, variant), on_hand, sum(q for _, _, q in held), version)


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


async def swept_lines(svc: SweepingService) -> dict[str, float]:
    """inventory_reservation_sweep_lines_total by outcome, from the service's /metrics."""
    text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{svc.extra_env['INVENTORY_HTTP_PORT']}/metrics")
    assert text and "inventory_reservation_sweep_runs_total" in text, text
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "inventory_reservation_sweep_lines" for s in family.samples if s.name.endswith("_total")}


async def test_an_overdue_reservation_no_timer_holds_is_expired_by_the_sweep_through_its_shards(service, conn):
    org = f"sweep-{uuid.uuid4()}"
    warehouse = "wh-1"
    a, b = variants_in_each_shard(org)
    async with grpc.aio.insecure_channel(service.target) as channel:
        await pbg.InventoryAdminServiceStub(channel).UpsertWarehouse(pb.Warehouse(
            organization_id=org, warehouse_id=warehouse, name="main", active=True))
    before = await swept_lines(service)
    await write_behind_the_shards(conn, org, warehouse, [
        ("lost-timer", "active", [(a, 3), (b, 4)], "-60 seconds"),  # overdue, in both shards: the sweep's
        ("not-due", "active", [(a, 2)], "1 hour"),  # open, due later: left alone
        ("confirmed", "confirmed", [(b, 5)], "-60 seconds"),  # confirmed: no TTL any more
    ], on_hand=20)
    lost = reservation_id(org, "lost-timer")

    async def lines_expired() -> bool:
        statuses = await conn.fetch("SELECT status FROM reservation_lines WHERE organization_id = $1"
                                    " AND reservation_id = $2", org, lost)
        return [r[0] for r in statuses] == ["expired", "expired"]

    await eventually(lines_expired, timeout=20, what="the overdue lines expired by the sweep")
    header = await conn.fetchrow("SELECT status, open_lines FROM reservations WHERE organization_id = $1"
                                 " AND reservation_id = $2", org, lost)
    assert (header["status"], header["open_lines"]) == ("expired", 0)
    stocks = {r["variant_id"]: (r["on_hand"], r["reserved"]) for r in await conn.fetch(
        "SELECT variant_id, on_hand, reserved FROM stocks WHERE organization_id = $1", org)}
    assert stocks == {a: (20, 2), b: (20, 5)}
    others = {r[0]: r[1] for r in await conn.fetch(
        "SELECT order_id, status FROM reservation_lines WHERE organization_id = $1 AND order_id <> 'lost-timer'",
        org)}
    assert others == {"not-due": "active", "confirmed": "confirmed"}
    ledger = sorted((r[0], r[1], r[2]) for r in await conn.fetch(
        "SELECT variant_id, type, reserved_delta FROM movements WHERE organization_id = $1 AND type = 'expire'",
        org))
    assert ledger == sorted([(a, "expire", -3), (b, "expire", -4)])
    assert (await reconcile.check(conn, org)).drifts == ()

    # Later runs find nothing more to do: still exactly one expired event for the reservation.
    runs_seen = await swept_lines(service)
    await asyncio.sleep(1.0)
    events = [json.loads(r[0]) for r in await conn.fetch(
        "SELECT payload::text FROM outbox WHERE organization_id = $1 AND event_name = 'inventory.reservation.expired'",
        org)]
    assert [e["data"]["reservation_id"] for e in events] == [lost]
    assert sorted((ln["variant_id"], ln["quantity"]) for ln in events[0]["data"]["lines"]) == sorted([(a, 3), (b, 4)])
    assert await conn.fetchval("SELECT status FROM reservation_lines WHERE organization_id = $1"
                               " AND order_id = 'not-due'", org) == "active"

    after = await swept_lines(service)
    assert after.get("expired", 0) - before.get("expired", 0) == 2, (before, after)
    assert after.get("expired") == runs_seen.get("expired"), (runs_seen, after)  # nothing expired twice
    assert any("sweep: 2 overdue reservation lines in 2 variants" in line
               for line in service.log_tail(2000).splitlines()), service.log_tail()


async def test_one_sweeper_per_database_holds_the_sweep_lock(service):
    """The service's sweeper holds the lock: another one on the same database stays passive."""
    other = OverdueSweeper(DATABASE_URL, bridge=None, interval=1)
    try:
        assert await other.try_lock() is False
        assert await other.sweep_once() is None
    finally:
        await other.close()


def test_the_sweep_interval_comes_from_the_environment_and_zero_turns_it_off():
    assert Settings.from_env({}).sweep_interval_seconds == 30.0
    assert Settings.from_env({"INVENTORY_SWEEP_INTERVAL_SECONDS": "0"}).sweep_interval_seconds == 0
    assert Settings.from_env({"INVENTORY_SWEEP_INTERVAL_SECONDS": "2.5"}).sweep_interval_seconds == 2.5
    with pytest.raises(ConfigError):
        Settings.from_env({"INVENTORY_SWEEP_INTERVAL_SECONDS": "soon"})
