"""The shard host against the real Postgres: batches, fencing, timers, restarts.

`ShardCore` is the shard without Thespian, so most of these run on the test's event
loop; the last tests run a real `StockShard` on multiprocTCPBase.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid

import asyncpg
import pytest

from actors.envelopes import ShardConfigure
from actors.keys import shard_of
from actors.messages import (
    AbortReservation,
    ConfirmReservation,
    DoneResult,
    ReadStock,
    RecordMovement,
    Rejected,
    ReleaseReservation,
    ReservationResult,
    ReserveLine,
    ReserveStock,
    SetWarehouseActive,
    StockLevelsResult,
)
from actors.shard import REPLAY_MEMORY, ShardCore, TimerHeap, states_of
from persistence import queries, store
from persistence.migrate import migrate
from persistence.store import _batch_statement

DSN = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
SHARDS = 3
# Shard ids far above any a running service uses, so these tests never fight a service for a lock.
BASE_SHARD = 10_000


@pytest.fixture(scope="module")
async def db() -> asyncpg.Connection:
    await migrate(DSN)
    conn = await asyncpg.connect(DSN)
    yield conn
    await conn.close()


def core(shard_id: int = 0) -> ShardCore:
    # shard_count SHARDS for routing, but a lock id no service uses
    c = ShardCore(ShardConfigure(shard_id, SHARDS, DSN))
    c.store.lock_id = BASE_SHARD + shard_id
    return c


def org() -> str:
    return "org-" + uuid.uuid4().hex[:12]


def variant_in(org_id: str, shard: int, prefix: str = "v") -> str:
    for i in range(1000):
        v = f"{prefix}{i}"
        if shard_of(org_id, v, SHARDS) == shard:
            return v
    raise AssertionError("no variant found")


async def receive(c: ShardCore, o: str, v: str, wh: str, qty: int) -> None:
    [reply] = await c.process([RecordMovement(o, v, wh, "receipt", qty, create_if_missing=True)], time.time())
    assert not isinstance(reply, Rejected), reply


def reserve(o: str, rid: str, v: str, qty: int, ttl: float, wh: str = "") -> ReserveStock:
    return ReserveStock(o, rid, "order-" + rid, "h-" + rid, time.time() + ttl, (ReserveLine(v, wh, qty),))


async def reserved_two_of_five(c: ShardCore, o: str, v: str) -> ReserveStock:
    """5 received in w1, reservation r1 of 2 made: returns its ReserveStock, to retry."""
    await receive(c, o, v, "w1", 5)
    cmd = reserve(o, "r1", v, 2, 60)
    [made] = await c.process([cmd], time.time())
    assert isinstance(made, ReservationResult)
    return cmd


async def reserved_and_released(c: ShardCore, o: str, v: str, qty: int) -> ReserveStock:
    """5 received in w1, reservation r1 of `qty` made and released: returns its ReserveStock, to retry."""
    await receive(c, o, v, "w1", 5)
    cmd = reserve(o, "r1", v, qty, 60)
    [made] = await c.process([cmd], time.time())
    assert isinstance(made, ReservationResult)
    await c.process([ReleaseReservation(o, "r1", (v,))], time.time())
    return cmd


async def test_a_batch_is_decided_in_arrival_order_and_committed_whole(db: asyncpg.Connection) -> None:
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        await receive(c, o, v, "w1", 5)
        replies = await c.process([reserve(o, f"r{i}", v, 2, 60) for i in range(4)], time.time())
        assert [type(r).__name__ for r in replies] == ["ReservationResult"] * 2 + ["Rejected"] * 2
        row = await db.fetchrow("SELECT on_hand, reserved, version FROM stocks WHERE organization_id=$1", o)
        assert (row["on_hand"], row["reserved"]) == (5, 4)
        lines = await db.fetchval("SELECT sum(quantity) FROM reservation_lines WHERE organization_id=$1"
                                  " AND status='active'", o)
        assert lines == 4
        ledger = await db.fetchrow("SELECT sum(on_hand_delta) oh, sum(reserved_delta) rs, max(version) v"
                                   " FROM movements WHERE organization_id=$1", o)
        assert (ledger["oh"], ledger["rs"], ledger["v"]) == (5, 4, row["version"])
    finally:
        await c.stop()


async def test_a_stock_changed_behind_the_shard_fails_the_batch_and_is_reloaded(db: asyncpg.Connection) -> None:
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        await receive(c, o, v, "w1", 5)
        # Another writer (a partitioned twin) bumps the version: our commit must not land.
        await db.execute("UPDATE stocks SET version = version + 10, on_hand = 3 WHERE organization_id=$1", o)
        events_before = await db.fetchval("SELECT count(*) FROM outbox WHERE organization_id=$1", o)
        [reply] = await c.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(reply, Rejected) and reply.code == "unavailable"
        assert await db.fetchval("SELECT count(*) FROM reservation_lines WHERE organization_id=$1", o) == 0
        # nothing else of the batch either: its one statement was aborted as a whole
        assert await db.fetchval("SELECT count(*) FROM reservations WHERE organization_id=$1", o) == 0
        assert await db.fetchval(
            "SELECT count(*) FROM movements WHERE organization_id=$1 AND type = 'reserve'", o) == 0
        assert await db.fetchval("SELECT count(*) FROM outbox WHERE organization_id=$1", o) == events_before
        # The next batch reloads from Postgres and sees the other writer's state.
        [levels] = await c.process([ReadStock(o, v)], time.time())
        assert isinstance(levels, StockLevelsResult) and levels.levels[0].on_hand == 3
    finally:
        await c.stop()


async def test_a_second_incarnation_of_a_shard_cannot_serve(db: asyncpg.Connection) -> None:
    first, second, o = core(1), core(1), org()
    v = variant_in(o, 1)
    try:
        await receive(first, o, v, "w1", 5)
        [reply] = await second.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(reply, Rejected) and reply.code == "unavailable"
        assert "another process" in reply.message
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1", o) == 0
        await first.stop()
        await asyncio.sleep(0.2)  # (after a failed attempt, the next one waits 0.1 s: RECONNECT_MAX below)
        [reply] = await second.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(reply, ReservationResult)
        assert not second.superseded  # it had never served: it waited for the lock
    finally:
        await first.stop()
        await second.stop()


async def test_an_incarnation_told_to_take_over_ends_the_holder_which_then_commits_nothing(
        db: asyncpg.Connection) -> None:
    """A leader restarted places every shard anew; the old incarnations on the members were never
    told and keep their locks. The new one, after waiting (TAKE_OVER_AFTER, in the actor), ends the
    holder's Postgres session: it takes the lock, and the orphan can commit nothing again."""
    orphan, new, o = core(2), core(2), org()
    v = variant_in(o, 2)
    try:
        await receive(orphan, o, v, "w1", 5)
        with pytest.raises(store.ShardLockHeld):
            await new.start()
        await new.start(take_over=True)
        [made] = await new.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(made, ReservationResult)
        [refused] = await orphan.process([reserve(o, "r2", v, 1, 60)], time.time())
        assert isinstance(refused, Rejected) and refused.code == "unavailable", refused
        [refused] = await orphan.process([reserve(o, "r3", v, 1, 60)], time.time())
        assert isinstance(refused, Rejected) and refused.code == "unavailable", refused
        assert orphan.superseded  # it found the lock held when it reconnected
        lines = await db.fetch("SELECT reservation_id FROM reservation_lines WHERE organization_id=$1", o)
        assert [r[0] for r in lines] == ["r1"]
    finally:
        await orphan.stop()
        await new.stop()


