"""Scale-out performance suite (issue 5): scaling, memory per stock, cold start, expiry lag.

    .venv/bin/python bench/cluster.py scaling  [--nodes 1 2] [--gateways 1 2 4] [--concurrency 64 256]
                                               [--duration 5] [--profile] [--png bench/cluster.png]
    .venv/bin/python bench/cluster.py memory   [--memory-stocks 1000000]
    .venv/bin/python bench/cluster.py coldstart [--cold-sizes 1000 100000 1000000]
    .venv/bin/python bench/cluster.py expiry   [--expiry-reservations 100000 --expiry-spread 60]
    .venv/bin/python bench/cluster.py all      (scaling, coldstart, memory, expiry: coldstart leaves the
                                               1M-stock database that memory reuses)

Everything it starts runs on this machine, on databases of its own (prefix
inv_bench_cluster, dropped and created afresh), gRPC ports 50700-50799, HTTP ports
50800-50899 and Thespian admin ports 20400-20499 (the tests and the other benches use
other ranges). Every process it starts carries BENCH_CLUSTER_MARKER=<run>:<role> in its
environment (Thespian's forked actor processes inherit it): that is how CPU is accounted
per process group and how nothing is left running afterwards.

scaling   ReserveStock through gRPC on one hot stock and on 10,000 stocks (a random one per
          call), at each --concurrency, for each topology: --nodes actor systems in one
          Thespian convention (`inventory actors --node NAME --admin-port P --leader ...`,
          --shards shards placed by the registrar) x --gateways `inventory gateway`
          processes joined to the leader, the client's channels spread over them. Against,
          in the same run: the Postgres guarded-UPDATE baseline and the grpc.aio echo
          ceiling (bench/reserve.py's, driven by the same client, bench/loadgen.py). CPU per
          process group is printed for each phase: on 2 cores nothing can scale, and the
          table shows where the cores go. --profile: one more phase with py-spy.
memory    1,000,000 stocks with two open reservations each, seeded by COPY, all activated in
          one real ShardCore (bench/memory_probe.py): RSS per stock, and where the bytes go.
coldstart `inventory serve` started on databases of 1,000 / 100,000 / 1,000,000 stocks, without
          and with two open reservations per stock (their timers are re-armed at start):
          time until the first successful ReserveStock.
expiry    N reservations seeded in Postgres (not through gRPC: too slow to make 100,000 within
          the minute they must expire in) with expires_at spread over --expiry-spread seconds,
          then the service started (shards re-arm their timers at start); lag of each
          expiry behind its expires_at, by the time stamps that exist (see the output).

Each mode prints a table, appends one line per configuration to bench/results-cluster.csv
(--csv), and reports the load other processes put on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import common
import procs
import reserve
import seed
from common import PY, db_name, dsn_named, log
from loadgen import percentile

from persistence.migrate import migrate

ORG = reserve.ORG
WAREHOUSE = reserve.WAREHOUSE
GRPC_PORTS = (50700, 50799)
HTTP_PORTS = (50800, 50899)
ACTOR_PORTS = (20400, 20499)
MARKER = "BENCH_CLUSTER_MARKER"
DEFAULT_DSN = "postgresql://root@127.0.0.1:5432/inv_bench_cluster"
LONG_TTL_SQL = "now() + interval '1 day'"


# ---------------------------------------------------------------- processes of this run


def marked_pids(prefix: str) -> dict[int, str]:
    """pid -> marker value of every process whose environment has BENCH_CLUSTER_MARKER=<prefix>..."""
    found = {}
    needle = f"{MARKER}={prefix}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(needle):
                found[int(entry)] = item.split(b"=", 1)[1].decode()
                break
    return found


ASK = r"""
import sys
from thespian.actors import ActorSystem
from actors.system import registrar_address
asys = ActorSystem("multiprocTCPBase", capabilities={"Admin Port": int(sys.argv[1])})
print(repr(asys.ask(registrar_address(asys), sys.argv[2], 10)))
"""


@dataclass
class Run:
    """What one invocation owns: its children, its ports, its log directory."""

    args: argparse.Namespace
    log_dir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    children: list[procs.Child] = field(default_factory=list)
    ports: set[int] = field(default_factory=set)
    echo: procs.Child | None = None
    echo_target: str = ""

    def port(self, rng: tuple[int, int]) -> int:
        p = procs.free_port(*rng, avoid=self.ports)
        self.ports.add(p)
        return p

    def env(self, dsn: str, role: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INVENTORY_", "CATALOG_"))}
        env.update(INVENTORY_DATABASE_URL=dsn, INVENTORY_SHARDS=str(self.args.shards),
                   INVENTORY_LOG_LEVEL=self.args.log_level, INVENTORY_RECONCILE_INTERVAL_SECONDS="0",
                   INVENTORY_RELAY_IN_GATEWAY="false", PYTHONPATH=str(ROOT),
                   **{MARKER: f"{self.run_id}:{role}"}, **extra)
        for kv in self.args.service_env:
            k, _, v = kv.partition("=")
            env[k] = v
        return env

    def roles(self) -> dict[int, str]:
        """pid -> CPU group: client is added per phase; 'actors-<node>' for each node's processes."""
        roles = {os.getpid(): "bench"}
        if self.echo is not None:
            roles[self.echo.pid] = "echo"
        for pid, mark in marked_pids(self.run_id + ":").items():
            role = mark.split(":", 1)[1]
            if role.startswith("gw"):
                roles[pid] = "gateway"
            elif role.startswith("node-"):
                roles[pid] = "actors-" + role[5:]
            elif role == "serve":
                roles[pid] = "service"
        return roles

    def start_echo(self) -> None:
        port = self.port(GRPC_PORTS)
        self.echo = procs.Child("echo-server", [PY, str(BENCH / "echo_server.py"), str(port)], None, self.log_dir)
        self.children.append(self.echo)
        self.echo.wait_for("echo serving on port", 30)
        self.echo_target = f"127.0.0.1:{port}"

    def cleanup(self) -> list[str]:
        """Stop every child, then SIGKILL whatever of this run is left (Thespian daemonizes)."""
        problems = []
        for child in list(reversed(self.children)):
            child.stop(20)
        self.children.clear()
        deadline = time.monotonic() + 15
        left = marked_pids(self.run_id + ":")
        while left and time.monotonic() < deadline:
            time.sleep(0.3)
            left = {p: m for p, m in marked_pids(self.run_id + ":").items() if procs.alive(p)}
        if left:
            problems.append(f"{len(left)} process(es) outlived their stop and were killed: "
                            + ", ".join(f"{p} ({m})" for p, m in list(left.items())[:6]))
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return problems


