"""A shard's own CPU per reservation, counted in one process (no Thespian, no gRPC).

    .venv/bin/python bench/shard_path.py                      # hot stock, batches of 14, 6 rounds
    .venv/bin/python bench/shard_path.py --batch 64 --profile # cProfile's top functions too

Why: in bench/reserve.py the shard process costs about 115 µs of CPU per reservation on the
hot stock (14 per commit), four times the gateway's own Python; the end-to-end benches are too
noisy (10-15% run to run) to show a change of a few percent there. This runs a real `ShardCore`
on uvloop against the real Postgres (a database of its own, created afresh) and counts this
process's CPU time per reservation: decide, apply, building the batch's rows, asyncpg's client
side. Postgres's own CPU is not counted (bench/reserve.py reports it).

The baseline, in the same process and database: the same number of reservations written by a
guarded UPDATE and an INSERT per reservation, a batch per transaction through one asyncpg
connection (the client side of the classic approach, batched as the shard batches).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from common import admin_dsn, dsn_named

LOCK_BASE = 20_000  # shard lock ids no service or test uses


async def fresh_database(dsn: str) -> None:
    import asyncpg

    from persistence.migrate import migrate

    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_dsn(dsn))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE bench_stock (id int PRIMARY KEY, on_hand int NOT NULL, reserved int NOT NULL)")
        await conn.execute("CREATE TABLE bench_reservation (id uuid PRIMARY KEY, stock int NOT NULL, qty int NOT NULL,"
                           " expires_at timestamptz NOT NULL)")
        await conn.execute("INSERT INTO bench_stock VALUES (1, 1000000000, 0)")
    finally:
        await conn.close()


async def run(a: argparse.Namespace) -> None:
    import asyncpg

    from actors.envelopes import ShardConfigure
    from actors.keys import shard_of
    from actors.messages import RecordMovement, Rejected, ReserveLine, ReserveStock
    from actors.shard import ShardCore

    dsn = dsn_named(a.dsn, a.database)
    await fresh_database(dsn)
    org = "bench-org"
    variant = next(f"hot{i}" for i in range(1000) if shard_of(org, f"hot{i}", 1) == 0)
    core = ShardCore(ShardConfigure(0, 1, dsn))
    core.store.lock_id = LOCK_BASE
    await core.start()
    [r] = await core.process([RecordMovement(org, variant, "wh-1", "receipt", 1_000_000_000,
                                             create_if_missing=True)], time.time())
    assert not isinstance(r, Rejected), r
    counter = iter(range(10**9))

    def batch() -> list[ReserveStock]:
        now = time.time()
        out = []
        for _ in range(a.batch):
            n = next(counter)
            rid = str(uuid.uuid4())
            out.append(ReserveStock(org, rid, f"order-{n}", f"{n:024x}", now + 3600,
                                    (ReserveLine(variant, "wh-1", 1),)))
        return out

    async def service_round(batches: int) -> float:
        prepared = [batch() for _ in range(batches)]
        started = time.process_time()
        for cmds in prepared:
            replies = await core.process(cmds, time.time())
            refused = [r for r in replies if isinstance(r, Rejected)]
            assert not refused, refused[0]
        return time.process_time() - started

    conn = await asyncpg.connect(dsn)
    insert = ("INSERT INTO bench_reservation (id, stock, qty, expires_at)"
              " SELECT unnest($1::uuid[]), 1, 1, now() + interval '1 hour'")

    async def baseline_round(batches: int) -> float:
        ids = [[uuid.uuid4() for _ in range(a.batch)] for _ in range(batches)]
        started = time.process_time()
        for batch_ids in ids:
            async with conn.transaction():
                for _ in batch_ids:
                    await conn.execute("UPDATE bench_stock SET reserved = reserved + 1"
                                       " WHERE id = 1 AND on_hand - reserved >= 1")
                await conn.execute(insert, batch_ids)
        return time.process_time() - started

    await service_round(20)  # warm-up: statements prepared, the stock resident
    await baseline_round(20)
    rows = []
    for i in range(a.rounds):
        base = await baseline_round(a.batches)
        svc = await service_round(a.batches)
        per = a.batches * a.batch
        rows.append((base / per * 1e6, svc / per * 1e6))
        print(f"round {i + 1}: baseline {rows[-1][0]:6.1f} µs/reservation   shard {rows[-1][1]:6.1f} µs/reservation",
              file=sys.stderr)
    base_us = min(b for b, _ in rows)
    svc_us = min(s for _, s in rows)
    print(f"\n== shard path, hot stock, batches of {a.batch}, {a.batches} batches per round, best of {a.rounds} "
          f"rounds (CPU time of this process; Postgres not counted) ==")
    print(f"baseline (guarded UPDATE + INSERT per reservation, a transaction per batch)  {base_us:7.1f} µs/reservation")
    print(f"shard (ShardCore.process: decide, apply, rows, one statement)                {svc_us:7.1f} µs/reservation")
    print(f"ratio shard/baseline {svc_us / base_us:.2f}; open lines on the hot stock at the end: "
          f"{core.commands - 1:,}")
    if a.profile:
        prof = cProfile.Profile()
        prepared = [batch() for _ in range(a.batches)]
        prof.enable()
        for cmds in prepared:
            await core.process(cmds, time.time())
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue())
    await conn.close()
    await core.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", default="postgresql://root@127.0.0.1:5432/test", help="server and credentials")
    p.add_argument("--database", default="inv_bench_shard", help="dropped and created afresh")
    p.add_argument("--batch", type=int, default=14, help="reservations per batch (default 14: the hot stock's "
                   "calls per commit at 64 in flight in bench/reserve.py)")
    p.add_argument("--batches", type=int, default=300, help="batches per round (default 300)")
    p.add_argument("--rounds", type=int, default=6, help="rounds; the best is reported (default 6)")
    p.add_argument("--profile", action="store_true", help="one more round under cProfile")
    args = p.parse_args()
    import uvloop

    uvloop.run(run(args))