async def test_an_idle_orphan_learns_it_was_superseded_and_backs_off_instead_of_reconnecting_at_every_timer(
        db: asyncpg.Connection) -> None:
    """An orphan gets no batches (the gateways route to the new incarnation): its periodic check
    finds its session ended and the lock held, and marks it superseded (its actor then stops it).
    Until then, its overdue timers' wakeups must not each open a connection (20 ms apart)."""
    orphan, new, waiting, o = core(2), core(2), core(2), org()
    v = variant_in(o, 2)
    try:
        await receive(orphan, o, v, "w1", 5)
        await orphan.check()
        assert not orphan.superseded and orphan.connects == 1  # its session is there
        await new.start(take_over=True)
        # Its session is gone: a check drops it (if the connection did not notice by itself),
        # and a check reconnecting finds the lock held.
        for _ in range(2):
            await orphan.check()
        assert orphan.superseded and orphan.connects == 2
        for _ in range(20):  # the wakeups of overdue timers, as the actor runs them
            [refused] = await orphan.process([reserve(o, "r9", v, 1, 60)], time.time())
            assert isinstance(refused, Rejected) and refused.code == "unavailable"
        assert orphan.connects == 2  # backing off (RECONNECT_MAX): no attempt in between
        # A new incarnation still waiting for the lock never served: it is not superseded.
        with pytest.raises(store.ShardLockHeld):
            await waiting.start()
        [refused] = await waiting.process([reserve(o, "r8", v, 1, 60)], time.time())
        assert isinstance(refused, Rejected) and not waiting.superseded
        assert await db.fetchval("SELECT count(*) FROM reservation_lines WHERE organization_id = $1", o) == 0
    finally:
        for c in (orphan, new, waiting):
            await c.stop()


async def test_a_shard_whose_own_old_session_still_holds_its_lock_ends_it_and_serves_on(
        db: asyncpg.Connection) -> None:
    """A network blip (or a ping that timed out): the shard dropped its session, Postgres kept the
    backend and the lock. That holder is not another copy: the shard ends it and serves at once
    (it used to wait for its registrar's reconfigure and TAKE_OVER_AFTER; since e5a1438 it took
    itself for superseded)."""
    c, o = core(2), org()
    v = variant_in(o, 2)
    try:
        await receive(c, o, v, "w1", 5)
        stale, c.store.conn = c.store.conn, None  # the shard lost it; the session lives on
        assert stale is not None and not stale.is_closed()
        [made] = await c.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(made, ReservationResult), made
        assert not c.superseded and c.connects == 2
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await stale.fetchval("SELECT 1")  # ended
    finally:
        await c.stop()


async def test_a_reconnecting_shard_ends_only_its_own_old_session_never_another_holder(
        db: asyncpg.Connection) -> None:
    """A holder that is not the session recorded for the shard's epoch (a fresh copy that took the
    lock and has not moved the epoch on yet; a copy of an older version) is left alone: the
    reconnecting shard answers unavailable and tries again later."""
    c, o = core(2), org()
    v = variant_in(o, 2)
    other = await asyncpg.connect(DSN)
    try:
        await receive(c, o, v, "w1", 5)
        await c.store.close()  # its session ends; another takes the free lock
        assert await other.fetchval("SELECT pg_try_advisory_lock($1, $2)", store.SHARD_LOCK_NAMESPACE,
                                    BASE_SHARD + 2)
        [refused] = await c.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(refused, Rejected) and "another process" in refused.message, refused
        assert not c.superseded and await other.fetchval("SELECT 1") == 1  # still there
        await other.execute("SELECT pg_advisory_unlock_all()")
        await asyncio.sleep(0.2)  # (its next attempt waits 0.1 s)
        [made] = await c.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(made, ReservationResult), made
    finally:
        await other.close()
        await c.stop()


