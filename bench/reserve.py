"""Reservation throughput: the service vs a Postgres baseline vs the gRPC ceiling, in one run.

    .venv/bin/python bench/reserve.py                   # 64 in flight, 10 s per target
    .venv/bin/python bench/reserve.py --concurrency 64 256 --repeat 3 --png bench/reserve.png

What runs (all on this machine, all started and stopped by this script):

* the service: `inventory serve` on its own database (default inv_bench, dropped and
  created afresh, so no earlier run's rows or open reservations weigh on this one),
  its own gRPC port (50200-50299) and Thespian admin port (19800-19899);
* the baseline: the classic guarded `UPDATE bench_stock SET reserved = reserved + q
  WHERE ... AND on_hand - reserved >= q` plus an INSERT of the reservation, in one
  transaction, through an asyncpg pool with no reset query on release, in the same database;
* the ceiling: a trivial grpc.aio server on uvloop (bench/echo_server.py) that answers
  ReserveStockRequest with a ReserveStockResponse, driven by the same client code.

Each target is driven by one client process (bench/loadgen.py: uvloop, a closed loop of
N callers always in flight, gRPC over a few channels) for `--warmup` then `--duration`
seconds, on one hot stock and on 10,000 stocks (a random one per call). Phases are
interleaved (echo, service, baseline, ...) so that a change in background load hits all
targets alike. Before each phase the bench waits (bounded) for the rest of the machine
to be quiet. With --repeat N each target is measured N times and the best round (most
ops/s: background load only ever slows a run down) is reported, or the median with
--pick median; every round is listed too.

Trust checks printed with the results: every successful reservation is counted and
compared with the `reserved` total in Postgres afterwards (service and baseline);
failures are counted by code; CPU is accounted per process group from /proc (client,
gateway, actor processes, Postgres, and everything else on the machine), so a busy
machine or a saturated client is visible rather than hidden in the numbers.

`--profile` adds one more service hot-stock phase (not in the table) with py-spy
attached to the gateway and the busy actor processes, and prints where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import common
import procs
from common import admin_dsn, append_csv, db_name, git_commit, log
from echo_server import ECHO_PATH
from loadgen import RESERVE_PATH

PY = sys.executable
ORG = "bench-org"
WAREHOUSE = "wh-1"
UNIFORM_PREFIX = "u-"
HOT_UNITS = 10_000_000
UNIFORM_UNITS = 1_000_000
TTL_SECONDS = 6 * 3600

TARGETS = {  # the bars in the table: 64/256 in flight each
    "echo": "grpc.aio echo (ceiling)",
    "svc-hot": "service, 1 hot stock",
    "pg-hot": "baseline, 1 hot stock",
    "svc-uni": "service, 10k stocks",
    "pg-uni": "baseline, 10k stocks",
}


# ---------------------------------------------------------------- database


BASELINE_DDL = """
CREATE TABLE IF NOT EXISTS bench_stock (
    organization_id text    NOT NULL,
    variant_id      text    NOT NULL,
    warehouse_id    text    NOT NULL,
    on_hand         integer NOT NULL,
    reserved        integer NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, variant_id, warehouse_id),
    CONSTRAINT bench_stock_not_oversold CHECK (reserved >= 0 AND reserved <= on_hand)
);
CREATE TABLE IF NOT EXISTS bench_reservation (
    reservation_id  text        PRIMARY KEY,
    organization_id text        NOT NULL,
    order_id        text        NOT NULL,
    variant_id      text        NOT NULL,
    warehouse_id    text        NOT NULL,
    quantity        integer     NOT NULL CHECK (quantity > 0),
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS bench_reservation_order ON bench_reservation (organization_id, order_id);
"""


async def prepare_database(dsn: str, fresh: bool, hot_variants: list[str], stocks: int) -> dict[str, str]:
    import asyncpg

    from persistence.migrate import migrate

    name = db_name(dsn)
    admin = await asyncpg.connect(admin_dsn(dsn))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and fresh:
            others = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name)
            if others:
                raise SystemExit(f"database {name} has {others} open session(s): is another bench running? "
                                 "(use another --dsn, or --keep-db)")
            await admin.execute(f'DROP DATABASE "{name}"')
            exists = False
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(BASELINE_DDL)
        rows = [(ORG, v, WAREHOUSE, HOT_UNITS) for v in hot_variants]
        rows += [(ORG, f"{UNIFORM_PREFIX}{i:05d}", WAREHOUSE, UNIFORM_UNITS) for i in range(stocks)]
        await conn.execute("TRUNCATE bench_stock, bench_reservation")
        await conn.copy_records_to_table("bench_stock", records=rows,
                                         columns=["organization_id", "variant_id", "warehouse_id", "on_hand"])
        await conn.execute("ANALYZE bench_stock")
        settings = {}
        for s in ("server_version", "max_connections", "synchronous_commit", "fsync", "shared_buffers"):
            settings[s] = await conn.fetchval(f"SHOW {s}")
        return settings
    finally:
        await conn.close()


async def reserved_totals(dsn: str, hot_variants: list[str]) -> dict[str, int]:
    """What Postgres holds after the run: the reserved counters of the service and the baseline."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        out: dict[str, int] = {}
        for table, key in (("stocks", "svc"), ("bench_stock", "pg")):
            for v in hot_variants:
                out[f"{key}:{v}"] = int(await conn.fetchval(
                    f"SELECT coalesce(sum(reserved), 0) FROM {table} WHERE organization_id = $1 AND variant_id = $2",
                    ORG, v))
            out[f"{key}:uniform"] = int(await conn.fetchval(
                f"SELECT coalesce(sum(reserved), 0) FROM {table} WHERE organization_id = $1"
                f" AND variant_id LIKE '{UNIFORM_PREFIX}%'", ORG))
        out["svc:lines"] = int(await conn.fetchval(
            "SELECT count(*) FROM reservation_lines WHERE organization_id = $1 AND status = 'active'", ORG))
        out["pg:rows"] = int(await conn.fetchval("SELECT count(*) FROM bench_reservation"))
        return out
    finally:
        await conn.close()


async def service_batches(dsn: str, t0: float, t1: float) -> tuple[int, int]:
    """(reservations, shard commits) of the service between two wall-clock times.

    A shard stamps every movement of one batch with the batch's `now`, so the distinct
    timestamps of `reserve` movements count the commits that carried reservations.
    """
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT occurred_at) FROM movements WHERE type = 'reserve'"
            " AND occurred_at >= to_timestamp($1) AND occurred_at < to_timestamp($2)", t0, t1)
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


