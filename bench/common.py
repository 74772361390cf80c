"""What the benchmarks share: logging, database names, the CSV log, the quiet-machine wait,
one measured load phase (a bench/loadgen.py child with CPU accounted per process group),
and py-spy profiles.

Used by bench/reserve.py and bench/cluster.py; `paired_rounds` and `cprofile_top` by the
in-process benches (bench/gateway_path.py, bench/shard_path.py).
"""

from __future__ import annotations

import cProfile
import csv
import datetime as dt
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- database names


def admin_dsn(dsn: str, database: str = "test") -> str:
    u = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(u._replace(path="/" + database))


def db_name(dsn: str) -> str:
    return urllib.parse.urlsplit(dsn).path.lstrip("/")


def dsn_named(dsn: str, database: str) -> str:
    return admin_dsn(dsn, database)


# ---------------------------------------------------------------- records


def git_commit() -> str:
    """The commit measured: `git describe --always --dirty`, or BENCH_GIT_COMMIT (a bench run from an export)."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], check=False,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def append_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows; new columns rewrite the file with the wider header (old rows keep blanks)."""
    if not rows:
        return
    fields = list(rows[0])
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        fields = header + [k for k in fields if k not in header]
        if fields != header:  # new columns: rewrite with the wider header
            with open(path, newline="") as f:
                old = list(csv.DictReader(f))
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if not exists:
            w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------- the rest of the machine


def other_load(roles: dict[int, str], dbname: str, seconds: float = 2.0) -> float:
    """Cores used by processes that are not ours during `seconds`."""
    s0 = procs.snapshot()
    time.sleep(seconds)
    s1 = procs.snapshot()
    return procs.cpu_by_group(s0, s1, roles, dbname)["other"] / (s1.at - s0.at)


def wait_for_quiet(roles: dict[int, str], dbname: str, quiet: float, timeout: float) -> float:
    """Wait (bounded) until the rest of the machine uses less than `quiet` cores; return what it used.

    This machine is shared (other sessions run tests on it): two cores are easily half taken
    by someone else, which would halve any number measured here.
    """
    if quiet <= 0:
        return 0.0
    deadline = time.monotonic() + timeout
    said = False
    while True:
        other = other_load(roles, dbname)
        if other <= quiet:
            return other
        if time.monotonic() > deadline:
            log(f"  the machine is still busy ({other:.2f} cores used by other processes): measuring anyway")
            return other
        if not said:
            log(f"  waiting for a quiet machine: other processes use {other:.2f} cores (> {quiet})")
            said = True


# ---------------------------------------------------------------- one measured load phase


@dataclass
class LoadRun:
    result: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # cores (CPU-seconds per second) by group
    top: list[tuple[int, float]] = field(default_factory=list)  # (pid, cores) of the watched pids
    wall: tuple[float, float] = (0.0, 0.0)  # time.time() at T0 and T1
    extra: Any = None


def run_load(name: str, spec: dict[str, Any], roles: dict[int, str], dbname: str, log_dir: Path,
             children: list[procs.Child], watch: list[int] | None = None,
             on_t0: Callable[[], Any] | None = None) -> LoadRun:
    """Run bench/loadgen.py with `spec`; sample CPU counters at its window's edges (T0/T1).

    `roles` maps pids to the group their CPU is counted in; the client is added as "client".
    `on_t0` runs when the window opens (e.g. to attach a profiler); its value is kept.
    """
    child = procs.Child(name, [PY, str(BENCH / "loadgen.py"), json.dumps(spec)], None, log_dir)
    children.append(child)
    roles = dict(roles)
    roles[child.pid] = "client"
    timeout = spec["warmup"] + spec["duration"] + spec["call_timeout"] + 120
    deadline = time.monotonic() + timeout
    snap0 = snap1 = None
    run = LoadRun()
    w0 = w1 = 0.0
    try:
        while True:
            line = child.readline(max(1.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.wait()} without a result:\n"
                                   f"{child.stderr_tail()}")
            if line == "T0":
                snap0 = procs.snapshot()
                w0 = time.time()
                if on_t0 is not None:
                    run.extra = on_t0()
            elif line == "T1":
                snap1 = procs.snapshot()
                w1 = time.time()
            elif line.startswith("RESULT "):
                run.result = json.loads(line[7:])
                break
        child.proc.wait(30)
    finally:
        child.stop(10)
        children.remove(child)
    assert snap0 is not None and snap1 is not None
    seconds = snap1.at - snap0.at
    run.cpu = {k: v / seconds for k, v in procs.cpu_by_group(snap0, snap1, roles, dbname).items()}
    run.cpu["client_self"] = run.result["client_cpu_s"] / spec["duration"]
    run.top = [(pid, used / seconds) for pid, used in procs.top_pids(snap0, snap1, watch or [])]
    run.wall = (w0, w1)
    return run


# ---------------------------------------------------------------- py-spy


def pyspy_path() -> str | None:
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    return pyspy if Path(pyspy).exists() else None


def pyspy_start(pids: dict[int, str], out_dir: Path, seconds: int) -> list[tuple[int, Path, subprocess.Popen[bytes]]]:
    """py-spy record on each pid (label: its role); --nonblocking never pauses the process
    (--native, which must pause it, cut the service's throughput 7x here)."""
    pyspy = pyspy_path()
    assert pyspy is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = []
    for pid, label in pids.items():
        path = out_dir / f"{label}-{pid}.txt"
        cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100",
               "--format", "raw", "--nonblocking", "--output", str(path)]
        spies.append((pid, path, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                  start_new_session=True)))
    return spies


def pyspy_wait(spies: list[tuple[int, Path, subprocess.Popen[bytes]]], seconds: int) -> dict[int, str]:
    """Wait for the profilers; returns py-spy's error text of each pid that has no output."""
    errors = {}
    for pid, path, spy in spies:
        try:
            _, err = spy.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            err = b"timed out"
        if not path.exists():
            errors[pid] = err.decode(errors="replace")[-300:]
    return errors


# ---------------------------------------------------------------- in-process CPU benches


async def paired_rounds(rounds: int, units: int, unit: str, labels: tuple[str, str],
                        baseline: Callable[[int], Awaitable[float]],
                        measured: Callable[[int], Awaitable[float]]) -> tuple[float, float]:
    """Run round r of the baseline, then of the measured code, for r in range(rounds); each
    returns the CPU seconds it took for `units` units. Prints every round on stderr; returns
    the best µs per unit of each (interference only slows a round down)."""
    rows = []
    for r in range(rounds):
        base = await baseline(r) / units * 1e6
        done = await measured(r) / units * 1e6
        rows.append((base, done))
        print(f"round {r + 1}: {labels[0]} {base:6.1f} µs/{unit}   {labels[1]} {done:6.1f} µs/{unit}", file=sys.stderr)
    return min(b for b, _ in rows), min(d for _, d in rows)


async def cprofile_top(work: Callable[[], Awaitable[object]], top: int) -> str:
    """`work` run once under cProfile: its `top` functions by own time."""
    profile = cProfile.Profile()
    profile.enable()
    await work()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()