async def test_a_take_over_ends_only_this_database_s_holders_and_keeps_its_epoch_if_it_fails(
        db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Advisory locks are per database: a take-over here must not end a session that holds the
    same lock id in another database (another deployment on the same server). And the epoch a
    take-over moved on stays this copy's even if the take-over fails: the next attempt must not
    find itself superseded by its own claim."""
    other_db = "inv_shard_other_db"
    if not await db.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", other_db):
        await db.execute(f'CREATE DATABASE "{other_db}"')
    lock = BASE_SHARD + 5
    elsewhere = await asyncpg.connect(DSN.rsplit("/", 1)[0] + "/" + other_db)
    here = await asyncpg.connect(DSN)
    c = core(5)
    try:
        for conn in (elsewhere, here):
            assert await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", store.SHARD_LOCK_NAMESPACE, lock)
        await c.start(take_over=True)
        assert await elsewhere.fetchval("SELECT 1") == 1  # untouched
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await here.fetchval("SELECT 1")  # ended
        epoch = c.epoch
        assert epoch is not None
        # a take-over that fails after moving the epoch on (its connection drops meanwhile)
        here = await asyncpg.connect(DSN)
        await c.store.close()
        assert await here.fetchval("SELECT pg_try_advisory_lock($1, $2)", store.SHARD_LOCK_NAMESPACE, lock)

        async def dropped(*_: object) -> bool:
            raise ConnectionResetError("dropped during the take-over")

        monkeypatch.setattr(c.store, "_wait_for_lock", dropped)
        with pytest.raises(ConnectionResetError):
            await c.start(take_over=True)
        assert c.epoch == epoch + 1 and not c.superseded  # the claim is its own
        monkeypatch.undo()
        await c.start(take_over=True)
        assert not c.superseded and c.store.healthy
    finally:
        await c.stop()
        await elsewhere.close()
        await here.close()


async def test_a_copy_whose_claim_s_reply_was_lost_knows_the_epoch_and_its_old_session_for_its_own(
        db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """The statement that took the lock and moved the epoch on committed, its reply was lost, and
    Postgres kept the session (holding the lock): the copy knows neither. Its claim's token tells
    it the epoch is its own, so it ends that session and serves, instead of being refused until a
    take-over (TAKE_OVER_AFTER)."""
    c, o = core(1), org()
    v = variant_in(o, 1)
    real = store.ShardStore._lock_as_new
    kept: list[asyncpg.Connection] = []

    async def reply_lost(self: store.ShardStore, conn: asyncpg.Connection) -> bool:
        # (the statement runs on a session the test keeps: the one Postgres would keep)
        session = await asyncpg.connect(DSN)
        kept.append(session)
        assert await real(self, session)
        self.epoch = None  # (what the copy would know without the reply)
        raise ConnectionResetError("reply lost")

    monkeypatch.setattr(store.ShardStore, "_lock_as_new", reply_lost)
    try:
        with pytest.raises(ConnectionResetError):
            await c.start()
        monkeypatch.undo()
        assert c.epoch is None and not kept[0].is_closed()
        await asyncio.sleep(0.2)  # (its next attempt waits 0.1 s)
        await receive(c, o, v, "w1", 5)  # a batch: it reconnects
        assert c.store.healthy and c.epoch is not None and not c.superseded
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await kept[0].fetchval("SELECT 1")  # ended
    finally:
        for conn in kept:
            if not conn.is_closed():
                await conn.close(timeout=1)
        await c.stop()


async def test_an_epoch_moved_on_by_an_older_version_is_not_taken_for_this_copy_s_claim(
        db: asyncpg.Connection) -> None:
    """A copy of the previous version moves the epoch on without writing claimed_by: the row
    still names this copy's token, but for an older epoch. This copy is superseded, and the
    other's session is left alone (taken for its own, it was ended, and the two took turns)."""
    c = core(1)
    old_version = await asyncpg.connect(DSN)
    try:
        await c.start()
        await c.store.close()  # its session drops
        assert await old_version.fetchval("SELECT pg_try_advisory_lock($1, $2)", store.SHARD_LOCK_NAMESPACE,
                                          BASE_SHARD + 1)
        await old_version.execute(
            "UPDATE shard_epochs SET epoch = epoch + 1, holder_pid = pg_backend_pid(), holder_start ="
            " (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()) WHERE lock_id = $1",
            BASE_SHARD + 1)
        await c.check()  # it reconnects
        assert c.superseded and not c.store.healthy
        assert await old_version.fetchval("SELECT 1") == 1  # not ended
    finally:
        await old_version.close()
        await c.stop()


async def test_an_orphan_never_takes_a_free_lock_from_the_newer_copy(db: asyncpg.Connection) -> None:
    """When the newer copy's session drops, the lock is free for a moment: an orphan reconnecting
    then must not take it (the newer copy would wait TAKE_OVER_AFTER): it finds the shard's epoch
    moved on, and stops."""
    orphan, placed, o = core(2), core(2), org()
    v = variant_in(o, 2)
    try:
        await receive(orphan, o, v, "w1", 5)
        await placed.start(take_over=True)
        assert placed.epoch == orphan.epoch + 1  # type: ignore[operator]
        await placed.stop()  # its session drops: the lock is free
        for _ in range(2):
            await orphan.check()
        assert orphan.superseded and not orphan.store.healthy and orphan.connects == 2
        assert await db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1"
                                 " AND objid = $2 AND granted", store.SHARD_LOCK_NAMESPACE, BASE_SHARD + 2) == 0
        [made] = await placed.process([reserve(o, "r1", v, 1, 60)], time.time())  # it reconnects at once
        assert isinstance(made, ReservationResult), made
        assert not placed.superseded
    finally:
        await orphan.stop()
        await placed.stop()


async def test_open_reservations_expire_after_a_restart(db: asyncpg.Connection) -> None:
    c, o = core(), org()
    v = variant_in(o, 0)
    await receive(c, o, v, "w1", 5)
    [r] = await c.process([reserve(o, "r1", v, 2, 1.0)], time.time())
    assert isinstance(r, ReservationResult)
    await c.stop()
    await asyncio.sleep(1.1)
    restarted = core()
    try:
        # No command names this stock: only the timer index loaded at start can find it.
        await restarted.process([], time.time())
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1", o) == 0
        assert await db.fetchval("SELECT status FROM reservation_lines WHERE organization_id=$1", o) == "expired"
        n = await db.fetchval("SELECT count(*) FROM outbox WHERE organization_id=$1"
                              " AND event_name='inventory.reservation.expired'", o)
        assert n == 1
    finally:
        await restarted.stop()


