"""The few Thespian-level messages (pickled by Thespian) that carry batches and control.

Thespian dispatches `receiveMsg_<ClassName>`, so these class names are unique in the
service. The commands themselves travel inside `payload` as one msgpack blob.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ShardBatch:
    batch_id: int
    payload: bytes  # actors.messages.encode_batch(...)


@dataclass(frozen=True, slots=True)
class ShardBatchResult:
    batch_id: int
    payload: bytes  # actors.messages.encode_replies(...)
    shard_id: int = -1


@dataclass(frozen=True, slots=True)
class ShardConfigure:
    shard_id: int
    shard_count: int
    dsn: str
    passivate_after: float = 600.0
    timer_granularity: float = 0.02
    timer_horizon: float = 300.0  # open lines found in Postgres are armed this far ahead, window by window
    merge_window: float = 0.002  # with 2+ gateways sending work: batches arriving this close share a commit


@dataclass(frozen=True, slots=True)
class ShardStatus:
    shard_id: int
    ready: bool
    error: str = ""
    resident_stocks: int = 0
    pending_timers: int = 0
    batches: int = 0
    commands: int = 0
    commits: int = 0
    commit_seconds: float = 0.0  # summed: rate(commit_seconds) / rate(commits) is the mean commit latency
    merged_batches: int = 0  # gateway batches decided and committed together with another gateway's
    redecided_batches: int = 0  # batches decided twice: one retried a reservation that had closed
    data_address: str = ""  # host:port of the shard's batch path (actors/datapath.py); "" if none


@dataclass(frozen=True, slots=True)
class ShardStatusRequest:
    pass


@dataclass(frozen=True, slots=True)
class ShardMapRequest:
    pass


@dataclass(frozen=True, slots=True)
class ShardMap:
    shard_count: int
    addresses: tuple[object, ...] = field(default_factory=tuple)
    data_addresses: tuple[str, ...] = field(default_factory=tuple)  # per shard; "" where unknown


@dataclass(frozen=True, slots=True)
class ClusterStart:
    """Leader launcher -> cluster registrar: own the shards of this deployment, place them on nodes."""

    node: str
    dsn: str
    shard_count: int
    passivate_after: float = 600.0
    merge_window: float = 0.002
