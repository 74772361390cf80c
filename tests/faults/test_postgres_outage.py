"""Fault injection: Postgres goes away for 8 s under a mixed load and comes back, without a restart of
the service. The outage is a TCP proxy this test owns between the service and Postgres (the machine's
Postgres is never stopped): it stops listening and cuts every open connection, then listens again.

During the outage calls must fail (never INTERNAL/UNKNOWN, never hang past their deadline); after it
the service must serve again by itself; at the end the invariants hold: for every stock
reserved = sum of open lines, 0 <= reserved <= on_hand, on_hand/reserved/in_transit = the ledger's sums
(persistence/reconcile.py), and every reservation acknowledged OK is in Postgres.
A summary line is printed (pytest -s shows it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from conftest import TEST_DATABASE_URL, Service, database_url_named, ensure_database, free_port, running

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence import reconcile
from persistence.migrate import migrate

pytestmark = pytest.mark.timeout(180)
DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_security_faults")
OUTAGE_SECONDS = 8.0
RECOVERY_LIMIT = 30.0
VARIANTS = [f"v{i}" for i in range(6)]


class TcpProxy:
    """127.0.0.1:<port> -> Postgres; `down()` stops listening and cuts every connection, `up()` listens again."""

    def __init__(self, target_host: str, target_port: int, port: int) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update({writer, up_writer})

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.transport.abort()
                self.writers.discard(w)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@dataclass
class Tally:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    forbidden: list[str] = field(default_factory=list)
    slowest: float = 0.0
    reserved: dict[str, str] = field(default_factory=dict)  # reservation id -> last OK state
    uncertain: set[str] = field(default_factory=set)  # a confirm/release failed: it may have committed
    restored: float = float("inf")  # when Postgres came back
    recovered: float | None = None  # when the first call started after that succeeded


async def call(tally: Tally, what: str, coro) -> object | None:
    started = time.monotonic()
    try:
        reply = await coro
    except grpc.aio.AioRpcError as e:
        tally.outcomes[e.code().name] += 1
        if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            tally.forbidden.append(f"{what}: {e.code().name}: {e.details()}")
        return None
    finally:
        tally.slowest = max(tally.slowest, time.monotonic() - started)
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
            await call(tally, op, admin.RecordMovement(pb.MovementRequest(
                organization_id=org, variant_id=rnd.choice(VARIANTS), warehouse_id="w1",
                type=pb.MOVEMENT_TYPE_RECEIPT, quantity=rnd.randint(1, 5)), timeout=5))
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


@pytest.fixture
async def proxied_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Service, TcpProxy]]:
    await ensure_database(DATABASE_URL)
    await migrate(DATABASE_URL)
    pg = urlsplit(DATABASE_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432, free_port(range(50600, 50700)))
    await proxy.up()
    via_proxy = DATABASE_URL.replace(f"{pg.hostname}:{pg.port or 5432}", f"127.0.0.1:{proxy.port}", 1)
    assert via_proxy != DATABASE_URL
    svc = Service(via_proxy, tmp_path_factory.mktemp("faults"), grpc_port=free_port(range(50600, 50700),
                                                                                    {proxy.port}),
                  actor_port=free_port(range(20300, 20400)))
    try:
        async with running(svc):
            yield svc, proxy
    finally:
        if proxy.server is None:
            with contextlib.suppress(OSError):
                await proxy.up()
        if proxy.server is not None:
            await proxy.down()


async def test_postgres_outage_fails_fast_recovers_and_keeps_the_invariants(proxied_service):
    svc, proxy = proxied_service
    org = f"faults-{uuid.uuid4()}"
    tally = Tally()
    async with grpc.aio.insecure_channel(svc.target) as channel:
        inv, admin = pbg.InventoryServiceStub(channel), pbg.InventoryAdminServiceStub(channel)
        await admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id="w1", name="w1", active=True))
        for v in VARIANTS:
            await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id=v, warehouse_id="w1",
                                                          type=pb.MOVEMENT_TYPE_RECEIPT, quantity=50))
        stop = asyncio.Event()
        workers = [asyncio.create_task(worker(stop, tally, inv, admin, org, seed)) for seed in range(4)]
        try:
            await asyncio.sleep(2)
            assert tally.outcomes["OK"] > 0, tally.outcomes
            before_outage = dict(tally.outcomes)
            await proxy.down()
            await asyncio.sleep(OUTAGE_SECONDS)
            during = collections.Counter(tally.outcomes)
            during.subtract(before_outage)
            await proxy.up()
            tally.restored = restored = time.monotonic()
            deadline = restored + RECOVERY_LIMIT
            while tally.recovered is None:
                assert time.monotonic() < deadline, (
                    f"no successful call {RECOVERY_LIMIT} s after Postgres came back: {tally.outcomes}\n"
                    f"{svc.log_tail()}")
                await asyncio.sleep(0.1)
            recovery = tally.recovered - restored
            await asyncio.sleep(2)  # load on the recovered service
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)

    conn = await asyncpg.connect(DATABASE_URL, timeout=10)
    try:
        report = await reconcile.check(conn, org)
        over = await conn.fetch("SELECT variant_id, on_hand, reserved FROM stocks WHERE organization_id = $1 "
                                "AND NOT (0 <= reserved AND reserved <= on_hand)", org)
        states = {r["reservation_id"]: r["statuses"] for r in await conn.fetch(
            "SELECT reservation_id, array_agg(DISTINCT status) AS statuses FROM reservation_lines "
            "WHERE organization_id = $1 GROUP BY reservation_id", org)}
    finally:
        await conn.close()
    lost = [rid for rid in tally.reserved if rid not in states]
    wrong = [rid for rid, state in tally.reserved.items()
             if rid in states and rid not in tally.uncertain and set(states[rid]) != {state}]
    violations = len(report.drifts) + len(over) + len(lost) + len(wrong)
    print(f"\nfaults/postgres-outage: calls {sum(tally.outcomes.values())}, OK {tally.outcomes['OK']}, "
          f"failed { {k: v for k, v in tally.outcomes.items() if k != 'OK'} }, during outage "
          f"{dict(during)}, recovery {recovery:.2f} s, slowest call {tally.slowest:.2f} s, "
          f"invariant violations {violations}")
    assert not tally.forbidden, tally.forbidden[:5]
    assert sum(v for k, v in during.items() if k != "OK") > 0, f"the outage was not noticed: {during}"
    assert tally.slowest < 6.0, "a call outlived its 5 s deadline"
    assert report.drifts == (), [d.describe() for d in report.drifts]
    assert not over, over
    assert not lost, f"acknowledged reservations missing in Postgres: {lost[:5]}"
    assert not wrong, [(rid, tally.reserved[rid], states[rid]) for rid in wrong[:5]]