async def test_two_shards_opening_one_reservation_at_once_both_commit(db: asyncpg.Connection) -> None:
    """Both halves of a cross-shard reservation insert its header in concurrent transactions: the
    second must merge into the first. (Under load the second once hit the unique (organization,
    order) index, which ON CONFLICT on the primary key does not cover, and its whole batch failed;
    migration 004 made that index plain. The window is too narrow to hit on purpose here.)"""
    a, b, o = core(0), core(1), org()
    va, vb = variant_in(o, 0), variant_in(o, 1)
    try:
        await receive(a, o, va, "w1", 1000)
        await receive(b, o, vb, "w1", 1000)
        for i in range(40):
            rid, expires = f"rx{i}", time.time() + 60
            ra, rb = await asyncio.gather(*(
                c.process([ReserveStock(o, rid, f"order-{i}", "h", expires, (ReserveLine(v, "", 1),))], time.time())
                for c, v in ((a, va), (b, vb))))
            assert isinstance(ra[0], ReservationResult) and isinstance(rb[0], ReservationResult), (i, ra, rb)
        rows = await db.fetch("SELECT open_lines FROM reservations WHERE organization_id=$1", o)
        assert [r["open_lines"] for r in rows] == [2] * 40
    finally:
        await a.stop()
        await b.stop()


async def test_a_reservation_across_two_shards_emits_one_expired_event(db: asyncpg.Connection) -> None:
    a, b, o = core(0), core(1), org()
    va, vb = variant_in(o, 0), variant_in(o, 1)
    try:
        await receive(a, o, va, "w1", 5)
        await receive(b, o, vb, "w1", 5)
        expires = time.time() + 0.5
        for c, v in ((a, va), (b, vb)):
            [r] = await c.process([ReserveStock(o, "rx", "order-x", "hx", expires, (ReserveLine(v, "", 1),))],
                                  time.time())
            assert isinstance(r, ReservationResult)
        assert await db.fetchval("SELECT open_lines FROM reservations WHERE organization_id=$1", o) == 2
        await asyncio.sleep(0.6)
        await a.process([], time.time())
        await b.process([], time.time())
        row = await db.fetchrow("SELECT open_lines, status FROM reservations WHERE organization_id=$1", o)
        assert (row["open_lines"], row["status"]) == (0, "expired")
        events = await db.fetch("SELECT payload FROM outbox WHERE organization_id=$1"
                                " AND event_name='inventory.reservation.expired'", o)
        assert len(events) == 1
        assert '"order_id": "order-x"' in events[0]["payload"]
    finally:
        await a.stop()
        await b.stop()


async def test_a_retried_reservation_after_release_is_refused_not_redone(db: asyncpg.Connection) -> None:
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        cmd = await reserved_and_released(c, o, v, 2)
        c.forget_states()  # as after a failed batch: the retry must be answered from Postgres
        [again] = await c.process([cmd], time.time())
        assert isinstance(again, Rejected) and again.code == "closed"
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1", o) == 0
    finally:
        await c.stop()


async def test_new_reservations_are_checked_against_closed_ones_in_their_commit(db: asyncpg.Connection) -> None:
    """A batch takes reservations it has no open line of for new, without a read first; its
    commit finds the one that had closed, and the batch is decided again: that retry is
    refused, the rest of the batch served, and Postgres holds exactly the batch's effect."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        retried = await reserved_and_released(c, o, v, 2)
        [fresh] = await c.process([reserve(o, "r2", v, 1, 60)], time.time())  # no prior: decided once
        assert isinstance(fresh, ReservationResult) and c.redecided == 0
        c.forget_states()
        new, again, other = await c.process([reserve(o, "r3", v, 1, 60), retried, reserve(o, "r4", v, 1, 60)],
                                            time.time())
        assert c.redecided == 1
        assert isinstance(again, Rejected) and again.code == "closed", again
        assert isinstance(new, ReservationResult) and isinstance(other, ReservationResult)
        row = await db.fetchrow("SELECT reserved, version FROM stocks WHERE organization_id=$1", o)
        assert row["reserved"] == 3  # r2, r3, r4
        statuses = dict(await db.fetch("SELECT reservation_id, status FROM reservation_lines WHERE organization_id=$1", o))
        assert statuses == {"r1": "released", "r2": "active", "r3": "active", "r4": "active"}
        assert c.status().redecided_batches == 1
    finally:
        await c.stop()


async def test_a_closed_reservation_retried_when_stock_is_short_is_refused_closed(db: asyncpg.Connection) -> None:
    """Taken for new, the retry would be refused for want of stock and write nothing: the
    shard must then look its prior up, and answer `closed` as before."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        retried = await reserved_and_released(c, o, v, 5)
        [taken] = await c.process([reserve(o, "r2", v, 5, 60)], time.time())
        assert isinstance(taken, ReservationResult)
        c.forget_states()
        [again] = await c.process([retried], time.time())
        assert isinstance(again, Rejected) and again.code == "closed", again
        assert c.redecided == 1
    finally:
        await c.stop()


async def test_idle_stocks_are_passivated_but_those_with_timers_stay(db: asyncpg.Connection) -> None:
    c, o = core(), org()
    c.cfg = ShardConfigure(0, SHARDS, DSN, passivate_after=0.2)
    v1, v2 = variant_in(o, 0, "a"), variant_in(o, 0, "b")
    try:
        await receive(c, o, v1, "w1", 5)
        await receive(c, o, v2, "w1", 5)
        await c.process([reserve(o, "r1", v2, 1, 60)], time.time())
        c._next_passivation = 0.0
        await asyncio.sleep(0.3)
        await c.process([], time.time())
        assert (o, v1) not in c.residents
        assert states_of(c.residents.get((o, v2)))
        [levels] = await c.process([ReadStock(o, v1)], time.time())
        assert isinstance(levels, StockLevelsResult) and levels.levels[0].on_hand == 5
    finally:
        await c.stop()


