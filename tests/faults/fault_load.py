"""The mixed load and the invariant check shared by the fault scenarios."""

from __future__ import annotations

import asyncio
import collections
import random
import time
import uuid
from dataclasses import dataclass, field

import asyncpg
import grpc

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence import reconcile

VARIANTS = [f"v{i}" for i in range(6)]


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


async def prepare(admin: pbg.InventoryAdminServiceStub, org: str) -> None:
    await admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id="w1", name="w1", active=True))
    for v in VARIANTS:
        await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id=v, warehouse_id="w1",
                                                      type=pb.MOVEMENT_TYPE_RECEIPT, quantity=50))


async def violations(database_url: str, org: str, tally: Tally) -> list[str]:
    """The invariants: stocks = ledger and open lines, 0 <= reserved <= on_hand, every OK reservation in
    Postgres in the state of its last OK call. One string per violation."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        report = await reconcile.check(conn, org)
        over = await conn.fetch("SELECT variant_id, on_hand, reserved FROM stocks WHERE organization_id = $1 "
                                "AND NOT (0 <= reserved AND reserved <= on_hand)", org)
        states = {r["reservation_id"]: set(r["statuses"]) for r in await conn.fetch(
            "SELECT reservation_id, array_agg(DISTINCT status) AS statuses FROM reservation_lines "
            "WHERE organization_id = $1 GROUP BY reservation_id", org)}
    finally:
        await conn.close()
    found = [f"drift {d.variant_id}/{d.warehouse_id}: {d.describe()}" for d in report.drifts]
    found += [f"oversold {dict(r)}" for r in over]
    found += [f"acknowledged reservation {rid} missing" for rid in tally.reserved if rid not in states]
    found += [f"reservation {rid}: last OK {state}, in Postgres {sorted(states[rid])}"
              for rid, state in tally.reserved.items()
              if rid in states and rid not in tally.uncertain and states[rid] != {state}]
    return found