# ---------------------------------------------------------------- service set-up through its admin API


async def create_stocks(target: str, hot_variants: list[str], stocks: int, concurrency: int = 64) -> None:
    import grpc

    from gateway.pb import inventory_pb2 as pb
    from gateway.pb import inventory_pb2_grpc as pbg

    async with grpc.aio.insecure_channel(target) as ch:
        admin = pbg.InventoryAdminServiceStub(ch)
        await admin.UpsertWarehouse(pb.Warehouse(organization_id=ORG, warehouse_id=WAREHOUSE, name="bench",
                                                 active=True), timeout=30)
        todo = [(v, HOT_UNITS) for v in hot_variants]
        todo += [(f"{UNIFORM_PREFIX}{i:05d}", UNIFORM_UNITS) for i in range(stocks)]
        it = iter(todo)

        async def worker() -> None:
            for variant, units in it:
                await admin.RecordMovement(pb.MovementRequest(
                    organization_id=ORG, variant_id=variant, warehouse_id=WAREHOUSE,
                    type=pb.MOVEMENT_TYPE_RECEIPT, quantity=units, reason="bench stock",
                    idempotency_key=f"bench-receipt-{variant}"), timeout=60)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


# ---------------------------------------------------------------- one measured phase


@dataclass
class Phase:
    target: str  # key of TARGETS
    concurrency: int
    round: int
    result: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    top: list[tuple[str, float]] = field(default_factory=list)  # (process, cores) of the service's processes
    commits: tuple[int, int] = (0, 0)  # service only: (reservations, commits) in the window
    pool: int = 0  # baseline only: asyncpg pool size

    @property
    def label(self) -> str:
        return TARGETS[self.target] + (f" (pool {min(self.pool, self.concurrency)})" if self.pool else "")

    @property
    def ops(self) -> float:
        return float(self.result.get("ops_per_s", 0.0))


@dataclass
class Env:
    args: argparse.Namespace
    log_dir: Path
    dbname: str
    service_target: str = ""
    echo_target: str = ""
    service: procs.Child | None = None
    echo: procs.Child | None = None
    actor_port: int = 0
    roles: dict[int, str] = field(default_factory=dict)
    children: list[procs.Child] = field(default_factory=list)
    ok_by_target: dict[str, int] = field(default_factory=dict)


def hot_variant(concurrency: int, profile: bool = False) -> str:
    return f"hot-c{concurrency}" + ("-profile" if profile else "")