async def test_a_variant_timer_is_armed_again_after_it_fires_even_when_nothing_was_due(db: asyncpg.Connection) -> None:
    """One timer per variant, at its earliest open line: after it fires (here for a line confirmed
    meanwhile, so the firing changes nothing) it must be armed for the next line."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        await receive(c, o, v, "w1", 10)
        t0 = time.time()
        for rid, ttl in (("early", 0.3), ("late", 0.8)):
            [r] = await c.process([reserve(o, rid, v, 1, ttl)], t0)
            assert isinstance(r, ReservationResult)
        armed = c.timers.armed_at  # (other tests' open lines in this database have timers of their own)
        assert armed((o, v)) == pytest.approx(t0 + 0.3, abs=0.05)
        [r] = await c.process([ConfirmReservation(o, "early", (v,))], t0 + 0.1)
        assert not isinstance(r, Rejected), r
        await c.process([], t0 + 0.4)  # the variant's timer fires: nothing is overdue
        assert armed((o, v)) == pytest.approx(t0 + 0.8, abs=0.05)
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1", o) == 2
        await c.process([], t0 + 0.9)  # fires again: "late" expires
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1", o) == 1
        statuses = dict(await db.fetch("SELECT reservation_id, status FROM reservation_lines WHERE organization_id=$1", o))
        assert statuses == {"early": "confirmed", "late": "expired"}
        assert armed((o, v)) is None
    finally:
        await c.stop()


def test_timer_heap_keeps_one_live_timer_per_variant() -> None:
    heap = TimerHeap({})
    heap.arm(10.0, "o", "v")
    heap.arm(12.0, "o", "v")  # later than the live one: nothing changes
    heap.arm(5.0, "o", "v")  # earlier: the 10.0 entry goes stale
    heap.arm(7.0, "o", "w")
    assert len(heap) == 2 and heap.earliest() == 5.0
    assert heap.pop_due(6.0) == [(5.0, "o", "v")]
    assert heap.pop_due(11.0) == [(7.0, "o", "w")]  # the stale 10.0 of v is dropped, not returned
    assert heap.earliest() is None and len(heap) == 0
    heap.arm(3.0, "o", "v")
    heap.disarm(("o", "v"))
    assert heap.pop_due(100.0) == [] and heap.earliest() is None


async def test_after_a_start_lines_beyond_the_timer_horizon_are_armed_as_it_moves_on(db: asyncpg.Connection) -> None:
    """A start arms only the open lines due within the horizon (so it does not scan every open line);
    later ones are armed window by window and still expire on time."""
    o = org()
    near, far = variant_in(o, 0, "near"), variant_in(o, 0, "far")
    first = core()
    t0 = time.time()
    try:
        for v, ttl in ((near, 1.0), (far, 6.0)):
            await receive(first, o, v, "w1", 5)
            [r] = await first.process([reserve(o, f"r-{v}", v, 1, ttl)], t0)
            assert isinstance(r, ReservationResult)
    finally:
        await first.stop()
    c = ShardCore(ShardConfigure(0, SHARDS, DSN, timer_horizon=4.0))
    c.store.lock_id = BASE_SHARD
    try:
        await c.start(t0)
        armed = c.timers.armed_at
        assert armed((o, near)) is not None and armed((o, far)) is None  # far is due after t0 + 4
        await c.process([], t0 + 2.5)  # half the horizon is gone: the next window is armed
        assert armed((o, far)) == pytest.approx(t0 + 6.0, abs=0.5)  # (reserve() stamps its own clock)
        await c.process([], t0 + 6.5)
        statuses = dict(await db.fetch(
            "SELECT variant_id, status FROM reservation_lines WHERE organization_id=$1", o))
        assert statuses == {near: "expired", far: "expired"}
    finally:
        await c.stop()


async def test_after_a_failed_batch_drops_memory_due_lines_still_expire(db: asyncpg.Connection) -> None:
    """What a failed batch does (`process`): close the store and drop every stock from memory
    (`forget_states`, which keeps the armed timers). The next batch starts the shard again, which
    re-arms from Postgres, activates the stock and expires what is due."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        await receive(c, o, v, "w1", 5)
        t0 = time.time()
        [r] = await c.process([reserve(o, "short", v, 2, 0.3)], t0)
        assert isinstance(r, ReservationResult)
        await c.store.close()
        c.forget_states()
        assert c.residents[(o, v)].states is None and c.timers.armed_at((o, v)) is not None
        await c.process([], t0 + 0.5)
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1", o) == 0
        assert await db.fetchval("SELECT status FROM reservation_lines WHERE organization_id=$1", o) == "expired"
        assert c.timers.armed_at((o, v)) is None and len(states_of(c.residents[(o, v)])) == 1
    finally:
        await c.stop()


