"""The cluster registrar: lives on the leader node, owns the map shard id -> shard address.

Nodes are Thespian actor systems in one convention; each has the capability
`inventory-node: NAME`. The registrar learns about nodes from convention updates
(`notifyOnSystemRegistrationChanges`) and places shards on them with
`createActor(StockShard, targetActorRequirements={"inventory-node": NAME})`.

- Every shard is configured with `ShardConfigure`; a shard that cannot take its Postgres
  advisory lock yet (its previous incarnation still holds it) answers not ready, and the
  registrar retries every `RETRY` seconds. Only ready shards appear in the map.
- Health: every `TICK` the registrar asks each shard for its status; a shard silent for
  `DEAD_AFTER` seconds (or whose node left the convention) is recreated on a live node.
- A node joining: whole shards move to it until the nodes are balanced (the old shard is
  stopped with ActorExitRequest, which closes its connection and so releases its lock).

The shard count is fixed; the number of nodes is not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import (
    ActorExitRequest,
    ActorTypeDispatcher,
    ChildActorExited,
    PoisonMessage,
    WakeupMessage,
)

from actors.envelopes import ClusterStart, ShardConfigure, ShardMap, ShardMapRequest, ShardStatus

log = logging.getLogger("inventory.registrar")

TICK = 0.5
DEAD_AFTER = 3.0
CONFIGURE_DEAD_AFTER = 20.0
RETRY = 0.5


@dataclass
class Slot:
    shard_id: int
    node: str
    address: Any
    ready: bool = False
    placed_at: float = 0.0
    last_ok: float = 0.0
    retry_at: float = 0.0
    data_address: str = ""  # its batch path, from its ShardStatus


class ClusterRegistrar(ActorTypeDispatcher):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cfg: ClusterStart | None = None
        self.nodes: list[str] = []
        self.slots: list[Slot | None] = []
        self.ticking = False
        self.stopping = False  # told to exit (the system shuts down): its shards go with it

    # ------------------------------------------------------------ start and map

    def receiveMsg_ClusterStart(self, msg: ClusterStart, sender: Any) -> None:
        if self.cfg is not None:
            self.send(sender, self._map())
            return
        self.cfg = msg
        if msg.node not in self.nodes:
            self.nodes.insert(0, msg.node)
        self.slots = [None] * msg.shard_count
        self.notifyOnSystemRegistrationChanges(True)
        for shard_id in range(msg.shard_count):
            self._place(shard_id, self._least_loaded())
        self._tick_later()
        self.send(sender, self._map())

    def receiveMsg_ShardMapRequest(self, msg: ShardMapRequest, sender: Any) -> None:
        self.send(sender, self._map())

    def receiveMsg_str(self, msg: str, sender: Any) -> None:
        if msg == "placement":  # tests and operators: shard id -> (node, ready)
            self.send(sender, [(s.node, s.ready) if s else None for s in self.slots])
        elif msg == "nodes":
            self.send(sender, list(self.nodes))

    def _map(self) -> ShardMap:
        if self.cfg is None:
            return ShardMap(0, ())
        ready = [s if s and s.ready else None for s in self.slots]
        return ShardMap(self.cfg.shard_count, tuple(s.address if s else None for s in ready),
                        tuple(s.data_address if s else "" for s in ready))

    # ------------------------------------------------------------ nodes

    def receiveMsg_ActorSystemConventionUpdate(self, msg: Any, sender: Any) -> None:
        name = (msg.remoteCapabilities or {}).get("inventory-node")
        if not name or self.cfg is None:
            return
        if msg.remoteAdded:
            if name not in self.nodes:
                log.warning("node %s joined", name)
                self.nodes.append(name)
                self._rebalance()
        else:
            if name in self.nodes and name != self.cfg.node:
                log.warning("node %s left: recreating its shards", name)
                self.nodes.remove(name)
                for slot in list(self.slots):
                    if slot is not None and slot.node == name:
                        self._replace(slot.shard_id, "its node left")

    def _counts(self) -> dict[str, int]:
        counts = {n: 0 for n in self.nodes}
        for s in self.slots:
            if s is not None and s.node in counts:
                counts[s.node] += 1
        return counts

    def _least_loaded(self, exclude: str | None = None) -> str:
        counts = self._counts()
        candidates = [n for n in self.nodes if n != exclude] or list(self.nodes)
        return min(candidates, key=lambda n: (counts[n], self.nodes.index(n)))

    def _rebalance(self) -> None:
        """Move whole shards from the most to the least loaded node until they differ by at most one."""
        assert self.cfg is not None
        while True:
            counts = self._counts()
            most = max(self.nodes, key=lambda n: counts[n])
            least = min(self.nodes, key=lambda n: counts[n])
            if counts[most] - counts[least] <= 1:
                return
            victim = max(s.shard_id for s in self.slots if s is not None and s.node == most)
            log.warning("moving shard %d from %s to %s", victim, most, least)
            self._replace(victim, "rebalancing", target=least)

    # ------------------------------------------------------------ shards

    def _place(self, shard_id: int, node: str) -> None:
        assert self.cfg is not None
        from actors.shard import StockShard

        address = self.createActor(StockShard, targetActorRequirements={"inventory-node": node})
        now = time.monotonic()
        self.slots[shard_id] = Slot(shard_id, node, address, placed_at=now, last_ok=now)
        self._configure(self.slots[shard_id])

    def _configure(self, slot: Slot) -> None:
        assert self.cfg is not None
        slot.retry_at = 0.0
        self.send(slot.address, ShardConfigure(slot.shard_id, self.cfg.shard_count, self.cfg.dsn,
                                               self.cfg.passivate_after, merge_window=self.cfg.merge_window))

    def _replace(self, shard_id: int, why: str, target: str | None = None) -> None:
        old = self.slots[shard_id]
        if old is not None:
            self.slots[shard_id] = None
            self.send(old.address, ActorExitRequest())
        node = target or self._least_loaded()
        log.warning("shard %d goes to node %s (%s)", shard_id, node, why)
        self._place(shard_id, node)

    def _slot_of(self, address: Any) -> Slot | None:
        for s in self.slots:
            if s is not None and s.address == address:
                return s
        return None

    def receiveMsg_ShardStatus(self, msg: ShardStatus, sender: Any) -> None:
        slot = self._slot_of(sender)
        if slot is None:
            return
        now = time.monotonic()
        slot.last_ok = now
        slot.data_address = msg.data_address
        if msg.ready:
            if not slot.ready:
                log.info("shard %d ready on node %s", slot.shard_id, slot.node)
            slot.ready = True
        elif slot.ready:
            slot.ready = False  # lost its lock or its database: reconfigure
            slot.retry_at = now + RETRY
        elif not slot.retry_at:
            slot.retry_at = now + RETRY  # e.g. the previous incarnation still holds the lock

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender: Any) -> None:
        slot = self._slot_of(msg.childAddress)
        if slot is not None and self.cfg is not None and not self.stopping:
            self._replace(slot.shard_id, "its process exited")

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        """The system shuts down (or this registrar is stopped): the shards exit with it, and none
        may be placed again meanwhile (that logged "shard N goes to node ... (its process exited)"
        at every orderly stop, and started a shard to stop it at once)."""
        self.stopping = True

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender: Any) -> None:
        log.info("poison from %s: %s", sender, type(msg.poisonMessage).__name__)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        self.ticking = False
        if self.cfg is None or self.stopping:
            return
        now = time.monotonic()
        from actors.envelopes import ShardStatusRequest

        for slot in list(self.slots):
            if slot is None:
                continue
            silent = now - slot.last_ok
            if silent > (DEAD_AFTER if slot.ready else CONFIGURE_DEAD_AFTER):
                self._replace(slot.shard_id, f"no answer for {silent:.1f} s")
                continue
            if slot.retry_at and now >= slot.retry_at:
                self._configure(slot)
            elif slot.ready:
                self.send(slot.address, ShardStatusRequest())
        self._tick_later()

    def _tick_later(self) -> None:
        if not self.ticking:
            self.ticking = True
            self.wakeupAfter(timedelta(seconds=TICK))
