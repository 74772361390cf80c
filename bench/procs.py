"""Child processes of the benchmark, and CPU accounting from /proc.

Every process the bench starts is registered here and stopped on the way out (also on
Ctrl-C, SIGTERM and errors). The service's Thespian actor processes daemonize (setsid +
fork), so they are found by the INVENTORY_ACTOR_PORT in their environment, not by
process group.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- ports


def free_port(low: int, high: int, avoid: Iterable[int] = ()) -> int:
    """A port in [low, high] that nobody listens on, on 127.0.0.1 and 0.0.0.0."""
    avoid = set(avoid)
    for port in range(low, high + 1):
        if port in avoid:
            continue
        ok = True
        for host in ("0.0.0.0", "127.0.0.1"):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


# ---------------------------------------------------------------- child processes


class Child:
    """A started process whose stdout lines are readable with a timeout; stderr goes to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.stderr.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A new session: a Ctrl-C on the terminal reaches only the bench, which stops the children in order.
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, start_new_session=True, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def readline(self, timeout: float) -> str | None:
        """The next stdout line; None at EOF; raises TimeoutError."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no output in {timeout:.0f} s") from None

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name} did not print {prefix!r} in {timeout:.0f} s; see {self.log_path}")
            try:
                line = self.readline(min(left, 1.0))
            except TimeoutError:
                continue
            if line is None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.wait()} before {prefix!r};"
                                   f" its stderr:\n{self.stderr_tail()}")
            if line.startswith(prefix):
                return line

    def stderr_tail(self, n: int = 30) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group. Returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def pids_with_env(var: str, value: str) -> list[int]:
    """Processes whose environment has var=value (the service's actor processes inherit it)."""
    needle = f"{var}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ---------------------------------------------------------------- CPU accounting


@dataclass
class CpuSnapshot:
    at: float
    machine_busy: float  # seconds of CPU, all cores, since boot
    machine_total: float
    per_pid: dict[int, float] = field(default_factory=dict)  # utime + stime, seconds
    names: dict[int, str] = field(default_factory=dict)
    cmdlines: dict[int, str] = field(default_factory=dict)  # of postgres processes (their title names the db)


def snapshot() -> CpuSnapshot:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    idle = fields[3] + fields[4]
    snap = CpuSnapshot(time.monotonic(), (total - idle) / CLK_TCK, total / CLK_TCK)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, seconds = _stat_cpu(stat)
        pid = int(entry)
        snap.per_pid[pid] = seconds
        snap.names[pid] = name
        if name == "postgres":
            snap.cmdlines[pid] = cmdline(pid)
    return snap


def _stat_cpu(stat: str) -> tuple[str, float]:
    """(command name, CPU seconds: utime + stime) from the text of a /proc/<pid>/stat."""
    name, rest = stat.split(" (", 1)[1].rsplit(") ", 1)
    parts = rest.split()
    return name, (int(parts[11]) + int(parts[12])) / CLK_TCK


def pid_cpu(pid: int) -> float:
    """CPU seconds (user + system) one process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        return _stat_cpu(f.read())[1]


def cpu_by_group(a: CpuSnapshot, b: CpuSnapshot, roles: dict[int, str], dbname: str) -> dict[str, float]:
    """CPU-seconds spent between a and b, by group; "other" is everything else on the machine."""
    groups: dict[str, float] = {}
    ours = 0.0
    for pid, t1 in b.per_pid.items():
        used = t1 - a.per_pid.get(pid, 0.0)
        if used <= 0:
            continue
        role = roles.get(pid)
        if role is None:
            cl = b.cmdlines.get(pid) or a.cmdlines.get(pid, "")
            if cl.startswith("postgres:"):
                if f" {dbname} " in cl:
                    role = "postgres"
                elif "127.0.0.1(" in cl or "[local]" in cl:
                    role = None  # another database's session: someone else's work
                else:
                    role = "postgres"  # walwriter, checkpointer, autovacuum...: shared, counted as ours
        if role is None:
            continue
        groups[role] = groups.get(role, 0.0) + used
        ours += used
    groups["other"] = max(0.0, (b.machine_busy - a.machine_busy) - ours)
    groups["machine_idle"] = max(0.0, (b.machine_total - a.machine_total) - (b.machine_busy - a.machine_busy))
    return groups


def top_pids(a: CpuSnapshot, b: CpuSnapshot, pids: Iterable[int]) -> list[tuple[int, float]]:
    used = [(pid, b.per_pid.get(pid, 0.0) - a.per_pid.get(pid, 0.0)) for pid in pids]
    return sorted(used, key=lambda x: -x[1])