async def test_a_variant_keeps_every_warehouse_stock_it_gains_in_memory(db: asyncpg.Connection) -> None:
    """One resident stock is kept bare, two or more as a tuple: a stock created in a later batch
    joins the ones already resident, and a reservation can use either."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        await receive(c, o, v, "w1", 2)
        assert [s.warehouse_id for s in states_of(c.residents[(o, v)])] == ["w1"]
        await receive(c, o, v, "w2", 7)
        await receive(c, o, v, "w3", 1)
        assert sorted(s.warehouse_id for s in states_of(c.residents[(o, v)])) == ["w1", "w2", "w3"]
        [r] = await c.process([reserve(o, "big", v, 6, 60)], time.time())
        assert isinstance(r, ReservationResult) and [ln.warehouse_id for ln in r.lines] == ["w2"]
        c.forget_states()  # reloaded from Postgres: the same three stocks
        [levels] = await c.process([ReadStock(o, v)], time.time())
        assert isinstance(levels, StockLevelsResult)
        assert sorted((lv.warehouse_id, lv.reserved) for lv in levels.levels) == [("w1", 0), ("w2", 6), ("w3", 0)]
    finally:
        await c.stop()


async def test_a_reservation_retried_in_the_batch_that_closed_it_is_refused_as_in_a_later_one(
        db: asyncpg.Connection) -> None:
    """A release and a retried ReserveStock of the same order in one batch (two gateways' batches
    merged, or one gateway's): the retry must be refused `closed`, as when it comes a batch later,
    not open the released reservation again."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        cmd = await reserved_two_of_five(c, o, v)
        released, again, other = await c.process(
            [ReleaseReservation(o, "r1", (v,)), cmd, reserve(o, "r2", v, 1, 60)], time.time())
        assert isinstance(released, DoneResult) and released.changed
        assert isinstance(again, Rejected) and again.code == "closed", again
        assert isinstance(other, ReservationResult)  # the rest of the batch still served
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1", o) == 1
        statuses = dict(await db.fetch("SELECT reservation_id, status FROM reservation_lines WHERE organization_id=$1", o))
        assert statuses == {"r1": "released", "r2": "active"}
    finally:
        await c.stop()


async def test_the_same_order_with_other_items_is_a_conflict_even_on_other_variants(db: asyncpg.Connection) -> None:
    """ALREADY_EXISTS for the same order with other items, whether the other items' lines are on
    the same variants or not, in a later batch (Postgres knows) or in the same one (it does not yet)."""
    c, o = core(), org()
    vx, vy = variant_in(o, 0, "x"), variant_in(o, 0, "y")
    try:
        await receive(c, o, vx, "w1", 5)
        await receive(c, o, vy, "w1", 5)
        first = ReserveStock(o, "r1", "order-1", "hash-x", time.time() + 60, (ReserveLine(vx, "", 1),))
        other = ReserveStock(o, "r1", "order-1", "hash-y", time.time() + 60, (ReserveLine(vy, "", 2),))
        [made] = await c.process([first], time.time())
        assert isinstance(made, ReservationResult)
        [again] = await c.process([other], time.time())
        assert isinstance(again, Rejected) and again.code == "conflict", again
        c.forget_states()  # from Postgres alone too
        [again] = await c.process([other], time.time())
        assert isinstance(again, Rejected) and again.code == "conflict", again
        one, two = await c.process([reserve(o, "r2", vx, 1, 60),
                                    ReserveStock(o, "r2", "order-r2", "other", time.time() + 60,
                                                 (ReserveLine(vy, "", 1),))], time.time())
        assert isinstance(one, ReservationResult)
        assert isinstance(two, Rejected) and two.code == "conflict", two
        lines = await db.fetch("SELECT reservation_id, variant_id, quantity FROM reservation_lines"
                               " WHERE organization_id=$1 ORDER BY reservation_id", o)
        assert [tuple(r) for r in lines] == [("r1", vx, 1), ("r2", vx, 1)]
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1 AND variant_id=$2", o, vy) == 0
    finally:
        await c.stop()


async def test_a_retry_is_refused_where_its_part_closed_while_another_shards_part_is_open(
        db: asyncpg.Connection) -> None:
    """A reservation across two shards, released (or expired) on one only: a retry of the order is
    `closed` on that one, not made again there because the other part is still open."""
    a, b, o = core(0), core(1), org()
    va, vb = variant_in(o, 0), variant_in(o, 1)
    try:
        await receive(a, o, va, "w1", 5)
        await receive(b, o, vb, "w1", 5)
        expires = time.time() + 60
        part_a = ReserveStock(o, "rx", "order-x", "hx", expires, (ReserveLine(va, "", 2),))
        part_b = ReserveStock(o, "rx", "order-x", "hx", expires, (ReserveLine(vb, "", 3),))
        for c, cmd in ((a, part_a), (b, part_b)):
            [r] = await c.process([cmd], time.time())
            assert isinstance(r, ReservationResult)
        [released] = await a.process([ReleaseReservation(o, "rx", (va,))], time.time())
        assert isinstance(released, DoneResult) and released.changed
        [again] = await a.process([part_a], time.time())
        assert isinstance(again, Rejected) and again.code == "closed", again
        a.forget_states()
        [again] = await a.process([part_a], time.time())
        assert isinstance(again, Rejected) and again.code == "closed", again
        [replay] = await b.process([part_b], time.time())
        assert isinstance(replay, ReservationResult) and replay.replayed
        rows = dict(await db.fetch("SELECT variant_id, status FROM reservation_lines WHERE organization_id=$1", o))
        assert rows == {va: "released", vb: "active"}
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1 AND variant_id=$2", o, va) == 0
    finally:
        await a.stop()
        await b.stop()


async def test_an_abort_spares_lines_replayed_or_confirmed_since(db: asyncpg.Connection) -> None:
    """The compensation of a failed call must not take away what another call for the same order
    reported made: lines it was answered as a replay, or confirmed since."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        await receive(c, o, v, "w1", 10)
        for rid in ("r1", "r2", "r3"):
            [made] = await c.process([reserve(o, rid, v, 1, 60)], time.time())
            assert isinstance(made, ReservationResult) and not made.replayed
        [replay] = await c.process([reserve(o, "r1", v, 1, 60)], time.time())  # another call for order r1
        assert isinstance(replay, ReservationResult) and replay.replayed
        await c.process([ConfirmReservation(o, "r2", (v,))], time.time())
        spared1, spared2, aborted = await c.process(
            [AbortReservation(o, rid, (v,)) for rid in ("r1", "r2", "r3")], time.time())
        assert spared1 == DoneResult(changed=False) and spared2 == DoneResult(changed=False)
        assert aborted == DoneResult(changed=True)
        rows = dict(await db.fetch("SELECT reservation_id, status FROM reservation_lines WHERE organization_id=$1", o))
        assert rows == {"r1": "active", "r2": "confirmed"}
        assert await db.fetchval("SELECT reserved FROM stocks WHERE organization_id=$1", o) == 2
    finally:
        await c.stop()


async def test_a_batch_run_in_two_passes_keeps_the_answers_of_the_pass_that_committed(db: asyncpg.Connection) -> None:
    """A batch with a retry of a reservation it closed runs in two commits. If the second fails,
    the first's commands are answered as committed (a receipt without a key retried on
    `unavailable` would be applied twice), the second's `unavailable`."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        cmd = await reserved_two_of_five(c, o, v)
        # A real failure of the second commit: Postgres refuses one ledger row of it.
        await db.execute(f"""
            CREATE OR REPLACE FUNCTION boom_{o.replace('-', '_')}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.reason = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$""")
        await db.execute(f"CREATE TRIGGER boom_{o.replace('-', '_')} BEFORE INSERT ON movements FOR EACH ROW"
                         f" WHEN (NEW.organization_id = '{o}') EXECUTE FUNCTION boom_{o.replace('-', '_')}()")
        try:
            receipt, released, again, boom = await c.process(
                [RecordMovement(o, v, "w1", "receipt", 3), ReleaseReservation(o, "r1", (v,)), cmd,
                 RecordMovement(o, v, "w1", "receipt", 1, reason="boom")], time.time())
        finally:
            await db.execute(f"DROP TRIGGER boom_{o.replace('-', '_')} ON movements")
            await db.execute(f"DROP FUNCTION boom_{o.replace('-', '_')}()")
        assert isinstance(receipt, DoneResult) and isinstance(released, DoneResult) and released.changed
        assert isinstance(again, Rejected) and again.code == "unavailable"
        assert isinstance(boom, Rejected) and boom.code == "unavailable"
        row = await db.fetchrow("SELECT on_hand, reserved FROM stocks WHERE organization_id=$1", o)
        assert (row["on_hand"], row["reserved"]) == (8, 0)
    finally:
        await c.stop()