def phase_spec(env: Env, target: str, concurrency: int, hot: str, order_prefix: str, pool: int = 0) -> dict[str, Any]:
    a = env.args
    base: dict[str, Any] = {
        "concurrency": concurrency, "warmup": a.warmup, "duration": a.duration, "call_timeout": a.call_timeout,
        "organization_id": ORG, "warehouse_id": WAREHOUSE, "ttl_seconds": TTL_SECONDS,
        "stocks": 1 if target.endswith("hot") else a.stocks, "hot_variant": hot,
        "variant_prefix": UNIFORM_PREFIX, "order_prefix": order_prefix,
    }
    if target.startswith("pg"):
        return {**base, "kind": "pg", "dsn": a.dsn, "pool_size": min(concurrency, pool)}
    path = ECHO_PATH if target == "echo" else RESERVE_PATH
    return {**base, "kind": "grpc", "target": env.echo_target if target == "echo" else env.service_target,
            "method": path, "channels": a.channels}


def wait_for_quiet(env: Env) -> float:
    """Wait (bounded) until the rest of the machine uses less than --quiet cores; return what it used."""
    return common.wait_for_quiet(env.roles, env.dbname, env.args.quiet, env.args.quiet_timeout)


def run_phase(env: Env, phase: Phase, hot: str, tag: str = "", on_t0: Any = None) -> Phase:
    wait_for_quiet(env)
    tag = f"-pool{phase.pool}{tag}" if phase.pool else tag
    spec = phase_spec(env, phase.target, phase.concurrency, hot,
                      order_prefix=f"{phase.target}-c{phase.concurrency}-r{phase.round}{tag}", pool=phase.pool)
    service_pids = [p for p, r in env.roles.items() if r in ("gateway", "actors")]
    run = common.run_load(f"load-{phase.target}-c{phase.concurrency}-r{phase.round}{tag}", spec, env.roles,
                          env.dbname, env.log_dir, env.children, watch=service_pids, on_t0=on_t0)
    phase.result = run.result
    phase.cpu = run.cpu
    if phase.target.startswith("svc"):
        phase.commits = asyncio.run(service_batches(env.args.dsn, *run.wall))
    phase.top = [(f"{env.roles[p]}:{p}", cores) for p, cores in run.top]
    key = f"{phase.target}:{hot if phase.target.endswith('hot') else 'uniform'}"
    env.ok_by_target[key] = env.ok_by_target.get(key, 0) + phase.result["ok_total"]
    if run.extra is not None:
        phase.result["_extra"] = run.extra
    return phase


# ---------------------------------------------------------------- servers


def start_echo(env: Env) -> None:
    port = procs.free_port(50200, 50299)
    env.echo = procs.Child("echo-server", [PY, str(BENCH / "echo_server.py"), str(port)], None, env.log_dir)
    env.children.append(env.echo)
    env.echo.wait_for("echo serving on port", 30)
    env.echo_target = f"127.0.0.1:{port}"
    env.roles[env.echo.pid] = "echo"


def start_service(env: Env) -> None:
    a = env.args
    grpc_port = procs.free_port(50200, 50299, avoid=[int(env.echo_target.rsplit(":", 1)[1])])
    http_port = procs.free_port(50200, 50299, avoid=[grpc_port, int(env.echo_target.rsplit(":", 1)[1])])
    env.actor_port = procs.free_port(19800, 19899)
    if procs.pids_with_env("INVENTORY_ACTOR_PORT", str(env.actor_port)):
        raise RuntimeError(f"processes with INVENTORY_ACTOR_PORT={env.actor_port} already exist")
    service_env = dict(os.environ, INVENTORY_DATABASE_URL=a.dsn, INVENTORY_GRPC_HOST="127.0.0.1",
                       INVENTORY_GRPC_PORT=str(grpc_port), INVENTORY_HTTP_PORT=str(http_port),
                       INVENTORY_ACTOR_PORT=str(env.actor_port), INVENTORY_LOG_LEVEL=a.log_level)
    if a.shards:
        service_env["INVENTORY_SHARDS"] = str(a.shards)
    for kv in a.service_env:
        k, _, v = kv.partition("=")
        service_env[k] = v
    inventory = Path(PY).parent / "inventory"
    argv = [str(inventory), "serve"] if inventory.exists() else [PY, "-m", "gateway.cli", "serve"]
    env.service = procs.Child("service", argv, service_env, env.log_dir)
    env.children.append(env.service)
    line = env.service.wait_for("inventory serving gRPC on port", 180)
    log(line)
    env.service_target = f"127.0.0.1:{grpc_port}"
    env.roles[env.service.pid] = "gateway"
    for pid in procs.pids_with_env("INVENTORY_ACTOR_PORT", str(env.actor_port)):
        if pid != env.service.pid:
            env.roles[pid] = "actors"
    asyncio.run(health_check(env.service_target))


