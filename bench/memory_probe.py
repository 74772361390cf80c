"""Memory of resident stocks in a real `ShardCore` (actors/shard.py), in a process of its own.

Started by `bench/cluster.py memory` with a JSON spec as its only argument; prints progress
on stderr and one `RESULT {json}` line on stdout. Steps, with RSS (from /proc/self/statm)
after each:

1. `ShardCore(ShardConfigure(...))`, the garbage-collector thresholds the shard actor sets;
2. `core.start()`: connect, take the shard lock, `load_due` arms a timer per variant with open
   lines due within the timer horizon (the spec's; `bench/cluster.py memory` makes it cover the
   seeded reservations, due in a day, unless --no-memory-timers);
3. activation of every stock of the shard through `core.process([ReadStock...])` batches
   (the same code path as a batch from the gateway: `_activate` loads the variants and
   their open lines in one query per batch; nothing is written);
4. `gc.collect()`.

Then an accounting of the per-stock structures by `sys.getsizeof` over a random sample of
the resident variants (objects shared between stocks, such as interned status strings,
count once for the whole sample, so about zero per stock), grouped by where the object
is referenced from and its type; and optionally (spec "tracemalloc") a tracemalloc
snapshot of steps 2-3 grouped by the line that allocated.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] memory probe: {msg}", file=sys.stderr, flush=True)


class Sizer:
    """Adds sys.getsizeof of every object reachable from a root once (by id), by (where, type)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.by: dict[tuple[str, str], list[int]] = {}  # -> [bytes, objects]

    def add(self, where: str, obj: Any, deep: bool = True) -> None:
        if obj is None or isinstance(obj, bool):
            return
        i = id(obj)
        if i in self.seen:
            return
        self.seen.add(i)
        acc = self.by.setdefault((where, type(obj).__name__), [0, 0])
        acc[0] += sys.getsizeof(obj)
        acc[1] += 1
        if not deep:
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                self.add(where, k)
                self.add(where, v)
        elif isinstance(obj, (tuple, list)):
            for v in obj:
                self.add(where, v)
        elif hasattr(obj, "__struct_fields__"):
            for f in obj.__struct_fields__:
                self.add(where, getattr(obj, f))


def account(core: Any, sample_size: int, seed: int = 1) -> dict[str, Any]:
    """Bytes per resident stock by (where, type), from a random sample of variants."""
    from actors.shard import states_of
    from actors.stock import open_lines

    variants = list(core.residents)
    rng = random.Random(seed)
    sample = rng.sample(variants, min(sample_size, len(variants)))
    sample_set = set(sample)
    s = Sizer()
    stocks_in_sample = 0
    lines_in_sample = 0
    for vk in sample:
        resident = core.residents[vk]
        s.add("ShardCore.residents key (org, variant)", vk)
        s.add("Resident struct (states, last_used, armed)", resident, deep=False)
        s.add("Resident.last_used / armed floats", resident.last_used)
        s.add("Resident.last_used / armed floats", resident.armed)
        if isinstance(resident.states, tuple):
            s.add("Resident.states tuple (variants in 2+ warehouses)", resident.states, deep=False)
        for state in states_of(resident):
            stocks_in_sample += 1
            s.add("StockState struct", state, deep=False)
            for f in state.__struct_fields__:
                if f == "lines":
                    continue
                s.add("StockState fields (ids, status, numbers)", getattr(state, f))
            s.add("StockState.lines container", state.lines, deep=False)
            for line in open_lines(state):
                lines_in_sample += 1
                s.add("Line struct", line, deep=False)
                for f in line.__struct_fields__:
                    s.add("Line fields (ref string, expires_at)", getattr(line, f))
            if isinstance(state.lines, dict):
                for rid in state.lines:
                    s.add("Line dict keys (stocks of 64+ lines)", rid)
    timers_in_sample = 0
    for entry in core.timers.heap:
        if (entry[1], entry[2]) in sample_set:
            timers_in_sample += 1
            s.add("TimerHeap entries (expires_at, org, variant)", entry)
    # the hash table / array of the big containers, shared out per stock
    stocks_total = max(1, core.status().resident_stocks)
    containers = {
        "ShardCore.residents hash table": sys.getsizeof(core.residents) / stocks_total,
        "TimerHeap list array": sys.getsizeof(core.timers.heap) / stocks_total,
    }
    per_stock: dict[str, float] = {}
    rows = []
    for (where, typ), (nbytes, nobj) in s.by.items():
        per = nbytes / max(1, stocks_in_sample)
        rows.append({"where": where, "type": typ, "bytes_per_stock": per, "objects_per_stock": nobj / max(1, stocks_in_sample)})
        per_stock[where] = per_stock.get(where, 0.0) + per
    for name, per in containers.items():
        rows.append({"where": name, "type": "table", "bytes_per_stock": per, "objects_per_stock": 0.0})
        per_stock[name] = per
    rows.sort(key=lambda r: -r["bytes_per_stock"])
    return {
        "sample_variants": len(sample), "sample_stocks": stocks_in_sample, "sample_lines": lines_in_sample,
        "sample_timer_entries": timers_in_sample, "rows": rows,
        "by_where": dict(sorted(per_stock.items(), key=lambda x: -x[1])),
        "total_bytes_per_stock": sum(per_stock.values()),
    }