async def test_a_shard_whose_postgres_stops_answering_fails_the_batch_and_frees_its_lock(db: asyncpg.Connection) -> None:
    """A statement that does not come back (here: a row lock another session holds) fails the
    batch after the shard's command timeout, and the connection goes with its lock, so that
    a replacement can serve."""
    c, o = core(), org()
    v = variant_in(o, 0)
    c.store.command_timeout = 1.0
    blocker = await asyncpg.connect(DSN)
    try:
        await receive(c, o, v, "w1", 5)
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM stocks WHERE organization_id=$1 FOR UPDATE", o)
        started = time.monotonic()
        [reply] = await c.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(reply, Rejected) and reply.code == "unavailable"
        assert time.monotonic() - started < 10
        twin = core()  # the same shard id and lock: a replacement
        try:
            await twin.store.connect()
            assert twin.store.healthy
        finally:
            await twin.stop()
        await tx.rollback()
    finally:
        await blocker.close()
        await c.stop()


async def test_a_timer_window_read_while_serving_keeps_the_statement_timeout(db: asyncpg.Connection) -> None:
    """Only a start's read of the timers due may take long (a backlog after a stop); the windows
    read later, on the batch path, fail with the batch's statement timeout like any statement."""
    c, o = core(), org()
    v = variant_in(o, 0)
    c.store.command_timeout = 1.0
    blocker = await asyncpg.connect(DSN)
    try:
        await receive(c, o, v, "w1", 5)
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE reservation_lines IN ACCESS EXCLUSIVE MODE")
        try:
            started = time.monotonic()
            [reply] = await c.process([ReadStock(o, v)], time.time() + c.cfg.timer_horizon)  # the next window is due
            waited = time.monotonic() - started
        finally:
            await tx.rollback()
        assert isinstance(reply, Rejected) and reply.code == "unavailable", reply
        assert waited < 5, waited
    finally:
        await blocker.close()
        await c.stop()


async def test_a_cancellation_committed_between_a_batch_check_and_its_write_still_stops_the_write(
        db: asyncpg.Connection) -> None:
    """The batch statement checks its new reservations in its snapshot; a cancellation mark that
    commits after that snapshot is met by the header write itself (the key both write), which
    then aborts the statement as a retried closed reservation: decided again, refused."""
    c, o = core(), org()
    try:
        await c.store.connect()
        assert await queries.mark_cancelled(db, o, "r1", "order-1")  # (asyncpg.Connection has fetchval too)
        w = store.BatchWrite(now=time.time(), opened={"r1": ["r1", o, "order-1", "h", time.time() + 60, 1, "active"]})
        with pytest.raises(store.ClosedReservationRetried):
            await c.store.commit(w)
        assert await db.fetchval("SELECT status FROM reservations WHERE organization_id=$1", o) == "cancelled"
    finally:
        await c.stop()


async def test_two_calls_for_one_order_with_other_items_in_one_batch_are_each_decided_on_their_own_items(
        db: asyncpg.Connection) -> None:
    """One batch holds a call with other items (a conflict) and then the reservation's real part
    (its other part open on another shard). Decided again with what Postgres remembers, each must
    be decided against its own items: the conflict refused, the part made."""
    a, b, o = core(0), core(1), org()
    va, vb = variant_in(o, 0), variant_in(o, 1)
    try:
        await receive(a, o, va, "w1", 5)
        await receive(b, o, vb, "w1", 5)
        expires = time.time() + 60
        [r] = await b.process([ReserveStock(o, "rx", "order-x", "good", expires, (ReserveLine(vb, "", 1),))],
                              time.time())
        assert isinstance(r, ReservationResult)
        bad = ReserveStock(o, "rx", "order-x", "bad", expires, (ReserveLine(va, "", 2),))
        good = ReserveStock(o, "rx", "order-x", "good", expires, (ReserveLine(va, "", 1),))
        refused, made = await a.process([bad, good], time.time())
        assert isinstance(refused, Rejected) and refused.code == "conflict", refused
        assert isinstance(made, ReservationResult), made
        rows = dict(await db.fetch("SELECT variant_id, quantity FROM reservation_lines WHERE organization_id=$1", o))
        assert rows == {va: 1, vb: 1}
    finally:
        await a.stop()
        await b.stop()


async def test_replay_marks_are_forgotten_after_their_time_even_without_aborts(db: asyncpg.Connection) -> None:
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        await receive(c, o, v, "w1", 10)
        cmds = [reserve(o, f"r{i}", v, 1, 3600) for i in range(3)]
        await c.process(cmds, time.time())
        await c.process(cmds[:2], time.time())  # replays: marked
        assert set(c.replays) == {(o, "r0"), (o, "r1")}
        await c.process(cmds[2:], time.time() + REPLAY_MEMORY + 1)  # a replay much later
        assert set(c.replays) == {(o, "r2")}
    finally:
        await c.stop()