async def health_check(target: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"service health is {resp.status}")


def stop_service(env: Env) -> list[str]:
    """SIGTERM `inventory serve` and wait; then make sure no actor process of ours is left."""
    problems: list[str] = []
    if env.service is None:
        return problems
    t = time.monotonic()
    code = env.service.stop(timeout=60)
    log(f"service stopped with exit code {code} in {time.monotonic() - t:.1f} s")
    if code not in (0, 130, -signal.SIGTERM):
        problems.append(f"`inventory serve` exited with code {code} on SIGTERM")
    deadline = time.monotonic() + 15
    left = []
    while time.monotonic() < deadline:
        left = [p for p in procs.pids_with_env("INVENTORY_ACTOR_PORT", str(env.actor_port)) if procs.alive(p)]
        if not left:
            break
        time.sleep(0.5)
    if left:
        problems.append(f"{len(left)} actor process(es) outlived `inventory serve` 15 s after it exited: "
                        + ", ".join(f"{p} ({procs.cmdline(p)[:60]})" for p in left) + "; killed them")
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    env.children = [c for c in env.children if c is not env.service]
    env.service = None
    return problems


# ---------------------------------------------------------------- profile (optional)


def profile_phase(env: Env, concurrency: int) -> str:
    """One more hot-stock phase with py-spy on the gateway and every actor process.

    Every actor process, not only the busy ones of the measured phase: the profile's hot
    stock is another variant, which may live in the other shard.
    """
    if common.pyspy_path() is None:
        return "py-spy not found: `.venv/bin/pip install py-spy` to profile"
    pids = [p for p, role in env.roles.items() if role in ("gateway", "actors")]
    out_dir = env.log_dir / "profile"
    seconds = max(3, int(env.args.duration) - 1)
    spies: list[tuple[int, Path, subprocess.Popen[bytes]]] = []

    def attach() -> bool:
        spies.extend(common.pyspy_start({p: env.roles.get(p, "proc") for p in pids}, out_dir, seconds))
        return True

    cpu: dict[int, float] = {}
    phase = run_phase(env, Phase("svc-hot", concurrency, 0), hot_variant(concurrency, profile=True), tag="-profile",
                      on_t0=attach)
    for name, cores in phase.top:
        cpu[int(name.split(":")[1])] = cores
    report = [(f"profile: service hot stock, {concurrency} in flight, py-spy --nonblocking at 100 Hz for {seconds} s "
               f"(ops/s under the profiler: {phase.ops:,.0f}); raw stacks in {out_dir}")]
    errors = common.pyspy_wait(spies, seconds)
    for pid, path, _ in spies:
        if cpu.get(pid, 0.0) < 0.03:
            continue  # an idle actor process (admin, logger, registrar, the other shard)
        title = f"{env.roles.get(pid)} pid {pid}, {cpu.get(pid, 0.0):.2f} cores"
        if pid in errors:
            report.append(f"  {title}: py-spy failed: {errors[pid]}")
            continue
        report.append(summarize_profile(title, path))
    return "\n".join(report)


# Buckets of a sample by what its stack contains; the first match wins.
BUCKETS = [
    ("bridge thread: Thespian listen()", ("ExternalOpsToActors.listen",)),
    ("bridge thread: Thespian tell()", ("ExternalOpsToActors.tell",)),
    ("bridge thread: batching, encode/decode", ("ActorBridge._serve",)),
    ("shard: idle in its event loop, waiting for Postgres", ("run_until_complete", "EpollSelector.select")),
    ("shard: asyncpg statements (Python side)", ("ShardStore.", "asyncpg")),
    ("shard: activate/decide/apply/build rows", ("ShardCore.",)),
    ("shard: Thespian send of the reply", ("receiveMsg_ShardBatch", "Actor.send")),
    ("shard: rest of the handler (decode, loop)", ("receiveMsg_ShardBatch",)),
    ("gateway: servicer and flow code (Python)", ("gateway/service.py",)),
    ("gateway: servicer and flow code (Python)", ("gateway/flows.py",)),
    ("gateway: servicer and flow code (Python)", ("gateway/metrics.py",)),
    ("Thespian transport loop (receive, ack, select)", ("TCPTransport",)),
    ("other thread without Python frames (in the gateway: grpc.aio's poller thread, C code)", ("Thread._bootstrap",)),
]


def bucket_of(stack: str) -> str:
    for label, needles in BUCKETS:
        if all(n in stack for n in needles):
            return label
    return "event loop, gRPC core, protobuf (C code: no Python frame)"


