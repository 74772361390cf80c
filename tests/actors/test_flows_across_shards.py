"""The gateway's flows across shards when a shard's answer fails: compensation of ReserveStock
and ConfirmReservation, against real `ShardCore`s and the real Postgres.

The transport between them is a direct call (`DirectBridge`), so that a test can decide
what a shard's answer is: the shard's own (`process`), or `unavailable` with nothing done (the
shard is down), or `unavailable` after the shard committed (the answer was lost). Everything
else is the real thing: the flows, the shards' decisions and commits, the gateway's reads.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import pytest

from actors.envelopes import ShardConfigure
from actors.keys import reservation_id, shard_of
from actors.messages import (
    AbortReservation,
    Command,
    ConfirmReservation,
    DoneResult,
    RecordMovement,
    Rejected,
    ReleaseReservation,
    Reply,
    ReservationResult,
    ReserveLine,
    ReserveStock,
)
from actors.shard import ShardCore
from gateway import flows
from gateway.config import Settings
from gateway.flows import Core, FlowError
from gateway.pb import inventory_pb2 as pb
from gateway.service import AdminServicer
from persistence import queries
from persistence.migrate import migrate

DSN = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
SHARDS = 2
BASE_LOCK = 10_100  # lock ids no service (and no other test module) uses

UNAVAILABLE = Rejected("unavailable", "lost the connection to the shard; retry")


class DirectBridge:
    """Commands straight to the shards' `process`, one batch per call; `down` shards answer
    unavailable without being asked; (shard, command type) in `lose_reply`: unavailable after
    the shard committed; `before(shard, command)` runs first (what happens at that shard just
    before the command reaches it)."""

    shard_count = SHARDS

    def __init__(self, cores: list[ShardCore]) -> None:
        self.cores = cores
        self.down: set[int] = set()
        self.lose_reply: set[tuple[int, type]] = set()
        self.before: Callable[[int, Command], Awaitable[None]] | None = None

    async def call(self, shard: int, command: Command) -> Reply:
        if self.before is not None:
            await self.before(shard, command)
        if shard in self.down:
            return UNAVAILABLE
        [reply] = await self.cores[shard].process([command], time.time())
        return UNAVAILABLE if (shard, type(command)) in self.lose_reply else reply

    async def call_many(self, calls: Sequence[tuple[int, Command]]) -> list[Reply]:
        return [await self.call(s, c) for s, c in calls]


@pytest.fixture
async def env() -> tuple[Core, DirectBridge, asyncpg.Pool, str]:
    await migrate(DSN)
    cores = []
    for s in range(SHARDS):
        c = ShardCore(ShardConfigure(s, SHARDS, DSN))
        c.store.lock_id = BASE_LOCK + s
        cores.append(c)
    pool = await asyncpg.create_pool(DSN, min_size=1, max_size=2)
    bridge = DirectBridge(cores)
    org = "org-" + uuid.uuid4().hex[:12]
    try:
        yield Core(Settings(database_url=DSN), bridge, pool), bridge, pool, org  # type: ignore[arg-type]
    finally:
        for c in cores:
            await c.stop()
        await pool.close()


def variant_in(org: str, shard: int) -> str:
    return next(f"v{i}" for i in range(1000) if shard_of(org, f"v{i}", SHARDS) == shard)


async def stocked(bridge: DirectBridge, org: str) -> tuple[str, str]:
    """A variant on each shard, 10 units of each in w1."""
    v0, v1 = variant_in(org, 0), variant_in(org, 1)
    for s, v in ((0, v0), (1, v1)):
        [r] = await bridge.cores[s].process([RecordMovement(org, v, "w1", "receipt", 10, create_if_missing=True)],
                                            time.time())
        assert not isinstance(r, Rejected), r
    return v0, v1


async def lines(pool: asyncpg.Pool, org: str) -> dict[str, str]:
    return dict(await pool.fetch("SELECT variant_id, status FROM reservation_lines WHERE organization_id=$1", org))


async def reserved(pool: asyncpg.Pool, org: str) -> dict[str, int]:
    return dict(await pool.fetch("SELECT variant_id, reserved FROM stocks WHERE organization_id=$1", org))


async def test_a_retry_failing_on_one_shard_leaves_the_reservation_it_replayed_on_another(env) -> None:  # type: ignore[no-untyped-def]
    """The order was reserved (and the Order Service may have confirmed it). A retry of it (a
    client's, or `order.placed` after the call) replays one part and fails on the other: its
    compensation must not abort the replayed part, which the first call made."""
    core, bridge, pool, org = env
    v0, v1 = await stocked(bridge, org)
    items = {(v0, ""): 3, (v1, ""): 4}
    made = await flows.reserve(core, org, "order-1", items, time.time() + 60)
    assert not made.replayed
    bridge.down = {1}
    with pytest.raises(FlowError) as failed:
        await flows.reserve(core, org, "order-1", items, time.time() + 60)
    assert failed.value.code == "unavailable"
    assert await lines(pool, org) == {v0: "active", v1: "active"}
    assert await reserved(pool, org) == {v0: 3, v1: 4}
    bridge.down = set()
    again = await flows.reserve(core, org, "order-1", items, time.time() + 60)
    assert again.replayed and again.expires_at == made.expires_at  # the first call's TTL, not a new one


async def test_a_failed_call_aborts_the_part_it_made(env) -> None:  # type: ignore[no-untyped-def]
    core, bridge, pool, org = env
    v0, v1 = await stocked(bridge, org)
    with pytest.raises(FlowError) as failed:
        await flows.reserve(core, org, "order-2", {(v0, ""): 3, (v1, ""): 11}, time.time() + 60)
    assert failed.value.code == "insufficient_stock"
    assert await lines(pool, org) == {}
    assert await reserved(pool, org) == {v0: 0, v1: 0}


async def test_a_confirm_that_finds_a_part_expired_releases_the_parts_whose_answer_was_lost(env) -> None:  # type: ignore[no-untyped-def]
    """One part expires as the confirm reaches it; the other's confirm commits but its answer is
    lost. The call fails FAILED_PRECONDITION (expired); no part may stay confirmed (no TTL)."""
    core, bridge, pool, org = env
    v0, v1 = await stocked(bridge, org)
    await flows.reserve(core, org, "order-3", {(v0, ""): 3, (v1, ""): 4}, time.time() + 60)
    rid = reservation_id(org, "order-3")

    async def expire_part_0(shard: int, command: Command) -> None:
        if shard == 0 and isinstance(command, ConfirmReservation):
            [r] = await bridge.cores[0].process([ReleaseReservation(org, rid, (v0,), "expired")], time.time())
            assert not isinstance(r, Rejected), r

    bridge.before, bridge.lose_reply = expire_part_0, {(1, ConfirmReservation)}
    with pytest.raises(FlowError) as failed:
        await flows.confirm(core, org, rid)
    assert failed.value.code == "closed"
    assert await lines(pool, org) == {v0: "released", v1: "released"}
    assert await reserved(pool, org) == {v0: 0, v1: 0}


async def test_a_confirm_retried_after_a_part_closed_releases_what_is_still_held(env) -> None:  # type: ignore[no-untyped-def]
    """A confirm that could not release the rest (that shard was down) answered unavailable; the
    retry finds one part closed and another confirmed, and must release that one first."""
    core, bridge, pool, org = env
    v0, v1 = await stocked(bridge, org)
    await flows.reserve(core, org, "order-4", {(v0, ""): 3, (v1, ""): 4}, time.time() + 60)
    rid = reservation_id(org, "order-4")
    [r] = await bridge.cores[1].process([ConfirmReservation(org, rid, (v1,))], time.time())
    assert not isinstance(r, Rejected), r
    [r] = await bridge.cores[0].process([ReleaseReservation(org, rid, (v0,), "expired")], time.time())
    assert not isinstance(r, Rejected), r
    bridge.down = {1}
    with pytest.raises(FlowError) as failed:
        await flows.confirm(core, org, rid)
    assert failed.value.code == "unavailable"  # the rest could not be released: retry
    assert await lines(pool, org) == {v0: "released", v1: "confirmed"}
    bridge.down = set()
    with pytest.raises(FlowError) as failed:
        await flows.confirm(core, org, rid)
    assert failed.value.code == "closed"
    assert await lines(pool, org) == {v0: "released", v1: "released"}
    assert await reserved(pool, org) == {v0: 0, v1: 0}


async def test_a_warehouse_deactivated_while_a_shard_cannot_take_it_fails_until_every_shard_has(env) -> None:  # type: ignore[no-untyped-def]
    """A shard that misses the new state would go on reserving from an inactive warehouse: the
    call must not answer OK then, and its retry must reach that shard."""
    core, bridge, pool, org = env
    admin = AdminServicer(core)
    v0, v1 = await stocked(bridge, org)
    await admin._upsert_warehouse(pb.Warehouse(organization_id=org, warehouse_id="w1", name="W1", active=True))
    bridge.down = {1}
    with pytest.raises(FlowError) as failed:
        await admin._upsert_warehouse(pb.Warehouse(organization_id=org, warehouse_id="w1", name="W1", active=False))
    assert failed.value.code == "unavailable" and "shards 1" in failed.value.message
    bridge.down = set()
    await admin._upsert_warehouse(pb.Warehouse(organization_id=org, warehouse_id="w1", name="W1", active=False))
    for v in (v0, v1):
        with pytest.raises(FlowError) as refused:
            await flows.reserve(core, org, "order-" + v, {(v, ""): 1}, time.time() + 60)
        assert refused.value.code == "insufficient_stock"
    assert await reserved(pool, org) == {v0: 0, v1: 0}


async def test_an_order_cancelled_before_its_reservation_is_not_reserved_later(env) -> None:  # type: ignore[no-untyped-def]
    """order.cancelled overtook its order.placed (the placed failed once and went to the retry
    queue, or another gateway is still on it): the late reservation must be refused, not held
    until its TTL for a cancelled order."""
    core, bridge, pool, org = env
    v0, v1 = await stocked(bridge, org)
    assert await flows.cancel_order(core, org, "order-5", "order cancelled") == "nothing reserved"
    with pytest.raises(FlowError) as refused:
        await flows.reserve(core, org, "order-5", {(v0, ""): 1, (v1, ""): 2}, time.time() + 60)
    assert refused.value.code == "closed" and "cancelled" in refused.value.message
    for c in bridge.cores:  # from what Postgres remembers as well
        c.forget_states()
    with pytest.raises(FlowError) as refused:
        await flows.reserve(core, org, "order-5", {(v0, ""): 1}, time.time() + 60)
    assert refused.value.code == "closed"
    assert await lines(pool, org) == {}
    assert await reserved(pool, org) == {v0: 0, v1: 0}
    # an order reserved first is released, as before; a cancellation again changes nothing
    await flows.reserve(core, org, "order-6", {(v0, ""): 1, (v1, ""): 2}, time.time() + 60)
    assert await flows.cancel_order(core, org, "order-6", "order cancelled") == "released"
    assert await flows.cancel_order(core, org, "order-6", "order cancelled") == "already released"
    assert await reserved(pool, org) == {v0: 0, v1: 0}


async def test_the_cancellation_mark_is_not_left_on_a_reservation_made_meanwhile(env) -> None:  # type: ignore[no-untyped-def]
    """The mark and a shard's first write of the reservation meet on the header's key: a mark
    that comes second finds open lines and is not left (the flow then releases them)."""
    core, bridge, pool, org = env
    v0, _ = await stocked(bridge, org)
    await flows.reserve(core, org, "order-7", {(v0, ""): 1}, time.time() + 60)
    rid = reservation_id(org, "order-7")
    assert not await queries.mark_cancelled(pool, org, rid, "order-7")
    assert await pool.fetchval("SELECT status FROM reservations WHERE organization_id=$1", org) == "active"


async def test_a_cancellation_marks_again_when_a_reservation_made_meanwhile_is_undone_meanwhile(  # type: ignore[no-untyped-def]
        env, monkeypatch) -> None:
    """The cancellation finds nothing; a concurrent call makes a part (so the mark is refused),
    then undoes it (its other part failed): the cancellation must still leave its mark."""
    core, bridge, pool, org = env
    v0, _ = await stocked(bridge, org)
    rid = reservation_id(org, "order-8")
    real = queries.mark_cancelled
    calls = []

    async def interleaved(*args: object) -> bool:
        calls.append(args)
        if len(calls) == 1:  # the concurrent call's part commits just before this mark...
            [r] = await bridge.cores[0].process(
                [ReserveStock(org, rid, "order-8", "h", time.time() + 60, (ReserveLine(v0, "", 1),))], time.time())
            assert isinstance(r, ReservationResult)
            marked = await real(*args)  # type: ignore[arg-type]
            [r] = await bridge.cores[0].process([AbortReservation(org, rid, (v0,))], time.time())  # ...and is undone
            assert r == DoneResult(changed=True)
            return marked
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(queries, "mark_cancelled", interleaved)
    assert await flows.cancel_order(core, org, "order-8", "order cancelled") == "nothing reserved"
    assert len(calls) == 2
    assert await pool.fetchval("SELECT status FROM reservations WHERE organization_id=$1", org) == "cancelled"
    with pytest.raises(FlowError) as refused:
        await flows.reserve(core, org, "order-8", {(v0, ""): 1}, time.time() + 60)
    assert refused.value.code == "closed"