async def grpc_health(target: str, timeout: float) -> None:
    """Wait until the target's gRPC health says SERVING."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await reserve.health_check(target)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Topology:
    """Nodes (actor systems in one convention) and gateways, started and stopped one by one."""

    def __init__(self, run: Run, dsn: str) -> None:
        self.run = run
        self.dsn = dsn
        self.nodes: dict[str, tuple[procs.Child, int]] = {}
        self.gateways: list[tuple[procs.Child, int]] = []
        self.leader_port = 0

    def start_node(self, name: str, timeout: float = 180) -> float:
        port = self.run.port(ACTOR_PORTS)
        if not self.nodes:
            self.leader_port = port
        ready = self.run.log_dir / f"node-{name}.ready"
        ready.unlink(missing_ok=True)
        t = time.monotonic()
        child = procs.Child(f"node-{name}", [PY, "-m", "gateway.cli", "actors", "--node", name, "--admin-port",
                                             str(port), "--leader", f"127.0.0.1:{self.leader_port}",
                                             "--ready-file", str(ready)],
                            self.run.env(self.dsn, f"node-{name}", INVENTORY_ACTOR_PORT=str(port)), self.run.log_dir)
        self.run.children.append(child)
        self.nodes[name] = (child, port)
        while not ready.exists():
            if child.proc.poll() is not None:
                raise RuntimeError(f"node {name} exited with {child.proc.returncode}:\n{child.stderr_tail()}")
            if time.monotonic() - t > timeout:
                raise TimeoutError(f"node {name} not ready in {timeout} s:\n{child.stderr_tail()}")
            time.sleep(0.1)
        return time.monotonic() - t

    def ask(self, what: str) -> Any:
        out = subprocess.run([PY, "-c", ASK, str(self.leader_port), what], check=False, cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env=self.run.env(self.dsn, "probe"))
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return eval(out.stdout.strip().splitlines()[-1])

    def wait_placed(self, timeout: float = 90) -> list[Any]:
        deadline = time.monotonic() + timeout
        want = set(self.nodes)
        while True:
            placed = self.ask("placement")
            if all(p is not None and p[1] for p in placed) and {p[0] for p in placed} == want:
                return placed
            if time.monotonic() > deadline:
                raise TimeoutError(f"placement {placed}, wanted every shard ready on {sorted(want)}")
            time.sleep(0.5)

    def start_gateway(self) -> float:
        port = self.run.port(GRPC_PORTS)
        http = self.run.port(HTTP_PORTS)
        name = f"gw{len(self.gateways) + 1}-{port}"
        t = time.monotonic()
        child = procs.Child(name, [PY, "-m", "gateway.cli", "gateway"],
                            self.run.env(self.dsn, name, INVENTORY_ACTOR_PORT=str(self.leader_port),
                                         INVENTORY_GRPC_HOST="127.0.0.1", INVENTORY_GRPC_PORT=str(port),
                                         INVENTORY_HTTP_PORT=str(http),
                                         INVENTORY_SHARD_REPLY_TIMEOUT_SECONDS=str(self.run.args.reply_timeout)),
                            self.run.log_dir)
        self.run.children.append(child)
        self.gateways.append((child, port))
        asyncio.run(grpc_health(f"127.0.0.1:{port}", 120))
        return time.monotonic() - t

    def stop_gateway(self) -> None:
        child, port = self.gateways.pop()
        child.stop(30)
        self.run.children.remove(child)
        self.run.ports.discard(port)

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{p}" for _, p in self.gateways]

    def stop(self) -> None:
        while self.gateways:
            self.stop_gateway()
        for name in reversed(list(self.nodes)):
            child, _port = self.nodes.pop(name)
            child.stop(40)
            self.run.children.remove(child)


# ---------------------------------------------------------------- scaling


@dataclass
class Measured:
    config: str  # e.g. "2 nodes x 4 gateways", "echo", "baseline"
    workload: str  # hot | 10k
    concurrency: int
    nodes: int = 0
    gateways: int = 0
    run: common.LoadRun = field(default_factory=common.LoadRun)
    commits: tuple[int, int] = (0, 0)
    pool: int = 0

    @property
    def ops(self) -> float:
        return float(self.run.result.get("ops_per_s", 0.0))

    @property
    def r(self) -> dict[str, Any]:
        return self.run.result


def phase_args(a: argparse.Namespace, dsn: str) -> argparse.Namespace:
    """The attributes bench/reserve.py's phase_spec reads."""
    return argparse.Namespace(warmup=a.warmup, duration=a.duration, call_timeout=a.call_timeout, stocks=a.stocks,
                              dsn=dsn, channels=a.channels)


def measure(run: Run, dsn: str, m: Measured, target: str, hot: str, targets: list[str] | None = None,
            on_t0: Any = None, tag: str = "") -> Measured:
    a = run.args
    roles = run.roles()
    other = common.wait_for_quiet(roles, db_name(dsn), a.quiet, a.quiet_timeout)
    env = SimpleNamespace(args=phase_args(a, dsn), echo_target=run.echo_target,
                          service_target=(targets or [""])[0])
    prefix = f"{run.run_id}-{m.config.replace(' ', '')}-{m.workload}-c{m.concurrency}{tag}"
    spec = reserve.phase_spec(env, target, m.concurrency, hot, order_prefix=prefix, pool=m.pool)  # type: ignore[arg-type]
    if targets:
        spec["targets"] = targets
        spec["channels"] = max(a.channels, len(targets))
    watch = [p for p, r in roles.items() if r in ("gateway", "echo") or r.startswith("actors")]
    m.run = common.run_load(f"load-{prefix}", spec, roles, db_name(dsn), run.log_dir, run.children, watch=watch,
                            on_t0=on_t0)
    m.run.result["other_before"] = other
    m.run.result["roles"] = {str(p): r for p, r in roles.items()}
    if target.startswith("svc"):
        m.commits = asyncio.run(reserve.service_batches(dsn, *m.run.wall))
    fails = sum(m.r["failures"].values())
    log(f"{m.config:<22} {m.workload:<4} c={m.concurrency:<4}{f' pool {m.pool}' if m.pool else '':<8}"
        f"{m.ops:>7,.0f} ops/s  p50 {m.r['p50_ms']:6.1f}  p99 {m.r['p99_ms']:6.1f} ms  failures {fails}  "
        f"other load {m.run.cpu.get('other', 0):.2f} cores")
    if fails:
        log(f"  failures: {m.r['failures']} e.g. {m.r['error_samples'][:2]}")
    return m


def best(ms: list[Measured]) -> Measured:
    return max(ms, key=lambda m: m.ops)


def cpu_cells(m: Measured, node_names: list[str]) -> str:
    g = m.run.cpu
    server = g.get("gateway", 0.0) + g.get("echo", 0.0)
    cells = [f"{g.get('client', 0):>6.2f}", f"{server:>6.2f}"]
    cells += [f"{g.get('actors-' + n, 0):>6.2f}" for n in node_names]
    cells += [f"{g.get('postgres', 0):>5.2f}", f"{g.get('other', 0):>5.2f}", f"{g.get('machine_idle', 0):>5.2f}"]
    return " ".join(cells)


def us_per_call(m: Measured) -> float:
    g = m.run.cpu
    ours = sum(v for k, v in g.items() if k in ("client", "gateway", "echo", "postgres") or k.startswith("actors"))
    return ours / m.ops * 1e6 if m.ops else float("nan")