def summarize_profile(title: str, path: Path, top: int = 14) -> str:
    """Self time by function and inclusive time by function, from py-spy's raw (collapsed) stacks."""
    selfs: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    buckets: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        b = bucket_of(stack)
        buckets[b] = buckets.get(b, 0) + count
        frames = stack.split(";")
        threads[frames[0]] = threads.get(frames[0], 0) + count
        funcs = [_frame(f) for f in frames]
        selfs[funcs[-1]] = selfs.get(funcs[-1], 0) + count
        for f in set(funcs):
            incl[f] = incl.get(f, 0) + count
    if not total:
        return f"  {title}: no samples"
    lines = [f"  {title}: {total} samples (active, all threads)"]
    lines.append("    by thread (outermost frame): " + ", ".join(f"{t} {100 * c / total:.0f}%"
                                              for t, c in sorted(threads.items(), key=lambda x: -x[1])[:4]))
    lines.append("    where the samples are:")
    for b, c in sorted(buckets.items(), key=lambda x: -x[1]):
        lines.append(f"      {100 * c / total:5.1f}%  {b}")
    lines.append("    self time:")
    for f, c in sorted(selfs.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"      {100 * c / total:5.1f}%  {f}")
    # Frames on (nearly) every stack are just the root of a thread or of a forked actor process.
    rootish = {f for f, c in incl.items() if c >= 0.9 * total}
    for kind, keys in (("project code", ("actors/", "gateway/", "persistence/")),
                        ("libraries", ("asyncpg", "thespian", "grpc", "asyncio/", "selectors", "msgspec"))):
        keep = [(f, c) for f, c in incl.items() if f not in rootish and any(k in f for k in keys)]
        lines.append(f"    inclusive, {kind}:")
        for f, c in sorted(keep, key=lambda x: -x[1])[:top]:
            lines.append(f"      {100 * c / total:5.1f}%  {f}")
    return "\n".join(lines)


def _frame(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; drop the line number, shorten the path.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})"


# ---------------------------------------------------------------- report


def fmt_ms(v: float) -> str:
    return "    n/a" if math.isnan(v) else f"{v:7.1f}"


PICK = "best"


