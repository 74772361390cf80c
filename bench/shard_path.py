"""A shard's own CPU per reservation, counted in one process (no Thespian, no gRPC).

    .venv/bin/python bench/shard_path.py                      # hot stock, batches of 14, 6 rounds
    .venv/bin/python bench/shard_path.py --batch 64 --profile # cProfile's top functions too

Why: in bench/reserve.py the shard process costs about 115 µs of CPU per reservation on the
hot stock (14 per commit), four times the gateway's own Python; the end-to-end benches are too
noisy (10-15% run to run) to show a change of a few percent there. This runs a real `ShardCore`
on uvloop against the real Postgres (a database of its own, created afresh) and counts this
process's CPU time per reservation: decide, apply, building the batch's rows, asyncpg's client
side; and, apart, the CPU of the Postgres backend serving its connection (read from /proc: the
server must run on this machine; /proc counts 10 ms ticks, so keep a round above half a second,
e.g. `--batches 2000` with `--batch 1`).

The baseline, in the same process and database: the same number of reservations written by
bench/reserve.py's baseline statements (a guarded UPDATE and an INSERT per reservation, its
tables and hot row from `reserve.prepare_database`), a batch per transaction through one
asyncpg connection (the client side of the classic approach, batched as the shard batches).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from common import cprofile_top, dsn_named, paired_rounds
from loadgen import GUARDED_UPDATE, INSERT_RESERVATION
from procs import pid_cpu

LOCK_BASE = 20_000  # shard lock ids no service or test uses


async def run(a: argparse.Namespace) -> None:
    import asyncpg
    import reserve

    from actors.envelopes import ShardConfigure
    from actors.keys import shard_of
    from actors.messages import RecordMovement, Rejected, ReserveLine, ReserveStock
    from actors.shard import ShardCore
    from persistence.store import POSTGRES_PLANNING, set_planning

    dsn = dsn_named(a.dsn, a.database)
    org, wh = reserve.ORG, reserve.WAREHOUSE
    variant = next(f"hot{i}" for i in range(1000) if shard_of(org, f"hot{i}", 1) == 0)
    await reserve.prepare_database(dsn, True, [variant], 0)  # (also the baseline's table and its hot row)
    core = ShardCore(ShardConfigure(0, 1, dsn))
    core.store.lock_id = LOCK_BASE
    await core.start()
    assert core.store.conn is not None
    if a.default_planner:
        await core.store.conn.execute(set_planning(POSTGRES_PLANNING))
    backend = {"shard": await core.store.conn.fetchval("SELECT pg_backend_pid()")}
    server: dict[str, list[float]] = {"shard": [], "baseline": []}  # the backend's CPU, µs/reservation, by round
    [r] = await core.process([RecordMovement(org, variant, wh, "receipt", 1_000_000_000,
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
                                    (ReserveLine(variant, wh, 1),)))
        return out

    async def service_round(batches: int) -> float:
        prepared = [batch() for _ in range(batches)]
        served, started = pid_cpu(backend["shard"]), time.process_time()
        for cmds in prepared:
            replies = await core.process(cmds, time.time())
            refused = [r for r in replies if isinstance(r, Rejected)]
            assert not refused, refused[0]
        used = time.process_time() - started
        server["shard"].append((pid_cpu(backend["shard"]) - served) / (batches * a.batch) * 1e6)
        return used

    conn = await asyncpg.connect(dsn)
    backend["baseline"] = await conn.fetchval("SELECT pg_backend_pid()")

    async def baseline_round(batches: int) -> float:
        """bench/reserve.py's baseline statements, a transaction per batch instead of per reservation."""
        orders = [[f"pg-{next(counter)}" for _ in range(a.batch)] for _ in range(batches)]
        served, started = pid_cpu(backend["baseline"]), time.process_time()
        for batch_orders in orders:
            async with conn.transaction():
                for order in batch_orders:
                    status = await conn.execute(GUARDED_UPDATE, org, variant, wh, 1)
                    assert status == "UPDATE 1", status
                    await conn.execute(INSERT_RESERVATION, order, org, order, variant, wh, 1, 3600.0)
        used = time.process_time() - started
        server["baseline"].append((pid_cpu(backend["baseline"]) - served) / (batches * a.batch) * 1e6)
        return used

    await service_round(20)  # warm-up: statements prepared, the stock resident
    await baseline_round(20)
    for figures in server.values():
        figures.clear()
    base_us, svc_us = await paired_rounds(a.rounds, a.batches * a.batch, "reservation", ("baseline", "shard"),
                                          lambda _: baseline_round(a.batches), lambda _: service_round(a.batches))
    print(f"\n== shard path, hot stock, batches of {a.batch}, {a.batches} batches per round, best of {a.rounds} "
          f"rounds (CPU time of this process, and of the Postgres backend serving it) ==")
    planner = " (Postgres's default planner settings)" if a.default_planner else ""
    print(f"baseline (guarded UPDATE + INSERT per reservation, a transaction per batch)  {base_us:7.1f} µs/reservation"
          f"   Postgres {min(server['baseline']):7.1f}")
    print(f"shard (ShardCore.process: decide, apply, rows, one statement)                {svc_us:7.1f} µs/reservation"
          f"   Postgres {min(server['shard']):7.1f}{planner}")
    print(f"ratio shard/baseline {svc_us / base_us:.2f}; open lines on the hot stock at the end: "
          f"{core.commands - 1:,}")
    if a.profile:
        print(await cprofile_top(lambda: service_round(a.batches), 30))
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
    p.add_argument("--default-planner", action="store_true", help="the shard's connection with Postgres's "
                   "default planner settings instead of its own (persistence/store.py): what they save")
    args = p.parse_args()
    import uvloop

    uvloop.run(run(args))