def mode_scaling(run: Run) -> tuple[list[str], list[dict[str, Any]]]:
    a = run.args
    dsn = dsn_named(a.dsn, db_name(a.dsn) + "_scaling")
    configs = [(n, g) for n in a.nodes for g in a.gateways]
    hot_of = {(n, g, c): f"hot-n{n}g{g}-c{c}" for n, g in configs for c in a.concurrency}
    pg_hot = {c: reserve.hot_variant(c) for c in a.concurrency}
    log(f"scaling: database {db_name(dsn)}, {len(configs)} topologies x {len(a.concurrency)} concurrencies x 2 loads")
    settings = asyncio.run(reserve.prepare_database(dsn, True, list(pg_hot.values()), a.stocks))
    names = [f"{reserve.UNIFORM_PREFIX}{i:05d}" for i in range(a.stocks)]
    asyncio.run(seed.seed_stocks(dsn, ORG, WAREHOUSE, names, reserve.UNIFORM_UNITS))
    asyncio.run(seed.seed_stocks(dsn, ORG, WAREHOUSE, list(hot_of.values()) + ["hot-profile"], reserve.HOT_UNITS))
    run.start_echo()
    results: list[Measured] = []
    ok: dict[str, int] = {}

    def baselines(round_: int) -> None:
        for c in a.concurrency:
            results.append(measure(run, dsn, Measured("echo", "-", c), "echo", pg_hot[c], tag=f"-r{round_}"))
            for wl, target in (("hot", "pg-hot"), ("10k", "pg-uni")):
                for pool in a.pg_pool:
                    results.append(measure(run, dsn, Measured("baseline", wl, c, pool=pool), target, pg_hot[c],
                                           tag=f"-r{round_}"))

    baselines(1)
    topo = Topology(run, dsn)
    profile_text = ""
    try:
        for n in sorted(set(a.nodes)):
            while len(topo.nodes) < n:
                name = "abcdefgh"[len(topo.nodes)]
                took = topo.start_node(name)
                placed = topo.wait_placed()
                log(f"node {name} ready in {took:.1f} s; placement: "
                    + ", ".join(f"{i}:{p[0]}" for i, p in enumerate(placed)))
            for g in sorted(set(a.gateways)):
                while len(topo.gateways) > g:
                    topo.stop_gateway()
                while len(topo.gateways) < g:
                    took = topo.start_gateway()
                    log(f"gateway {len(topo.gateways)} serving in {took:.1f} s")
                config = f"{n} node{'s' if n > 1 else ''} x {g} gw"
                for c in a.concurrency:
                    for wl, target in (("hot", "svc-hot"), ("10k", "svc-uni")):
                        m = measure(run, dsn, Measured(config, wl, c, n, g), target, hot_of[(n, g, c)],
                                    targets=topo.targets)
                        results.append(m)
                        key = hot_of[(n, g, c)] if wl == "hot" else "uniform"
                        ok[key] = ok.get(key, 0) + m.r["ok_total"]
        if a.profile:
            profile_text = profile(run, dsn, topo)
    finally:
        topo.stop()
    # Echo and baselines again, after the service phases, and the better round of each is used:
    # measured once, first, the echo ceiling once came out at 3,309 ops/s where bench/reserve.py
    # measured 4,000-4,700 that hour, which made the service's share of it look 0.72.
    baselines(2)
    totals = asyncio.run(reserve.reserved_totals(dsn, list(hot_of.values())))
    return report_scaling(run, results, ok, totals, settings, profile_text)


def profile(run: Run, dsn: str, topo: Topology) -> str:
    """One more hot-stock phase on the last topology with py-spy on every gateway and actor process."""
    a = run.args
    if common.pyspy_path() is None:
        return "py-spy not found: `.venv/bin/pip install py-spy` to profile"
    roles = run.roles()
    pids = {p: r for p, r in roles.items() if r == "gateway" or r.startswith("actors")}
    seconds = max(3, int(a.duration) - 1)
    out_dir = run.log_dir / "profile"
    spies: list[Any] = []

    def attach() -> bool:
        spies.extend(common.pyspy_start(pids, out_dir, seconds))
        return True

    c = a.concurrency[0]
    n, g = len(topo.nodes), len(topo.gateways)
    m = measure(run, dsn, Measured(f"{n} nodes x {g} gw (py-spy)", "hot", c, n, g), "svc-hot", "hot-profile",
                targets=topo.targets, on_t0=attach, tag="-profile")
    errors = common.pyspy_wait(spies, seconds)
    cpu = dict(m.run.top)
    lines = [(f"profile: {n} node(s) x {g} gateway(s), hot stock, {c} in flight, py-spy --nonblocking at 100 Hz for "
             f"{seconds} s (ops/s under the profiler: {m.ops:,.0f}); raw stacks in {out_dir}"),
             "  CPU of each service process during the profiled phase (cores): "
             + ", ".join(f"{pids.get(p, '?')}:{p} {cores:.2f}" for p, cores in m.run.top if cores >= 0.01)]
    for pid, path, _ in spies:
        if cpu.get(pid, 0.0) < 0.03:
            continue  # idle: the Thespian admin, logger, registrar, shards the hot stock is not in
        title = f"{pids[pid]} pid {pid}, {cpu.get(pid, 0.0):.2f} cores"
        if pid in errors:
            lines.append(f"  {title}: py-spy failed: {errors[pid]}")
            continue
        lines.append(reserve.summarize_profile(title, path, top=8))
    return "\n".join(lines)


