"""Closed-loop load generator: one process, uvloop, N callers always in flight.

Started by bench/reserve.py, one process per measured phase, with a JSON spec as its
only argument. It connects, then runs `warmup` seconds unmeasured and `duration`
seconds measured, printing `T0` and `T1` on stdout at the window's edges (so the
parent can sample CPU counters exactly there), then one JSON line with the result.

Targets:
  grpc  ReserveStock through a gRPC stub (the service, or the echo server on another
        method path: same client code, same request and response types); with
        `targets` (a list) the channels are spread over several servers;
  pg    the classic guarded UPDATE + INSERT in one transaction, through asyncpg.

A call counts if it *completes* inside the window; its latency is end - start as the
caller sees it (so it includes client-side queueing, which is what a user sees).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import sys
import time
from array import array
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESERVE_PATH = "/inventory.v1.InventoryService/ReserveStock"

GUARDED_UPDATE = """
UPDATE bench_stock SET reserved = reserved + $4
WHERE organization_id = $1 AND variant_id = $2 AND warehouse_id = $3 AND on_hand - reserved >= $4
"""
INSERT_RESERVATION = """
INSERT INTO bench_reservation (reservation_id, organization_id, order_id, variant_id, warehouse_id,
                               quantity, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
"""


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


class Window:
    """Shared clock: warm-up, then the measured window, then stop issuing calls."""

    def __init__(self, warmup: float, duration: float) -> None:
        now = time.perf_counter()
        self.t0 = now + warmup
        self.t1 = self.t0 + duration
        self.latencies = array("d")
        self.ok_total = 0  # every successful call, measured or not (checked against the database)
        self.failures: dict[str, int] = {}
        self.failures_in_window = 0
        self.error_samples: list[str] = []

    def fail(self, code: str, detail: str, end: float) -> None:
        self.failures[code] = self.failures.get(code, 0) + 1
        if self.t0 <= end <= self.t1:
            self.failures_in_window += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{code}: {detail[:200]}")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _signal_edges(w: Window) -> float:
    """Print T0/T1 at the window's edges; return this process's CPU seconds inside the window."""
    await asyncio.sleep(max(0.0, w.t0 - time.perf_counter()))
    cpu0 = _cpu()
    sys.stdout.write("T0\n")
    sys.stdout.flush()
    await asyncio.sleep(max(0.0, w.t1 - time.perf_counter()))
    cpu1 = _cpu()
    sys.stdout.write("T1\n")
    sys.stdout.flush()
    return cpu1 - cpu0


def _variant(spec: dict[str, Any], rng: random.Random) -> str:
    if spec["stocks"] == 1:
        return str(spec["hot_variant"])
    return f"{spec['variant_prefix']}{rng.randrange(spec['stocks']):05d}"


# ---------------------------------------------------------------- gRPC


async def run_grpc(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from gateway.pb import inventory_pb2 as pb

    # `targets` (several gateways): channel i goes to targets[i % n], callers round-robin over channels.
    targets = spec.get("targets") or [spec["target"]]
    channels = [
        grpc.aio.insecure_channel(targets[i % len(targets)], options=[
            ("grpc.use_local_subchannel_pool", 1),  # a TCP connection per channel, not a shared one
            ("grpc.channel_id", i),
        ])
        for i in range(max(spec["channels"], len(targets)))
    ]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 30)
    calls = [ch.unary_unary(spec["method"], request_serializer=pb.ReserveStockRequest.SerializeToString,
                            response_deserializer=pb.ReserveStockResponse.FromString) for ch in channels]
    org, wh, ttl = spec["organization_id"], spec["warehouse_id"], spec["ttl_seconds"]
    prefix = f"{spec['order_prefix']}-{os.getpid()}"
    timeout = spec["call_timeout"]

    async def caller(i: int, w: Window) -> None:
        call = calls[i % len(calls)]
        rng = random.Random(i * 7919 + os.getpid())
        n = 0
        lat = w.latencies
        perf = time.perf_counter
        while True:
            start = perf()
            if start >= w.t1:
                return
            n += 1
            req = pb.ReserveStockRequest(
                organization_id=org, order_id=f"{prefix}-{i}-{n}", ttl_seconds=ttl,
                items=[pb.ReserveItem(variant_id=_variant(spec, rng), quantity=1, warehouse_id=wh)])
            try:
                resp = await call(req, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                w.fail(e.code().name, e.details() or "", perf())
                continue
            end = perf()
            if not resp.success:
                w.fail("NOT_SUCCESS", resp.error_message, end)
                continue
            w.ok_total += 1
            if w.t0 <= end <= w.t1:
                lat.append(end - start)

    try:
        return await _drive(spec, caller)
    finally:
        for ch in channels:
            await ch.close()


# ---------------------------------------------------------------- Postgres baseline


async def _no_reset(conn: Any) -> None:
    """A pool's reset that sends nothing (asyncpg still clears its client-side state)."""


async def run_pg(spec: dict[str, Any]) -> dict[str, Any]:
    import asyncpg

    # No reset query on release: the fastest asyncpg pool (its transactions leave no session
    # state). `reset=None` does NOT skip it: since asyncpg 0.30 None means the default reset, a
    # round trip per release, which the baseline paid in every run before 2026-11-28 22:40 UTC.
    pool = await asyncpg.create_pool(spec["dsn"], min_size=spec["pool_size"], max_size=spec["pool_size"],
                                     reset=_no_reset)
    org, wh, ttl = spec["organization_id"], spec["warehouse_id"], float(spec["ttl_seconds"])
    prefix = f"{spec['order_prefix']}-{os.getpid()}"
    from asyncpg.exceptions import PostgresError

    async def caller(i: int, w: Window) -> None:
        rng = random.Random(i * 7919 + os.getpid())
        n = 0
        lat = w.latencies
        perf = time.perf_counter
        while True:
            start = perf()
            if start >= w.t1:
                return
            n += 1
            order = f"{prefix}-{i}-{n}"
            variant = _variant(spec, rng)
            try:
                async with pool.acquire() as conn, conn.transaction():
                    status = await conn.execute(GUARDED_UPDATE, org, variant, wh, 1)
                    if status != "UPDATE 1":
                        raise _Insufficient(status)
                    await conn.execute(INSERT_RESERVATION, order, org, order, variant, wh, 1, ttl)
            except _Insufficient as e:
                w.fail("INSUFFICIENT_STOCK", str(e), perf())
                continue
            except (PostgresError, OSError, asyncpg.InterfaceError) as e:
                w.fail(type(e).__name__, str(e), perf())
                continue
            end = perf()
            w.ok_total += 1
            if w.t0 <= end <= w.t1:
                lat.append(end - start)

    try:
        return await _drive(spec, caller)
    finally:
        await pool.close()


class _Insufficient(Exception):
    pass


# ---------------------------------------------------------------- common driver


async def _drive(spec: dict[str, Any], caller: Any) -> dict[str, Any]:
    w = Window(spec["warmup"], spec["duration"])
    edges = asyncio.create_task(_signal_edges(w))
    tasks = [asyncio.create_task(caller(i, w)) for i in range(spec["concurrency"])]
    client_cpu = await edges
    # Callers stop issuing at t1; let the last calls finish (bounded) so none is left in flight.
    done, pending = await asyncio.wait(tasks, timeout=spec["call_timeout"] + 5)
    for t in pending:
        t.cancel()
    for t in done:
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    lat = sorted(w.latencies)
    ops = len(lat)
    return {
        "ops": ops,
        "seconds": spec["duration"],
        "ops_per_s": ops / spec["duration"],
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p90_ms": percentile(lat, 0.90) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "p999_ms": percentile(lat, 0.999) * 1e3,
        "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
        "mean_ms": (sum(lat) / ops * 1e3) if ops else float("nan"),
        "ok_total": w.ok_total,
        "failures": w.failures,
        "failures_in_window": w.failures_in_window,
        "error_samples": w.error_samples,
        "client_cpu_s": client_cpu,
        "unfinished_callers": len(pending),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        runner = asyncio.run
    fn = run_grpc if spec["kind"] == "grpc" else run_pg
    result = runner(fn(spec))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