def median_phase(phases: list[Phase]) -> Phase:
    """The reported round of a target: the best (default) or the median one.

    The baseline may run with several pool sizes: the round is picked per pool size, and
    the best pool size is reported (the baseline is compared at its best).
    """
    by_pool: dict[int, list[Phase]] = {}
    for p in phases:
        by_pool.setdefault(p.pool, []).append(p)
    picked = []
    for group in by_pool.values():
        ordered = sorted(group, key=lambda p: p.ops)
        picked.append(ordered[-1] if PICK == "best" else ordered[(len(ordered) - 1) // 2])
    return max(picked, key=lambda p: p.ops)


def report(env: Env, runs: dict[tuple[str, int], list[Phase]], settings: dict[str, str],
           concurrencies: list[int]) -> tuple[list[str], list[dict[str, Any]], bool]:
    a = env.args
    out: list[str] = []
    csv_rows: list[dict[str, Any]] = []
    all_met = True
    for c in concurrencies:
        med = {t: median_phase(runs[(t, c)]) for t in TARGETS if runs.get((t, c))}
        out.append("")
        out.append(f"== {c} in flight, {a.duration:.0f} s measured after {a.warmup:.0f} s warm-up"
                   + (f", {a.pick} of {a.repeat} rounds" if a.repeat > 1 else "") + " ==")
        out.append(f"{'target':<34} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'max':>7} "
                   f"{'fail':>5}  {'spread ops/s':<17}")
        for t in TARGETS:
            if t not in med:
                continue
            p = med[t]
            label = p.label
            r = p.result
            all_ops = [q.ops for q in runs[(t, c)] if q.pool == p.pool]
            spread = f"{min(all_ops):,.0f}-{max(all_ops):,.0f}" if len(all_ops) > 1 else ""
            fails = sum(sum(q.result["failures"].values()) for q in runs[(t, c)])
            out.append(f"{label:<34} {p.ops:>8,.0f} {fmt_ms(r['p50_ms'])} {fmt_ms(r['p99_ms'])} "
                       f"{fmt_ms(r['p999_ms'])} {fmt_ms(r['max_ms'])} {fails:>5}  {spread:<17}")
        if a.repeat > 1:
            out.append("every round, ops/s (cores used by other processes during it):")
            for t in TARGETS:
                if runs.get((t, c)):
                    out.append(f"  {t:<8} " + "  ".join(
                        (f"pool {q.pool}: " if q.pool else "") + f"{q.ops:>6,.0f} ({q.cpu.get('other', 0):.2f})"
                        for q in runs[(t, c)]))
        ratios: dict[str, float] = {}

        def ratio(x: str, y: str, med: dict[str, Phase] = med) -> float:
            return med[x].ops / med[y].ops if x in med and y in med and med[y].ops else float("nan")

        ratios["hot/echo"] = ratio("svc-hot", "echo")
        ratios["hot/baseline"] = ratio("svc-hot", "pg-hot")
        ratios["uni/echo"] = ratio("svc-uni", "echo")
        ratios["uni/baseline"] = ratio("svc-uni", "pg-uni")
        out.append(f"ratios: service/echo  hot {ratios['hot/echo']:.2f}  10k {ratios['uni/echo']:.2f}   "
                   f"service/baseline  hot {ratios['hot/baseline']:.2f}x  10k {ratios['uni/baseline']:.2f}x")
        # targets of the issues
        checks: list[tuple[str, bool]] = []
        if "svc-hot" in med:
            p99 = med["svc-hot"].result["p99_ms"]
            if "echo" in med:
                checks.append((f"hot stock >= 70% of echo ceiling ({ratios['hot/echo'] * 100:.0f}%)",
                               ratios["hot/echo"] >= 0.70))
            if "pg-hot" in med:
                checks.append((f"hot stock >= 2.5x baseline ({ratios['hot/baseline']:.2f}x)",
                               ratios["hot/baseline"] >= 2.5))
            if c == 64:
                checks.append((f"hot stock p99 <= 50 ms at 64 in flight ({p99:.1f} ms)", p99 <= 50))
        if "svc-uni" in med and "pg-uni" in med and c == 256:
            checks.append((f"10k stocks >= 1.5x baseline at 256 in flight ({ratios['uni/baseline']:.2f}x)",
                           ratios["uni/baseline"] >= 1.5))
        svc_fail = sum(sum(q.result["failures"].values()) for t in ("svc-hot", "svc-uni") for q in runs.get((t, c), []))
        checks.append((f"no failed service call ({svc_fail} failed)", svc_fail == 0))
        for text, ok in checks:
            out.append(f"  [{'MET ' if ok else 'MISS'}] {text}")
            all_met &= ok
        # where the CPU went (cores busy on average during the measured window)
        out.append("CPU during the window, in cores of 2 (client=load generator, gw=gateway process, "
                   "actors=Thespian processes, pg=Postgres for this db + its background writers, "
                   "other=rest of the machine), and CPU per call:")
        out.append(f"  {'target':<34} {'client':>6} {'gw/echo':>7} {'actors':>6} {'pg':>5} {'other':>5} {'idle':>5}"
                   f"   {'us/call':>7}  {'commits/s':>9} {'calls/commit':>12}")
        for t in TARGETS:
            if t not in med:
                continue
            p = med[t]
            label = p.label
            g = p.cpu
            server = g.get("gateway", 0.0) + g.get("echo", 0.0)
            ours = g.get("client", 0) + server + g.get("actors", 0) + g.get("postgres", 0)
            us = ours / p.ops * 1e6 if p.ops else float("nan")
            if t.startswith("svc"):
                cps = p.commits[1] / a.duration
                per = p.commits[0] / p.commits[1] if p.commits[1] else float("nan")
            elif t.startswith("pg"):
                cps, per = p.ops, 1.0
            else:
                cps, per = float("nan"), float("nan")
            out.append(f"  {label:<34} {g.get('client', 0):>6.2f} {server:>7.2f} {g.get('actors', 0):>6.2f} "
                       f"{g.get('postgres', 0):>5.2f} {g.get('other', 0):>5.2f} {g.get('machine_idle', 0):>5.2f}"
                       f"   {us:>7.0f}  {cps:>9.0f} {per:>12.1f}")
        noisy = [f"{q.target} ({q.cpu.get('other', 0):.2f})" for q in med.values() if q.cpu.get("other", 0) > 0.25]
        if noisy:
            out.append("  WARNING: other processes on this machine used > 0.25 cores during the reported round of: "
                       + ", ".join(noisy) + "; those numbers are low by up to that share of the 2 cores")
        if "echo" in med:
            def us_per_call(p: Phase) -> float:
                g = p.cpu
                used = (g.get("client", 0) + g.get("gateway", 0) + g.get("echo", 0) + g.get("actors", 0)
                        + g.get("postgres", 0))
                return used / p.ops * 1e6 if p.ops else float("nan")

            echo_us = us_per_call(med["echo"])
            parts = [f"{t} {echo_us / us_per_call(med[t]):.2f}" for t in ("svc-hot", "svc-uni", "pg-hot", "pg-uni")
                     if t in med]
            out.append("  CPU per call relative to the echo ceiling (= the share of the ceiling reachable if CPU were "
                       "the only limit; robust to background load): " + ", ".join(parts))
        hot = med.get("svc-hot")
        if hot is not None:
            busiest = ", ".join(f"{name} {cores:.2f}" for name, cores in hot.top[:4])
            out.append(f"  service hot stock, busiest service processes (cores): {busiest}")
        row: dict[str, Any] = {
            "timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": git_commit(),
            "concurrency": c, "duration_s": a.duration, "rounds": a.repeat, "shards": a.shards or os.cpu_count(),
        }
        for t in TARGETS:
            if t in med:
                row[f"{t}_ops"] = round(med[t].ops)
                row[f"{t}_p50_ms"] = round(med[t].result["p50_ms"], 2)
                row[f"{t}_p99_ms"] = round(med[t].result["p99_ms"], 2)
                if med[t].pool:
                    row[f"{t}_pool"] = min(med[t].pool, c)
        for k, v in ratios.items():
            row[f"ratio_{k.replace('/', '_')}"] = round(v, 3)
        row["svc_failures"] = svc_fail
        row["other_load_cores"] = round(max((q.cpu.get("other", 0) for q in med.values()), default=0), 2)
        row["targets_met"] = all(ok for _, ok in checks)
        csv_rows.append(row)
    out.append("")
    out.append(f"Postgres {settings.get('server_version')}: synchronous_commit={settings.get('synchronous_commit')}"
               f" fsync={settings.get('fsync')} shared_buffers={settings.get('shared_buffers')};"
               f" baseline: asyncpg pool of {'/'.join(map(str, a.pg_pool))} connections (best reported), no reset query on release;"
               f" gRPC client: {a.channels} channels, uvloop; machine: {os.cpu_count()} cores")
    return out, csv_rows, all_met


def plot(path: Path, runs: dict[tuple[str, int], list[Phase]], concurrencies: list[int]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): no PNG"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(concurrencies))
    names = list(TARGETS)
    for j, c in enumerate(concurrencies):
        xs = [i + (j - (len(concurrencies) - 1) / 2) * width for i in range(len(names))]
        med = [median_phase(runs[(t, c)]) if runs.get((t, c)) else None for t in names]
        axes[0].bar(xs, [m.ops if m else 0 for m in med], width, label=f"{c} in flight")
        axes[1].bar(xs, [m.result["p99_ms"] if m else 0 for m in med], width, label=f"{c} in flight")
    for ax, title in ((axes[0], "reservations per second"), (axes[1], "p99 latency, ms")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([TARGETS[n].replace(", ", "\n") for n in names], fontsize=8)
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"bench/reserve.py, {dt.date.today()}, commit {git_commit()}, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return f"wrote {path}"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", default=os.environ.get("BENCH_DSN", "postgresql://root@127.0.0.1:5432/inv_bench"),
                   help="the bench's own database (created if missing; dropped first unless --keep-db)")
    p.add_argument("--keep-db", action="store_true", help="do not drop and re-create the bench database")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase (default 2)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[64], help="calls in flight (default 64)")
    p.add_argument("--c256", action="store_true", help="also measure at 256 in flight")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all phases (default 1)")
    p.add_argument("--pick", choices=["best", "median"], default="best",
                   help="which round of a target is reported (default best: interference only slows runs down)")
    p.add_argument("--stocks", type=int, default=10_000, help="stocks of the uniform phases (default 10,000)")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS), help="phases to run")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels (TCP connections) per client (default 4)")
    p.add_argument("--pg-pool", type=int, nargs="+", default=[4, 8],
                   help="baseline asyncpg pool sizes to try; the best is reported (default 4 8: on this machine "
                        "a pool of 64 made the hot row 2.7x slower through lock contention)")
    p.add_argument("--shards", type=int, default=0, help="INVENTORY_SHARDS (default: the service's default)")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for `inventory serve`, e.g. INVENTORY_MAX_INFLIGHT_PER_SHARD=2")
    p.add_argument("--log-level", default="INFO", help="INVENTORY_LOG_LEVEL of the service (default INFO)")
    p.add_argument("--call-timeout", type=float, default=30.0, help="per-call deadline, seconds")
    p.add_argument("--csv", type=Path, default=BENCH / "results.csv", help="append one line per concurrency")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--png", type=Path, help="also draw the results (needs matplotlib)")
    p.add_argument("--profile", action="store_true",
                   help="after measuring, profile one extra service hot-stock phase with py-spy")
    p.add_argument("--quiet", type=float, default=0.15,
                   help="before each phase, wait until other processes use at most this many cores (0: never wait)")
    p.add_argument("--quiet-timeout", type=float, default=180.0, help="longest wait for a quiet machine, seconds")
    p.add_argument("--log-dir", type=Path, help="keep children's stderr here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.c256 and 256 not in args.concurrency:
        args.concurrency.append(256)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global PICK
    PICK = args.pick
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="inv-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = Env(args, log_dir, db_name(args.dsn))
    env.roles[os.getpid()] = "bench"

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    problems: list[str] = []
    runs: dict[tuple[str, int], list[Phase]] = {}
    code = 1
    try:
        need_service = any(t.startswith("svc") for t in args.targets) or args.profile
        hot = [hot_variant(c) for c in args.concurrency]
        hot += [hot_variant(args.concurrency[0], True)] if args.profile else []
        log(f"preparing database {env.dbname} (logs in {log_dir})")
        settings = asyncio.run(prepare_database(args.dsn, not args.keep_db, hot, args.stocks))
        start_echo(env)
        if need_service:
            start_service(env)
            t = time.monotonic()
            asyncio.run(create_stocks(env.service_target, hot, args.stocks))
            log(f"created {len(hot)} hot and {args.stocks:,} uniform stocks through the admin API "
                f"in {time.monotonic() - t:.1f} s")
        for c in args.concurrency:
            for r in range(1, args.repeat + 1):
                for t in args.targets:
                    for pool in (args.pg_pool if t.startswith("pg") else [0]):
                        phase = run_phase(env, Phase(t, c, r, pool=pool), hot_variant(c))
                        runs.setdefault((t, c), []).append(phase)
                        fails = sum(phase.result["failures"].values())
                        log(f"c={c} round {r} {t:<8}{f' pool {pool}' if pool else ''} {phase.ops:>8,.0f} ops/s  "
                            f"p50 {phase.result['p50_ms']:.1f}  p99 {phase.result['p99_ms']:.1f} ms  failures {fails}"
                            f"  other load {phase.cpu.get('other', 0):.2f} cores")
                        if fails:
                            log(f"  failures: {phase.result['failures']} e.g. {phase.result['error_samples'][:2]}")
        profile_text = ""
        if args.profile and env.service is not None:
            profile_text = profile_phase(env, args.concurrency[0])
        # Durable state must match what the clients were told.
        totals = asyncio.run(reserved_totals(args.dsn, hot))
        lines, csv_rows, met = report(env, runs, settings, args.concurrency)
        lines.append("")
        lines.append("consistency (successful calls counted by the clients vs `reserved` in Postgres afterwards):")
        consistent = True
        for key in sorted(env.ok_by_target):
            target, _, stock = key.partition(":")
            if target == "echo" or stock == "uniform":
                continue
            db_key = ("svc:" if target.startswith("svc") else "pg:") + stock
            held = totals.get(db_key)
            ok = held == env.ok_by_target[key]
            lines.append(f"  {target:<8} {stock:<16} clients {env.ok_by_target[key]:>9,}  postgres {held:>9,}"
                         + ("  ok" if ok else "  MISMATCH"))
            consistent &= ok
        uni_svc = sum(v for k, v in env.ok_by_target.items() if k.startswith("svc-uni"))
        uni_pg = sum(v for k, v in env.ok_by_target.items() if k.startswith("pg-uni"))
        for name, mine, held in (("svc-uni", uni_svc, totals.get("svc:uniform")),
                                 ("pg-uni", uni_pg, totals.get("pg:uniform"))):
            if name not in args.targets:
                continue
            ok = mine == held
            consistent &= ok
            lines.append(f"  {name:<8} {'all 10k stocks':<16} clients {mine:>9,}  postgres {held:>9,}"
                         + ("  ok" if ok else "  MISMATCH"))
        if not consistent:
            problems.append("the reserved totals in Postgres do not match the successful calls")
        if profile_text:
            lines.append("")
            lines.append(profile_text)
        if env.service is not None:
            problems += stop_service(env)
        print("\n".join(lines), flush=True)
        if not args.no_csv:
            for row in csv_rows:
                row["consistent"] = consistent
            append_csv(args.csv, csv_rows)
            print(f"appended {len(csv_rows)} line(s) to {args.csv}")
        if args.png:
            print(plot(args.png, runs, args.concurrency))
        code = 0 if met and not problems else 3
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        code = 130
    finally:
        try:
            problems += stop_service(env)
        finally:
            for child in list(env.children):
                child.stop(10)
        for p in problems:
            print(f"PROBLEM: {p}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