def report_scaling(run: Run, results: list[Measured], ok: dict[str, int], totals: dict[str, int],
                   settings: dict[str, str], profile_text: str) -> tuple[list[str], list[dict[str, Any]]]:
    a = run.args
    node_names = ["abcdefgh"[i] for i in range(max(a.nodes))]
    out = ["", (f"== scaling: ReserveStock through gRPC, {a.duration:.0f} s measured after {a.warmup:.0f} s warm-up per "
           f"phase, {a.shards} shards, {a.stocks:,} stocks for '10k' =="),
           "ratios: /echo = the grpc.aio echo ceiling at the same concurrency; /base = the Postgres guarded-UPDATE "
           "baseline on the same load (best pool of " + "/".join(map(str, a.pg_pool)) + "); echo and baselines are "
           "measured before and after the service phases, and the better round of each is shown",
           ("CPU in cores of 2 during the window: client | gw (all gateways, or the echo server) | actors per node | "
           "pg | other = the rest of the machine | idle")]
    head = (f"{'configuration':<24} {'load':<4} {'c':>4} {'ops/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'fail':>5} "
            f"{'/echo':>5} {'/base':>6}  {'client':>6} {'gw':>6} " + " ".join(f"{'act-' + n:>6}" for n in node_names)
            + f" {'pg':>5} {'other':>5} {'idle':>5} {'us/call':>7} {'calls/commit':>12}")
    csv_rows: list[dict[str, Any]] = []
    chart: list[tuple[str, str, int, float, float]] = []
    ts, commit = common.utc_now(), common.git_commit()
    for c in a.concurrency:
        out += ["", f"-- {c} in flight --", head]
        echo = best([m for m in results if m.config == "echo" and m.concurrency == c])
        base = {wl: best([m for m in results if m.config == "baseline" and m.workload == wl and m.concurrency == c])
                for wl in ("hot", "10k")}
        rows = [echo, base["hot"], base["10k"]]
        rows += [m for m in results if m.concurrency == c and m.config not in ("echo", "baseline")]
        for m in rows:
            fails = sum(m.r["failures"].values())
            b = base.get(m.workload)
            r_echo = m.ops / echo.ops if echo.ops else float("nan")
            r_base = m.ops / b.ops if b is not None and b.ops else float("nan")
            label = m.config + (f" (pool {m.pool})" if m.pool else "")
            per = m.commits[0] / m.commits[1] if m.commits[1] else float("nan")
            out.append(f"{label:<24} {m.workload:<4} {c:>4} {m.ops:>7,.0f} {m.r['p50_ms']:>7.1f} {m.r['p99_ms']:>7.1f} "
                       f"{fails:>5} {r_echo:>5.2f} {r_base:>5.2f}x  {cpu_cells(m, node_names)} {us_per_call(m):>7.0f}"
                       f" {per:>12.1f}")
            chart.append((label, m.workload, c, m.ops, m.r["p99_ms"]))
            csv_rows.append({
                "timestamp": ts, "commit": commit, "mode": "scaling", "config": m.config, "nodes": m.nodes,
                "gateways": m.gateways, "shards": a.shards, "workload": m.workload, "concurrency": c,
                "duration_s": a.duration, "ops": round(m.ops), "p50_ms": round(m.r["p50_ms"], 2),
                "p99_ms": round(m.r["p99_ms"], 2), "failures": fails, "ratio_echo": round(r_echo, 3),
                "ratio_baseline": round(r_base, 3) if m.config not in ("echo", "baseline") else "",
                "echo_ops": round(echo.ops), "baseline_ops": round(b.ops) if b else "",
                "cpu_client": round(m.run.cpu.get("client", 0), 2),
                "cpu_gateways": round(m.run.cpu.get("gateway", 0) + m.run.cpu.get("echo", 0), 2),
                "cpu_actors": round(sum(v for k, v in m.run.cpu.items() if k.startswith("actors")), 2),
                "cpu_postgres": round(m.run.cpu.get("postgres", 0), 2),
                "other_load_cores": round(m.run.cpu.get("other", 0), 2), "us_per_call": round(us_per_call(m)),
                "calls_per_commit": round(per, 1) if m.commits[1] else "",
            })
        svc = [m for m in results if m.concurrency == c and m.nodes]
        for wl in ("hot", "10k"):
            ops = [m.ops for m in svc if m.workload == wl]
            if ops:
                out.append(f"  service {wl}: {min(ops):,.0f}-{max(ops):,.0f} ops/s over {len(ops)} topologies "
                           f"(max/min {max(ops) / min(ops):.2f}); echo {echo.ops:,.0f}, baseline {base[wl].ops:,.0f}")
        hot11 = [m for m in svc if m.workload == "hot" and m.nodes == min(a.nodes) and m.gateways == min(a.gateways)]
        if hot11 and c in (64, 256):
            h = hot11[0]
            checks = [(f"hot >= 70% of echo ({h.ops / echo.ops:.0%})", h.ops >= 0.7 * echo.ops),
                      (f"hot >= 2.5x baseline ({h.ops / base['hot'].ops:.2f}x)", h.ops >= 2.5 * base["hot"].ops)]
            u = [m for m in svc if m.workload == "10k" and m.nodes == h.nodes and m.gateways == h.gateways]
            if u:
                checks.append((f"10k >= 1.5x baseline ({u[0].ops / base['10k'].ops:.2f}x)",
                               u[0].ops >= 1.5 * base["10k"].ops))
            out.append(f"  issue 5 targets at {h.config}: " + "; ".join(f"[{'MET' if okk else 'MISS'}] {t}"
                                                                          for t, okk in checks))
    noisy = sorted({f"{m.config}/{m.workload}/c{m.concurrency} ({m.run.cpu.get('other', 0):.2f})"
                    for m in results if m.run.cpu.get("other", 0) > 0.25})
    out.append("")
    out.append(f"other processes on the machine: max {max(m.run.cpu.get('other', 0) for m in results):.2f} cores, "
               f"mean {sum(m.run.cpu.get('other', 0) for m in results) / len(results):.2f} cores during the windows")
    if noisy:
        out.append("  WARNING: > 0.25 cores used by others during: " + ", ".join(noisy[:12])
                   + (" ..." if len(noisy) > 12 else "") + " (those figures are low by up to that share of 2 cores)")
    out.append("consistency (successful calls counted by the clients vs `reserved` in Postgres):")
    consistent = True
    for key, n in sorted(ok.items()):
        held = totals.get(f"svc:{key}")
        consistent &= held == n
        out.append(f"  {key:<16} clients {n:>8,}  postgres {held:>8,}  {'ok' if held == n else 'MISMATCH'}")
    out.append(f"Postgres {settings.get('server_version')}: synchronous_commit={settings.get('synchronous_commit')} "
               f"fsync={settings.get('fsync')}; machine: {os.cpu_count()} cores; gRPC client: one process, uvloop, "
               f"{a.channels}+ channels spread over the gateways")
    if profile_text:
        out += ["", profile_text]
    for row in csv_rows:
        row["consistent"] = consistent
    if a.png:
        out.append(plot_scaling(a.png, chart, a.concurrency))
    return out, csv_rows