async def test_an_idempotency_key_used_again_for_another_stock_is_a_conflict_not_a_replay(
        db: asyncpg.Connection) -> None:
    """The same key (an idempotency key, a transfer id) for another variant: refused `conflict`,
    not answered with the other request's reply while nothing is done; on one shard (the stored
    reply) and on two at once (the key's row meets the other's in the commit)."""
    a, b, o = core(0), core(1), org()
    va, va2, vb = variant_in(o, 0), variant_in(o, 0, "w"), variant_in(o, 1)
    try:
        for c, v in ((a, va), (a, va2), (b, vb)):
            await receive(c, o, v, "w1", 5)
        [first] = await a.process([RecordMovement(o, va, "w1", "receipt", 3, idempotency_key="k1")], time.time())
        assert isinstance(first, DoneResult)
        [again] = await a.process([RecordMovement(o, va, "w1", "receipt", 3, idempotency_key="k1")], time.time())
        assert again == first  # a replay
        [other] = await a.process([RecordMovement(o, va2, "w1", "receipt", 3, idempotency_key="k1")], time.time())
        assert isinstance(other, Rejected) and other.code == "conflict", other
        both = await asyncio.gather(
            a.process([RecordMovement(o, va, "w1", "receipt", 2, idempotency_key="k2")], time.time()),
            b.process([RecordMovement(o, vb, "w1", "receipt", 2, idempotency_key="k2")], time.time()))
        codes = sorted(type(r).__name__ if not isinstance(r, Rejected) else r.code for [r] in both)
        assert codes == ["DoneResult", "conflict"], both
        on_hand = dict(await db.fetch("SELECT variant_id, on_hand FROM stocks WHERE organization_id=$1", o))
        assert on_hand[va2] == 5  # k1's conflict changed nothing
        assert on_hand[va] + on_hand[vb] == 8 + 5 + 2  # k2 applied once
    finally:
        await a.stop()
        await b.stop()


async def test_a_warehouse_state_that_arrives_after_a_newer_one_is_ignored(db: asyncpg.Connection) -> None:
    """Two upserts of one warehouse: their messages may reach a shard in the other order than
    they committed; the shard keeps the state written last (SetWarehouseActive.as_of)."""
    c, o = core(), org()
    v = variant_in(o, 0)
    try:
        await receive(c, o, v, "w1", 5)
        [_] = await c.process([SetWarehouseActive(o, "w1", False, as_of=2.0)], time.time())
        [late] = await c.process([SetWarehouseActive(o, "w1", True, as_of=1.0)], time.time())
        assert late == DoneResult(changed=False)
        [refused] = await c.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(refused, Rejected) and refused.code == "insufficient_stock", refused
        [_] = await c.process([SetWarehouseActive(o, "w1", True, as_of=3.0)], time.time())
        [made] = await c.process([reserve(o, "r1", v, 1, 60)], time.time())
        assert isinstance(made, ReservationResult)
    finally:
        await c.stop()


# Every statement a shard prepares besides its batch statements (which are made of the parts).
SHARD_READS_AND_PARTS = ("_LOAD_STOCKS", "_LOAD_LINES", "_LOAD_PRIORS", "_SEEN_BEFORE", "_LOAD_REPLIES",
                         "_EXPIRED_LINES", "_INSERT_STOCKS", "_UPDATE_STOCKS", "_INSERT_MOVEMENTS",
                         "_UPSERT_LINES", "_UPDATE_LINES", "_DELETE_LINES", "_UPSERT_HEADERS",
                         "_CLOSE_HEADERS", "_INSERT_REPLIES")


def _plan_nodes(plan: object) -> list[dict[str, object]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first."""
    out: list[dict[str, object]] = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            out.append(node)
            stack.extend(v for v in node.values() if isinstance(v, (list, dict)))
    return out


async def test_on_young_tables_the_shard_statements_still_find_rows_by_index(db: asyncpg.Connection) -> None:
    """The shard's prepared statements keep their generic plans until ANALYZE changes a table's
    statistics. Planned on a new, near-empty database, the batch's updates were hash joins over
    a sequential scan of the whole table, kept as the table grew: the shard's session settings
    must make every statement it prepares (the batch statements it commits, and each read and
    part on its own) index lookups whatever the tables' size when they are planned."""
    name = "inv_test_plans_" + uuid.uuid4().hex[:8]
    await db.execute(f'CREATE DATABASE "{name}"')
    dsn = DSN.rsplit("/", 1)[0] + "/" + name
    c = ShardCore(ShardConfigure(0, 1, dsn))
    c.store.lock_id = BASE_SHARD + 99
    writes = []
    commit = c.store.commit

    async def capture(w: object) -> None:
        writes.append(w)
        await commit(w)  # type: ignore[arg-type]

    try:
        await migrate(dsn)
        c.store.commit = capture  # type: ignore[method-assign]
        o = org()
        await receive(c, o, "v1", "w1", 5)
        await c.process([reserve(o, f"r{i}", "v1", 1, 60) for i in range(2)], time.time())
        await c.process(
            [ReleaseReservation(o, "r0", ("v1",)), ConfirmReservation(o, "r1", ("v1",))], time.time())
        assert len(writes) == 3
        conn = c.store.conn
        assert conn is not None
        assert await conn.fetchval("SHOW application_name") == f"inventory-shard-0-lock-{BASE_SHARD + 99}"
        statements = [(f"batch {i}", _batch_statement(w)[0]) for i, w in enumerate(writes)]  # type: ignore[arg-type]
        statements += [(n, getattr(store, n)) for n in SHARD_READS_AND_PARTS]
        problems: list[tuple[str, str, str]] = []
        for i, (label, sql) in enumerate(statements):
            await conn.execute(f"PREPARE plan_check{i} AS {sql}")
            params = max(int(n) for n in re.findall(r"\$(\d+)", sql))
            nulls = ", ".join(["NULL"] * params)  # (a generic plan does not depend on the values)
            plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE plan_check{i}({nulls})"))
            for n in _plan_nodes(plan):
                kind = str(n.get("Node Type"))
                if kind in ("Seq Scan", "Hash Join", "Merge Join") or (
                        kind.endswith("Index Scan") and "Index Cond" not in n):
                    problems.append((label, kind, str(n.get("Relation Name", ""))))
        assert problems == []
    finally:
        await c.stop()
        await db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
