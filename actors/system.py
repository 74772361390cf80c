"""Starting, joining and stopping the Thespian actor system that hosts the shards.

The `actors` process starts a `multiprocTCPBase` system on the admin port as one node of
a Thespian convention (a single node is a cluster of one). On the leader, the cluster
registrar (actors/registrar.py) creates, configures and supervises the N shards. Gateways
join the leader's admin port and ask the registrar for the shard map; they never create shards.

Thespian's multiproc admin daemonizes: its processes are not in the launcher's process
group, so the launcher must call `shutdown()` on every exit path.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from thespian.actors import ActorSystem, ActorTypeDispatcher

from actors.envelopes import ClusterStart, ShardMap, ShardMapRequest
from actors.logs import PLAIN_FORMAT
from actors.transport import use_poll_selector

log = logging.getLogger("inventory.actors")

SYSTEM_BASE = "multiprocTCPBase"
REGISTRAR_NAME = "inventory-registrar"


def thespian_logging(level: int = logging.WARNING, json: bool = True) -> dict[str, Any]:
    """A real logging dict for Thespian (logDefs=False crashes every actor process): the actor
    processes' records on stderr, one JSON object per line as the gateway's (or plain text)."""
    formatter = {"()": "actors.logs.JsonFormatter"} if json else {"format": PLAIN_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line", "level": level}},
        "root": {"handlers": ["stderr"], "level": level},
    }


class Registrar(ActorTypeDispatcher):
    """The name under which the cluster registrar is found. A gateway that asks before any
    `inventory actors` started gets this stand-in, which answers an empty map (so it waits)."""

    def receiveMsg_ShardMapRequest(self, msg: ShardMapRequest, sender: Any) -> None:
        self.send(sender, ShardMap(0, ()))


def join(admin_port: int) -> ActorSystem:
    """Join (or, if none runs on that port, start) the actor system."""
    use_poll_selector()
    return ActorSystem(SYSTEM_BASE, capabilities={"Admin Port": admin_port},
                       logDefs=thespian_logging())


def join_existing(admin_port: int, timeout: float = 60.0) -> ActorSystem:
    """Join the actor system on this port once it listens (a gateway's way in). `join` would
    start one if none ran: a gateway started before `inventory actors` then held the leader's
    port, with the stand-in Registrar under the registrar's name, and the node could not start."""
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            with socket.create_connection(("127.0.0.1", admin_port), timeout=1.0):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no actor system on port {admin_port}: is `inventory actors` running?") from None
            if not waited:
                log.info("waiting for the actor system on port %d", admin_port)
                waited = True
            time.sleep(0.2)
    return join(admin_port)


def registrar_address(asys: ActorSystem) -> Any:
    """The registrar of the system this process joined (single-node or the cluster leader's)."""
    return asys.createActor(Registrar, globalName=REGISTRAR_NAME)


def fetch_shard_map(asys: ActorSystem, timeout: float = 60.0) -> ShardMap:
    """Ask the registrar for the shard map, waiting (bounded) until every shard is placed and ready."""
    deadline = time.monotonic() + timeout
    registrar = registrar_address(asys)
    while True:
        answer = asys.ask(registrar, ShardMapRequest(), 5)
        if isinstance(answer, ShardMap) and answer.shard_count > 0 and None not in answer.addresses:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError("no shards registered: is `inventory actors` running?")
        time.sleep(0.2)


# ---------------------------------------------------------------- several nodes

# Thespian reads these at import of thespian.system.admin.convention. Its defaults detect a
# dead member after ~22 minutes. CONVENTION_RESTART_PERIOD matters too: in Thespian 4.0.1 a
# member wakes up to re-register only after that period (its `convention_inattention_delay`
# uses `timer or ExpirationTimer(...)`, and a running timer is falsy), so with the default
# 3:22 a member misses its check-ins and the leader drops it after REREGISTRATION x MISS_MAX.
CONVENTION_ENV = {
    "CONVENTION_REREGISTRATION_PERIOD": "0:02",
    "CONVENTION_REGISTRATION_MISS_MAX": "2",
    "CONVENTION_RESTART_PERIOD": "0:01",
}


def node_capabilities(node: str, admin_port: int, leader: str) -> dict[str, Any]:
    return {"Admin Port": admin_port, "inventory-node": node, "Convention Address.IPv4": leader}


def run_node(node: str, admin_port: int, leader: str, dsn: str, shard_count: int,
             ready_file: str | None = None, passivate_after: float = 600.0, merge_window: float = 0.002,
             log_json: bool = True, log_level: str = "WARNING") -> int:
    """`inventory actors --node NAME --admin-port P --leader HOST:PORT`: one node of a convention.

    The leader (its own admin port is the leader's) runs the cluster registrar, which places
    the shards on every node that joins; a member only hosts what the registrar creates on it.
    """
    for k, v in CONVENTION_ENV.items():
        os.environ.setdefault(k, v)
    if "thespian.system.admin.convention" in __import__("sys").modules:
        log.warning("thespian's convention module was imported before the settings: defaults apply")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    leader_port = int(leader.rsplit(":", 1)[1])
    is_leader = leader_port == admin_port
    use_poll_selector()  # inherited by the actor processes Thespian forks from here
    asys = ActorSystem(SYSTEM_BASE, capabilities=node_capabilities(node, admin_port, leader),
                       logDefs=thespian_logging(logging.getLevelName(log_level.upper()), json=log_json))
    try:
        if is_leader:
            from actors.registrar import ClusterRegistrar

            registrar = asys.createActor(ClusterRegistrar, globalName=REGISTRAR_NAME)
            answer = asys.ask(registrar, ClusterStart(node, dsn, shard_count, passivate_after, merge_window), 30)
            if not isinstance(answer, ShardMap):
                raise RuntimeError("the cluster registrar did not answer")
            fetch_shard_map(asys, timeout=120)
        log.info("node %s on admin port %d (%s)", node, admin_port, "leader" if is_leader else "member")
        if ready_file:
            with open(ready_file + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(ready_file + ".tmp", ready_file)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        log.info("stopping node %s on admin port %d", node, admin_port)
        asys.shutdown()