def plot_scaling(path: Path, chart: list[tuple[str, str, int, float, float]], concurrencies: list[int]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[dev]'): no PNG"
    labels: list[str] = []
    for label, *_ in chart:
        base = label.split(" (pool")[0]
        if base not in labels:
            labels.append(base)
    series = [(wl, c) for c in concurrencies for wl in ("hot", "10k")]
    fig, axes = plt.subplots(2, 1, figsize=(13, 8))
    width = 0.8 / len(series)
    for j, (wl, c) in enumerate(series):
        xs, ops, p99 = [], [], []
        for i, lab in enumerate(labels):
            vals = [(o, p) for label, w, cc, o, p in chart if label.split(" (pool")[0] == lab and cc == c
                    and (w == wl or w == "-")]
            if vals:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ops.append(vals[0][0])
                p99.append(vals[0][1])
        axes[0].bar(xs, ops, width, label=f"{wl}, {c} in flight")
        axes[1].bar(xs, p99, width, label=f"{wl}, {c} in flight")
    for ax, title in ((axes[0], "reservations per second"), (axes[1], "p99 latency, ms")):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([lab.replace(" x ", "\nx ") for lab in labels], fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bench/cluster.py scaling, {common.utc_now()}, commit {common.git_commit()}, "
                 f"{os.cpu_count()} cores (echo = gRPC ceiling, baseline = Postgres guarded UPDATE)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"wrote {path}"


# ---------------------------------------------------------------- big seeded databases


def sized_dsn(a: argparse.Namespace, stocks: int) -> str:
    return dsn_named(a.dsn, f"{db_name(a.dsn)}_s{stocks}")


async def ensure_sized(dsn: str, stocks: int, lines_per_stock: int) -> dict[str, Any]:
    """A database with `stocks` stocks (c-0000000...) and `lines_per_stock` open lines each (TTL one day).

    Reused when it already holds that (a coldstart run leaves its largest one behind for memory)."""
    info: dict[str, Any] = {}
    try:
        have = await seed.counts(dsn)
    except Exception:  # noqa: BLE001 - no such database yet
        have = {}
    if have.get("stocks") != stocks:
        log(f"  seeding {stocks:,} stocks into {db_name(dsn)}")
        await seed.fresh_database(dsn)
        info["seed_stocks_s"] = await seed.seed_stocks(dsn, ORG, WAREHOUSE, [f"c-{i:07d}" for i in range(stocks)],
                                                       on_hand=1000)
        have = {"stocks": stocks, "open_lines": 0}
    else:  # reused: bring its schema up to date (a database seeded before a migration lacks it)
        await migrate(dsn)
    want = stocks * lines_per_stock
    if lines_per_stock and have["open_lines"] < want:
        if have["open_lines"]:
            await seed.clear_lines(dsn, ORG)
        _, info["seed_lines_s"] = await seed.seed_lines(dsn, ORG, lines_per_stock, LONG_TTL_SQL, like="c-%",
                                                        bump_reserved=True)
    elif not lines_per_stock and have["open_lines"]:
        info["clear_lines_s"] = await seed.clear_lines(dsn, ORG)
    info.update(await seed.counts(dsn))
    return info


# ---------------------------------------------------------------- memory


def mode_memory(run: Run) -> tuple[list[str], list[dict[str, Any]]]:
    a = run.args
    n = a.memory_stocks
    dsn = sized_dsn(a, n)
    log(f"memory: {n:,} stocks with {a.memory_lines} open reservations each in {db_name(dsn)}")
    info = asyncio.run(ensure_sized(dsn, n, a.memory_lines))
    other0 = common.other_load(run.roles(), db_name(dsn))
    probes = [("all", {"shard_id": 0, "shard_count": 1, "tracemalloc": False})]
    if a.memory_trace_fraction:
        probes.append(("traced", {"shard_id": 0, "shard_count": a.memory_trace_fraction, "tracemalloc": True}))
    res: dict[str, dict[str, Any]] = {}
    for name, extra in probes:
        spec = {"dsn": dsn, "lock_id": 424_242, "chunk": a.memory_chunk, "sample": a.memory_sample,
                "timer_horizon": 2 * 86_400.0 if a.memory_timers else 300.0, **extra}
        child = procs.Child(f"memory-probe-{name}", [PY, str(BENCH / "memory_probe.py"), json.dumps(spec)], None,
                            run.log_dir)
        run.children.append(child)
        line = child.wait_for("RESULT ", 3600)
        child.stop(30)
        run.children.remove(child)
        res[name] = json.loads(line[7:])
    other1 = common.other_load(run.roles(), db_name(dsn))
    r = res["all"]
    stocks, lines = r["stocks"], r["lines"]
    mib = 2**20
    per_total = (r["rss_after_gc"] - r["rss_base"]) / stocks
    per_act = (r["rss_after_gc"] - r["rss_after_start"]) / stocks
    per_timers = (r["rss_after_start"] - r["rss_base"]) / stocks
    acc = r["accounting"]
    out = ["", (f"== memory per resident stock: {stocks:,} stocks, {lines:,} open reservation lines "
               f"({lines / stocks:.2f} per stock), all in one ShardCore (shard 0 of 1), in-process =="),
           f"seed: {info}",
           f"{'step':<58} {'RSS MiB':>9} {'delta MiB':>10} {'bytes/stock':>12}",
           f"{'ShardCore created (imports, asyncpg, event loop)':<58} {r['rss_base'] / mib:>9.0f}",
           (f"{'start(): lock + load_due re-arms ' + format(r['timers'], ',') + ' timers':<58} "
           f"{r['rss_after_start'] / mib:>9.0f} {(r['rss_after_start'] - r['rss_base']) / mib:>10.0f} {per_timers:>12.0f}"),
           (f"{'activation of every stock (ReadStock batches of ' + str(a.memory_chunk) + ') + gc':<58} "
           f"{r['rss_after_gc'] / mib:>9.0f} {(r['rss_after_gc'] - r['rss_after_start']) / mib:>10.0f} {per_act:>12.0f}"),
           (f"{'total per resident stock with its reservations and timers':<58} {'':>9} "
           f"{(r['rss_after_gc'] - r['rss_base']) / mib:>10.0f} {per_total:>12.0f}"),
           (f"target <= 1,024 bytes per stock with two active reservations: "
           f"{'MET' if per_total <= 1024 else 'MISSED'} ({per_total:,.0f} bytes; activation alone {per_act:,.0f})"),
           f"start took {r['start_seconds']:.1f} s, activation {r['activate_seconds']:.1f} s "
           f"({stocks / max(r['activate_seconds'], 1e-9):,.0f} stocks/s); timer heap: {r['timers']:,} entries after "
           f"start, {r['timers_after_activation']:,} after activation"
           + (" (every open line is in the heap twice: load_due at start and again on activation)"
              if r["timers_after_activation"] >= 2 * r["timers"] > 0 else ""),
           "",
           (f"where the bytes go (sys.getsizeof of the objects reachable from {acc['sample_variants']:,} random resident "
           f"variants: {acc['sample_stocks']:,} stocks, {acc['sample_lines']:,} lines, {acc['sample_timer_entries']:,} "
           f"timer entries; an object shared by many stocks counts once): {acc['total_bytes_per_stock']:,.0f} "
           f"bytes/stock accounted of {per_total:,.0f} by RSS (the rest: allocator overhead and fragmentation)"),
           f"  {'referenced from':<52} {'bytes/stock':>11}"]
    for where, per in acc["by_where"].items():
        out.append(f"  {where:<52} {per:>11.0f}")
    out.append(f"  {'by type (referenced from / type)':<52} {'bytes/stock':>11} {'objects/stock':>13}")
    for row in acc["rows"][:22]:
        out.append(f"  {(row['where'][:36] + ' / ' + row['type']):<52} {row['bytes_per_stock']:>11.0f} "
                   f"{row['objects_per_stock']:>13.2f}")
    if "traced" in res:
        t = res["traced"]
        out += ["", (f"tracemalloc, a shard owning 1/{a.memory_trace_fraction} of the keys ({t['stocks']:,} stocks, "
                    f"{t['lines']:,} lines): allocated during start + activation, by allocating line "
                    f"({t['tracemalloc_total_per_stock']:,.0f} bytes/stock in all; what asyncpg's C code makes "
                    "while decoding rows, ids as new str and times as float, counts at asyncio's read callback "
                    "in selector_events.py)")]
        for row in t["tracemalloc"][:12]:
            out.append(f"  {row['bytes_per_stock']:>7.0f} B/stock {row['objects_per_stock']:>6.2f} obj/stock  "
                       f"{row['where']}")
    out.append(f"other processes on the machine: {other0:.2f} cores before, {other1:.2f} after (memory figures do not "
               "depend on it)")
    row = {"timestamp": common.utc_now(), "commit": common.git_commit(), "mode": "memory", "config": f"{stocks} stocks",
           "stocks": stocks, "lines": lines, "bytes_per_stock": round(per_total), "bytes_per_stock_activation":
           round(per_act), "bytes_per_stock_timers": round(per_timers),
           "bytes_per_stock_accounted": round(acc["total_bytes_per_stock"]),
           "activate_s": round(r["activate_seconds"], 1), "other_load_cores": round(max(other0, other1), 2)}
    return out, [row]


# ---------------------------------------------------------------- cold start


def start_serve(run: Run, dsn: str, tag: str) -> tuple[procs.Child, str]:
    grpc_port = run.port(GRPC_PORTS)
    http = run.port(HTTP_PORTS)
    actor = run.port(ACTOR_PORTS)
    env = run.env(dsn, "serve", INVENTORY_GRPC_HOST="127.0.0.1", INVENTORY_GRPC_PORT=str(grpc_port),
                  INVENTORY_HTTP_PORT=str(http), INVENTORY_ACTOR_PORT=str(actor))
    child = procs.Child(f"serve-{tag}", [PY, "-m", "gateway.cli", "serve"], env, run.log_dir)
    run.children.append(child)
    return child, f"127.0.0.1:{grpc_port}"


def stop_serve(run: Run, child: procs.Child) -> list[str]:
    code = child.stop(60)
    run.children.remove(child)
    problems = [] if code in (0, 130, -signal.SIGTERM) else [f"`inventory serve` exited with {code}"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = [p for p, m in marked_pids(run.run_id + ":").items() if m.endswith(":serve") and procs.alive(p)]
        if not left:
            break
        time.sleep(0.3)
    else:
        problems.append(f"actor processes outlived `inventory serve`: {left}; killed")
        for p in left:
            os.kill(p, signal.SIGKILL)
    return problems


async def first_reply(target: str, variants: list[str], started: float, timeout: float) -> dict[str, float]:
    """Call ReserveStock until one succeeds; then one more on another cold stock."""
    import grpc

    from gateway.pb import inventory_pb2 as pb
    from gateway.pb import inventory_pb2_grpc as pbg

    def req(v: str) -> Any:
        return pb.ReserveStockRequest(organization_id=ORG, order_id=f"cold-{uuid.uuid4().hex}", ttl_seconds=3600,
                                      items=[pb.ReserveItem(variant_id=v, quantity=1, warehouse_id=WAREHOUSE)])

    attempts = 0
    out: dict[str, float] = {}
    # short reconnect back-off: the default (1 s, growing) would be measured instead of the service
    options = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
               ("grpc.max_reconnect_backoff_ms", 50)]
    async with grpc.aio.insecure_channel(target, options=options) as ch:
        stub = pbg.InventoryServiceStub(ch)
        while True:
            attempts += 1
            t = time.monotonic()
            try:
                resp = await stub.ReserveStock(req(variants[0]), timeout=2)
                if resp.success:
                    out["first_reply_s"] = time.monotonic() - started
                    out["first_call_ms"] = (time.monotonic() - t) * 1e3
                    break
                raise RuntimeError(f"ReserveStock refused: {resp.error_message}")
            except grpc.aio.AioRpcError:
                if time.monotonic() - started > timeout:
                    raise
                await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
        t = time.monotonic()
        resp = await stub.ReserveStock(req(variants[1]), timeout=30)
        assert resp.success, resp.error_message
        out["second_cold_call_ms"] = (time.monotonic() - t) * 1e3
    out["attempts"] = attempts
    return out


def mode_coldstart(run: Run) -> tuple[list[str], list[dict[str, Any]]]:
    a = run.args
    rows: list[dict[str, Any]] = []
    out = ["", (f"== cold start: `inventory serve` ({a.shards} shards) started on a database of N stocks; time to the "
               "first successful ReserveStock (from the exec of `inventory serve`) =="),
           (f"{'stocks':>10} {'open lines':>11} {'serving line s':>14} {'first reply s':>13} {'1st call ms':>11} "
           f"{'next cold call ms':>17} {'other cores':>11}")]
    problems: list[str] = []
    for n in a.cold_sizes:
        dsn = sized_dsn(a, n)
        for lines_per_stock in (0, a.memory_lines):
            log(f"coldstart: {n:,} stocks, {lines_per_stock} open lines per stock")
            info = asyncio.run(ensure_sized(dsn, n, lines_per_stock))
            rng = random.Random(n + lines_per_stock)
            variants = [f"c-{rng.randrange(n):07d}" for _ in range(2)]
            for rep in range(a.cold_repeat):
                roles = run.roles()
                common.wait_for_quiet(roles, db_name(dsn), a.quiet, a.quiet_timeout)
                s0 = procs.snapshot()
                started = time.monotonic()
                child, target = start_serve(run, dsn, f"cold-{n}-{lines_per_stock}-{rep}")
                serving: list[float] = []

                def watch(child: procs.Child = child, serving: list[float] = serving) -> None:
                    try:
                        child.wait_for("inventory serving gRPC on port", a.cold_timeout)
                        serving.append(time.monotonic())
                    except Exception as e:  # noqa: BLE001 - the first_reply timeout reports it
                        log(f"  no serving line: {e}")

                threading.Thread(target=watch, daemon=True).start()
                try:
                    res = asyncio.run(first_reply(target, variants, started, a.cold_timeout))
                    s1 = procs.snapshot()
                finally:
                    roles = run.roles()
                    problems += stop_serve(run, child)
                cpu = procs.cpu_by_group(s0, s1, roles, db_name(dsn))
                other = cpu["other"] / (s1.at - s0.at)
                ready_s = (serving[0] - started) if serving else float("nan")
                out.append(f"{n:>10,} {info['open_lines']:>11,} {ready_s:>14.2f} {res['first_reply_s']:>13.2f} "
                           f"{res['first_call_ms']:>11.0f} {res['second_cold_call_ms']:>17.0f} {other:>11.2f}")
                rows.append({"timestamp": common.utc_now(), "commit": common.git_commit(), "mode": "coldstart",
                             "config": f"{n} stocks, {lines_per_stock} open lines each", "stocks": n,
                             "lines": info["open_lines"], "shards": a.shards,
                             "first_reply_s": round(res["first_reply_s"], 2),
                             "first_call_ms": round(res["first_call_ms"]),
                             "second_cold_call_ms": round(res["second_cold_call_ms"]),
                             "serving_line_s": round(ready_s, 2), "other_load_cores": round(other, 2)})
    out.append("serving line s = when `inventory serve` printed 'serving' (every shard configured, its timers "
               "re-armed; the gateway up), from the exec; first reply includes Python start-up, migrations, the actor system, the shards, the gateway and "
               "the activation of one stock")
    out += [f"PROBLEM: {p}" for p in problems]
    return out, rows


# ---------------------------------------------------------------- expiry lag


async def expiry_seed(dsn: str, a: argparse.Namespace) -> tuple[float, float]:
    """Stocks e-00000.. and N reservations (one line each) due from now + lead over `spread` seconds."""
    n, stocks = a.expiry_reservations, a.expiry_stocks
    per = n // stocks
    await seed.fresh_database(dsn)
    await seed.seed_stocks(dsn, ORG, WAREHOUSE, [f"e-{i:05d}" for i in range(stocks)], on_hand=1000, reserved=per)
    first = time.time() + a.expiry_lead
    await seed.seed_lines(dsn, ORG, per, f"to_timestamp({first!r} + {float(a.expiry_spread)!r} * k / n)", like="e-%")
    return first, first + a.expiry_spread


POLL_SQL = """
SELECT reservation_id FROM reservations
WHERE organization_id = $1 AND status = 'expired' AND updated_at >= to_timestamp($2)
"""


async def expiry_poll(dsn: str, n: int, until: float, interval: float, seen: dict[str, tuple[float, float]]) -> int:
    """Every `interval`: which reservations are now visibly expired. seen[rid] = (last poll that did
    not see it, the poll that did), wall-clock at the query's start: the commit lies between."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    polls = 0
    prev = time.time()
    try:
        while len(seen) < n and time.time() < until:
            t = time.time()
            # rows whose transaction began up to 30 s before the previous poll (a commit may take a while)
            for r in await conn.fetch(POLL_SQL, ORG, prev - 30):
                if r[0] not in seen:
                    seen[r[0]] = (prev, t)
            polls += 1
            prev = t
            await asyncio.sleep(max(0.0, interval - (time.time() - t)))
    finally:
        await conn.close()
    return polls


async def expiry_facts(dsn: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        # a join, not a correlated subquery: no index covers the reference of an expire movement
        # (migration 005 keeps reference_id indexed for shipped transfers only)
        rows = await conn.fetch("""
            WITH m AS (SELECT reference_id, extract(epoch FROM min(occurred_at))::float8 AS at FROM movements
                       WHERE organization_id = $1 AND type = 'expire' GROUP BY reference_id)
            SELECT r.reservation_id, r.status, extract(epoch FROM r.expires_at)::float8 AS due,
                   extract(epoch FROM r.updated_at)::float8 AS tx_start, m.at AS batch_at
            FROM reservations r LEFT JOIN m ON m.reference_id = r.reservation_id
            WHERE r.organization_id = $1""", ORG)
        events = await conn.fetchval(
            "SELECT count(DISTINCT payload->'data'->>'reservation_id') FROM outbox WHERE event_name = "
            "'inventory.reservation.expired'")
        events_all = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE event_name = 'inventory.reservation.expired'")
        reserved = await conn.fetchval("SELECT coalesce(sum(reserved), 0) FROM stocks WHERE organization_id = $1", ORG)
        return {"rows": [tuple(r) for r in rows], "events": int(events), "events_all": int(events_all),
                "reserved_left": int(reserved)}
    finally:
        await conn.close()


def stats(values: list[float]) -> str:
    v = sorted(values)
    if not v:
        return "n/a"
    return (f"p50 {percentile(v, 0.5) * 1e3:7.0f}  p99 {percentile(v, 0.99) * 1e3:7.0f}  max {v[-1] * 1e3:7.0f}"
            f"  (min {v[0] * 1e3:.0f}) ms")


def mode_expiry(run: Run) -> tuple[list[str], list[dict[str, Any]]]:
    a = run.args
    n = a.expiry_reservations
    if n % a.expiry_stocks:
        raise SystemExit("--expiry-reservations must be a multiple of --expiry-stocks")
    dsn = dsn_named(a.dsn, db_name(a.dsn) + "_expiry")
    log(f"expiry: seeding {n:,} reservations over {a.expiry_stocks:,} stocks in {db_name(dsn)}, due from "
        f"now + {a.expiry_lead:.0f} s over {a.expiry_spread:.0f} s")
    first, last = asyncio.run(expiry_seed(dsn, a))
    t_exec = time.time()
    child, _target = start_serve(run, dsn, "expiry")
    problems: list[str] = []
    seen: dict[str, tuple[float, float]] = {}
    try:
        child.wait_for("inventory serving gRPC on port", 180)
        t_ready = time.time()
        log(f"  service serving {t_ready - t_exec:.1f} s after exec; first expiry due in {first - t_ready:.1f} s")
        roles = run.roles()
        while time.time() < first:
            time.sleep(0.05)
        s0 = procs.snapshot()
        polls = asyncio.run(expiry_poll(dsn, n, last + a.expiry_timeout, a.expiry_poll, seen))
        s1 = procs.snapshot()
        t_done = time.time()
    finally:
        problems += stop_serve(run, child)
    facts = asyncio.run(expiry_facts(dsn))
    cpu = {k: v / (s1.at - s0.at) for k, v in procs.cpu_by_group(s0, s1, roles, db_name(dsn)).items()}
    due_after_ready = [r for r in facts["rows"] if r[2] >= t_ready]
    expired = [r for r in facts["rows"] if r[1] == "expired"]
    lag_batch = [r[4] - r[2] for r in due_after_ready if r[1] == "expired" and r[4] is not None]
    lag_tx = [r[3] - r[2] for r in due_after_ready if r[1] == "expired"]
    lag_seen_hi = [seen[r[0]][1] - r[2] for r in due_after_ready if r[0] in seen]
    lag_seen_lo = [max(seen[r[0]][0], r[3]) - r[2] for r in due_after_ready if r[0] in seen]
    p99_hi = percentile(sorted(lag_seen_hi), 0.99) if lag_seen_hi else float("nan")
    p99_tx = percentile(sorted(lag_tx), 0.99) if lag_tx else float("nan")
    out = ["", (f"== expiry lag: {n:,} reservations (1 line each, {n // a.expiry_stocks} per stock on "
               f"{a.expiry_stocks:,} stocks) seeded in Postgres, expires_at spread evenly over {a.expiry_spread:.0f} s "
               f"({n / a.expiry_spread:,.0f} expiries/s), {a.shards} shards; timers re-armed by the shards at start =="),
           (f"service serving {t_ready - t_exec:.1f} s after exec, {first - t_ready:.1f} s before the first expiry; "
           f"{len(due_after_ready):,} reservations due after it (the lags below are theirs)"),
           (f"expired: {len(expired):,} of {n:,}; inventory.reservation.expired events: {facts['events']:,} reservations "
           f"({facts['events_all']:,} rows: {'exactly once' if facts['events_all'] == facts['events'] == n else 'CHECK'})"
           f"; reserved left on the stocks: {facts['reserved_left']}; poller: {polls} polls every {a.expiry_poll} s, "
           f"last expiry seen {max((s[1] for s in seen.values()), default=float('nan')) - last:.1f} s after the last due"),
           "lag behind expires_at, by the time stamps that exist:",
           f"  shard batch began (movements.occurred_at = the batch's `now`)     {stats(lag_batch)}",
           f"  commit transaction began (reservations.updated_at = now())        {stats(lag_tx)}",
           f"  visible to a poller, upper bound of the commit (poll start)        {stats(lag_seen_hi)}",
           f"  visible to a poller, lower bound (previous poll, or tx start)      {stats(lag_seen_lo)}",
           (f"target p99 <= 1 s (commit): {'MET' if p99_hi <= 1.0 else ('MISSED' if p99_tx > 1.0 else 'UNDECIDED')} "
           f"(p99 between {p99_tx:.2f} s (tx start) and {p99_hi:.2f} s (seen by the poller))"),
           "CPU during the expiry window, cores: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items())
                                                               if v >= 0.005),
           ("no commit time stamp exists in the schema: reservations.updated_at / reservation_lines.updated_at are "
           "now() (transaction start), movements.occurred_at is the shard's clock when the batch began")]
    out += [f"PROBLEM: {p}" for p in problems]
    row = {"timestamp": common.utc_now(), "commit": common.git_commit(), "mode": "expiry",
           "config": f"{n} reservations over {a.expiry_spread:.0f} s", "reservations": n, "shards": a.shards,
           "expired": len(expired), "events": facts["events_all"],
           "lag_tx_p50_ms": round(percentile(sorted(lag_tx), 0.5) * 1e3) if lag_tx else "",
           "lag_tx_p99_ms": round(p99_tx * 1e3) if lag_tx else "",
           "lag_tx_max_ms": round(max(lag_tx) * 1e3) if lag_tx else "",
           "lag_seen_p50_ms": round(percentile(sorted(lag_seen_hi), 0.5) * 1e3) if lag_seen_hi else "",
           "lag_seen_p99_ms": round(p99_hi * 1e3) if lag_seen_hi else "",
           "lag_seen_max_ms": round(max(lag_seen_hi) * 1e3) if lag_seen_hi else "",
           "other_load_cores": round(cpu.get("other", 0), 2), "duration_s": round(t_done - first, 1)}
    return out, [row]


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["scaling", "memory", "coldstart", "expiry", "all"])
    p.add_argument("--dsn", default=os.environ.get("BENCH_CLUSTER_DSN", DEFAULT_DSN),
                   help="name prefix of the bench's databases (suffixes _scaling, _s<N>, _expiry)")
    p.add_argument("--shards", type=int, default=4, help="INVENTORY_SHARDS of every topology (default 4)")
    p.add_argument("--log-level", default="WARNING", help="INVENTORY_LOG_LEVEL of the service (default WARNING)")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--csv", type=Path, default=BENCH / "results-cluster.csv")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--log-dir", type=Path, help="children's stderr (default: a temp dir)")
    p.add_argument("--quiet", type=float, default=0.15, help="wait until others use at most this many cores (0: never)")
    p.add_argument("--quiet-timeout", type=float, default=20.0, help="longest wait for a quiet machine per phase, s")
    s = p.add_argument_group("scaling")
    s.add_argument("--nodes", type=int, nargs="+", default=[1, 2], choices=range(1, 5))
    s.add_argument("--gateways", type=int, nargs="+", default=[1, 2, 4])
    s.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    s.add_argument("--duration", type=float, default=5.0, help="measured seconds per phase (default 5)")
    s.add_argument("--warmup", type=float, default=2.0)
    s.add_argument("--stocks", type=int, default=10_000, help="stocks of the uniform load (default 10,000)")
    s.add_argument("--channels", type=int, default=4, help="gRPC channels of the client (at least one per gateway)")
    s.add_argument("--pg-pool", type=int, nargs="+", default=[4, 8])
    s.add_argument("--call-timeout", type=float, default=30.0)
    s.add_argument("--reply-timeout", type=float, default=30.0, help="INVENTORY_SHARD_REPLY_TIMEOUT_SECONDS")
    s.add_argument("--profile", action="store_true", help="one more hot phase on the last topology under py-spy")
    s.add_argument("--png", type=Path, default=BENCH / "cluster.png", help="chart of ops/s and p99 per configuration")
    m = p.add_argument_group("memory")
    m.add_argument("--memory-stocks", type=int, default=1_000_000)
    m.add_argument("--memory-lines", type=int, default=2, help="open reservations per stock (memory and coldstart)")
    m.add_argument("--memory-chunk", type=int, default=1000, help="variants per activation batch")
    m.add_argument("--memory-sample", type=int, default=20_000, help="variants in the getsizeof accounting")
    m.add_argument("--memory-timers", action=argparse.BooleanOptionalAction, default=True,
                   help="the probe's shard arms a timer for every stock (its timer horizon covers the seeded "
                        "reservations, due in a day); --no-memory-timers: the 300 s default, no timer in memory")
    m.add_argument("--memory-trace-fraction", type=int, default=50,
                   help="tracemalloc run on a shard owning 1/N of the keys (0: skip)")
    c = p.add_argument_group("coldstart")
    c.add_argument("--cold-sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    c.add_argument("--cold-repeat", type=int, default=1)
    c.add_argument("--cold-timeout", type=float, default=300.0)
    e = p.add_argument_group("expiry")
    e.add_argument("--expiry-reservations", type=int, default=100_000)
    e.add_argument("--expiry-stocks", type=int, default=10_000)
    e.add_argument("--expiry-spread", type=float, default=60.0, help="expires_at spread over this many seconds")
    e.add_argument("--expiry-lead", type=float, default=45.0,
                   help="first expiry this long after seeding (the service must be up by then)")
    e.add_argument("--expiry-poll", type=float, default=0.25, help="poller interval, s")
    e.add_argument("--expiry-timeout", type=float, default=120.0, help="wait this long after the last due time")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="inv-bench-cluster-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    run = Run(args, log_dir)
    log(f"bench/cluster.py {args.mode}: run {run.run_id}, logs in {log_dir}")

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    # coldstart leaves the 1M-stock database (two open lines each) that memory reuses
    modes = ["scaling", "coldstart", "memory", "expiry"] if args.mode == "all" else [args.mode]
    code = 0
    problems: list[str] = []
    try:
        for mode in modes:
            fn = {"scaling": mode_scaling, "memory": mode_memory, "coldstart": mode_coldstart,
                  "expiry": mode_expiry}[mode]
            try:
                lines, rows = fn(run)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - report and go on with the next mode
                import traceback

                problems.append(f"{mode}: {type(e).__name__}: {e}")
                traceback.print_exc()
                code = 1
                problems += run.cleanup()
                continue
            print("\n".join(lines), flush=True)
            if not args.no_csv and rows:
                common.append_csv(args.csv, rows)
                print(f"appended {len(rows)} line(s) to {args.csv}", flush=True)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        code = 130
    finally:
        problems += run.cleanup()
        for p in problems:
            print(f"PROBLEM: {p}", flush=True)
    return code if not problems else max(code, 1)


if __name__ == "__main__":
    sys.exit(main())