async def main_async(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncpg

    from actors.envelopes import ShardConfigure
    from actors.messages import ReadStock, Rejected
    from actors.shard import ShardCore

    out: dict[str, Any] = {"spec": spec}
    trace = bool(spec.get("tracemalloc"))
    if trace:
        import tracemalloc

        tracemalloc.start(1)
    gc.set_threshold(50_000, 50, 100)  # what StockShard.receiveMsg_ShardConfigure sets
    conn = await asyncpg.connect(spec["dsn"])
    variants = [(r[0], r[1]) for r in await conn.fetch(
        "SELECT organization_id, variant_id FROM stocks WHERE shard_hash % $2 = $1 ORDER BY variant_id",
        spec["shard_id"], spec["shard_count"])]
    await conn.close()
    gc.collect()
    core = ShardCore(ShardConfigure(spec["shard_id"], spec["shard_count"], spec["dsn"],
                                    passivate_after=10 * 24 * 3600.0, timer_horizon=spec["timer_horizon"]))
    core.store.lock_id = spec["lock_id"]
    out["rss_base"] = rss()
    t = time.monotonic()
    if trace:
        snap0 = tracemalloc.take_snapshot()
    await core.start()
    out["start_seconds"] = time.monotonic() - t
    out["timers"] = len(core.timers)
    out["rss_after_start"] = rss()
    say(f"started in {out['start_seconds']:.1f} s: {out['timers']:,} timers re-armed; RSS "
        f"{out['rss_base'] / 2**20:.0f} -> {out['rss_after_start'] / 2**20:.0f} MiB")
    chunk = spec["chunk"]
    t = time.monotonic()
    rejected = 0
    for i in range(0, len(variants), chunk):
        now = time.time()
        replies = await core.process([ReadStock(o, v) for o, v in variants[i:i + chunk]], now)
        rejected += sum(isinstance(r, Rejected) for r in replies)
        if (i // chunk) % 100 == 0 and i:
            say(f"{i:,} / {len(variants):,} variants activated, RSS {rss() / 2**20:.0f} MiB")
    out["activate_seconds"] = time.monotonic() - t
    out["rejected"] = rejected
    out["rss_after_activation"] = rss()
    gc.collect()
    out["rss_after_gc"] = rss()
    from actors.shard import states_of

    out["variants"] = len(core.residents)
    out["stocks"] = core.status().resident_stocks
    out["lines"] = sum(len(s.lines) for r in core.residents.values() for s in states_of(r))
    out["timers_after_activation"] = len(core.timers)
    say(f"{out['stocks']:,} stocks with {out['lines']:,} open lines resident after {out['activate_seconds']:.1f} s;"
        f" RSS {out['rss_after_gc'] / 2**20:.0f} MiB; timer heap {out['timers_after_activation']:,} entries")
    if trace:
        snap1 = tracemalloc.take_snapshot()
        stats = snap1.compare_to(snap0, "lineno")
        n = max(1, out["stocks"])
        out["tracemalloc"] = [
            {"where": str(st.traceback[0]).replace(str(ROOT) + "/", ""), "bytes_per_stock": st.size_diff / n,
             "objects_per_stock": st.count_diff / n}
            for st in stats[:15] if st.size_diff > 0
        ]
        out["tracemalloc_total_per_stock"] = sum(st.size_diff for st in stats) / n
        tracemalloc.stop()
    t = time.monotonic()
    out["accounting"] = account(core, spec["sample"])
    out["accounting_seconds"] = time.monotonic() - t
    await core.stop()
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = asyncio.run(main_async(spec))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
