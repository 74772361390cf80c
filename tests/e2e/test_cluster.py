"""Scale-out end to end: several actor systems (nodes) in one Thespian convention on this machine.

Each test starts its own nodes (`inventory actors --node NAME --admin-port P --leader ...`)
and one gateway on the leader, on its own database `inv_cluster`. Every process it starts
carries INVENTORY_CLUSTER_MARKER=<run>:<node> in its environment from exec on (Thespian's
forked actor processes inherit it), which is how a node is killed with `kill -9` and how
the test checks that nothing outlives it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from conftest import (
    TEST_DATABASE_URL,
    Shop,
    clients_for,
    database_url_named,
    drop_database,
    ensure_database,
    free_port,
)

from actors.keys import reservation_id
from persistence.migrate import migrate

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
SHARDS = 6
CLUSTER_DB = database_url_named(TEST_DATABASE_URL, "inv_cluster")
MARKER = "INVENTORY_CLUSTER_MARKER"


def marked_pids(prefix: str) -> dict[int, str]:
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(f"{MARKER}={prefix}".encode()):
                found[int(proc.name)] = item.split(b"=", 1)[1].decode()
    return found


ASK = r"""
import sys, pickle
from thespian.actors import ActorSystem
from actors.system import registrar_address
asys = ActorSystem("multiprocTCPBase", capabilities={"Admin Port": int(sys.argv[1])})
reg = registrar_address(asys)
what = sys.argv[2]
if what == "second-copy":
    from actors.shard import StockShard
    from actors.envelopes import ShardConfigure, ShardBatch
    from actors.messages import encode_batch, decode_replies
    shard = asys.createActor(StockShard)
    st = asys.ask(shard, ShardConfigure(0, int(sys.argv[3]), sys.argv[4]), 20)
    res = asys.ask(shard, ShardBatch(1, encode_batch([])), 20)
    asys.tell(shard, __import__("thespian.actors").actors.ActorExitRequest())
    print(repr((st.ready, st.error)))
elif what == "merged-batches":
    from actors.envelopes import ShardStatusRequest
    from actors.system import fetch_shard_map
    print(repr(sum(asys.ask(a, ShardStatusRequest(), 10).merged_batches for a in fetch_shard_map(asys).addresses)))
else:
    print(repr(asys.ask(reg, what, 10)))
"""


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.tmp = tmp
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.leader = ""
        self.grpc_port = 0
        self.gateways: dict[str, int] = {}

    def env(self, name: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INVENTORY_", "CATALOG_"))}
        env.update(INVENTORY_DATABASE_URL=CLUSTER_DB, INVENTORY_SHARDS=str(SHARDS), INVENTORY_LOG_LEVEL="WARNING",
                   INVENTORY_HTTP_PORT="0", PYTHONPATH=str(ROOT), **{MARKER: f"{self.run}:{name}"}, **extra)
        return env

    def start_node(self, name: str) -> None:
        taken = set(self.ports.values())
        port = self.ports.get(name) or free_port(range(20200, 20300), taken)  # (a restart: the same port)
        self.ports[name] = port
        (self.tmp / f"{name}.ready").unlink(missing_ok=True)
        if not self.leader:
            self.leader = name
        leader_port = self.ports[self.leader]
        self.procs[name] = subprocess.Popen(
            [PYTHON, "-m", "gateway.cli", "actors", "--node", name, "--admin-port", str(port),
             "--leader", f"127.0.0.1:{leader_port}", "--ready-file", str(self.tmp / f"{name}.ready")],
            env=self.env(name), cwd=ROOT, stdout=open(self.tmp / f"{name}.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115 - the child owns it

    async def wait_ready(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (self.tmp / f"{name}.ready").exists():
            assert self.procs[name].poll() is None, (self.tmp / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"node {name} not ready in {timeout} s"
            await asyncio.sleep(0.1)

    def start_gateway(self, reply_timeout: float = 5.0, name: str = "gw") -> str:
        self.grpc_port = free_port(range(50500, 50600), set(self.gateways.values()))
        self.gateways[name] = self.grpc_port
        self.procs[name] = subprocess.Popen(
            [PYTHON, "-m", "gateway.cli", "gateway"],
            env=self.env(name, INVENTORY_ACTOR_PORT=str(self.ports[self.leader]),
                         INVENTORY_GRPC_PORT=str(self.grpc_port),
                         INVENTORY_SHARD_REPLY_TIMEOUT_SECONDS=str(reply_timeout),
                         INVENTORY_RELAY_IN_GATEWAY="false"),
            cwd=ROOT, stdout=open(self.tmp / f"{name}.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115 - the child owns it
        return self.target

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    async def ask(self, what: str, *args: str) -> Any:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-c", ASK, str(self.ports[self.leader]), what, *args, cwd=ROOT,
            env=self.env("probe"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
        return eval(out.decode().strip().splitlines()[-1])

    async def placement(self) -> list[tuple[str, bool] | None]:
        return await self.ask("placement")

    async def wait_placed(self, nodes: set[str], timeout: float = 40) -> list[tuple[str, bool]]:
        deadline = time.monotonic() + timeout
        while True:
            placed = await self.placement()
            if all(p is not None and p[1] for p in placed) and {p[0] for p in placed} == nodes:
                return placed  # type: ignore[return-value]
            assert time.monotonic() < deadline, f"placement {placed}, wanted every shard ready on {nodes}"
            await asyncio.sleep(0.3)

    def pids_of(self, name: str) -> list[int]:
        """The live processes of a node: its own and every actor's (they inherit its marker)."""
        return [p for p, m in marked_pids(self.run).items() if m == f"{self.run}:{name}"]

    def kill_node(self, name: str) -> list[int]:
        pids = self.pids_of(name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    async def stop(self) -> None:
        for name in [*self.gateways, *reversed(list(self.ports))]:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
                except TimeoutError:
                    proc.kill()
        deadline = time.monotonic() + 10
        while marked_pids(self.run) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        left = marked_pids(self.run)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"processes outlived the cluster: {left}"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    await drop_database(CLUSTER_DB)
    await ensure_database(CLUSTER_DB)
    await migrate(CLUSTER_DB)
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.stop()
        assert not marked_pids(c.run)


async def serving(c: Cluster, timeout: float = 60, name: str = "gw") -> tuple[grpc.aio.Channel, Any]:
    deadline = time.monotonic() + timeout
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{c.gateways[name]}")
    while True:
        assert c.procs[name].poll() is None, (c.tmp / f"{name}.log").read_text()[-3000:]
        try:
            await asyncio.wait_for(channel.channel_ready(), 1)
            return channel, clients_for(channel)
        except TimeoutError:
            assert time.monotonic() < deadline, "gateway not serving"


def variants_for_every_shard(org: str, per_shard: int = 2) -> list[str]:
    from actors.keys import shard_of

    found: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    i = 0
    while any(len(v) < per_shard for v in found.values()):
        v = f"sku-{i}"
        s = shard_of(org, v, SHARDS)
        if len(found[s]) < per_shard:
            found[s].append(v)
        i += 1
    return [v for vs in found.values() for v in vs]


async def check_consistency(org: str) -> dict[str, int]:
    conn = await asyncpg.connect(CLUSTER_DB, timeout=10)
    try:
        bad = await conn.fetch("SELECT variant_id, on_hand, reserved FROM stocks WHERE organization_id = $1"
                               " AND (reserved > on_hand OR reserved < 0)", org)
        assert not bad, f"oversold: {bad}"
        mismatched = await conn.fetch(
            """SELECT s.variant_id, s.warehouse_id, s.reserved, coalesce(sum(l.quantity), 0) AS open
               FROM stocks s LEFT JOIN reservation_lines l
                 ON l.organization_id = s.organization_id AND l.variant_id = s.variant_id
                AND l.warehouse_id = s.warehouse_id AND l.status IN ('active', 'confirmed')
               WHERE s.organization_id = $1
               GROUP BY s.variant_id, s.warehouse_id, s.reserved
               HAVING s.reserved <> coalesce(sum(l.quantity), 0)""", org)
        assert not mismatched, f"reserved != open lines: {mismatched}"
        rows = await conn.fetch("SELECT status, count(*) AS n FROM reservation_lines WHERE organization_id = $1"
                                " GROUP BY status", org)
        return {r["status"]: r["n"] for r in rows}
    finally:
        await conn.close()


async def line_status(org: str, order_ids: list[str]) -> dict[str, str]:
    conn = await asyncpg.connect(CLUSTER_DB, timeout=10)
    try:
        rows = await conn.fetch("SELECT order_id, status FROM reservation_lines WHERE organization_id = $1"
                                " AND order_id = ANY($2::text[])", org, order_ids)
        return {r["order_id"]: r["status"] for r in rows}
    finally:
        await conn.close()


@pytest.mark.timeout(150)
async def test_three_nodes_serve_reservations_on_every_shard(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.start_node(name)
        await cluster.wait_ready(name)
    placed = await cluster.wait_placed({"a", "b", "c"})
    assert len(placed) == SHARDS
    cluster.start_gateway()
    channel, clients = await serving(cluster)
    async with channel:
        org = str(uuid.uuid4())
        shop = Shop(org, clients.inventory, clients.admin)
        variants = variants_for_every_shard(org)
        for v in variants:
            await shop.receive(v, "north", 10)
        replies = await asyncio.gather(*(shop.reserve(f"order-{v}", (v, 3)) for v in variants))
        assert all(r.reservation_id for r in replies)
        for v in variants:
            assert (await shop.level(v, "north")).reserved == 3
    assert (await check_consistency(org)) == {"active": len(variants)}


@pytest.mark.timeout(150)
async def test_a_second_copy_of_a_shard_cannot_commit(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.start_node(name)
        await cluster.wait_ready(name)
    await cluster.wait_placed({"a", "b"})
    ready, error = await cluster.ask("second-copy", str(SHARDS), CLUSTER_DB)
    assert not ready and "lock" in error.lower(), error


@pytest.mark.timeout(200)
async def test_kill_9_of_a_node_under_load(cluster: Cluster) -> None:
    for name in ("a", "b", "c"):
        cluster.start_node(name)
        await cluster.wait_ready(name)
    await cluster.wait_placed({"a", "b", "c"})
    cluster.start_gateway(reply_timeout=5.0)
    channel, clients = await serving(cluster)
    org = str(uuid.uuid4())
    ok: list[tuple[str, str]] = []  # (order id, variant)
    failures: list[tuple[float, str]] = []
    successes: list[float] = []
    async with channel:
        shop = Shop(org, clients.inventory, clients.admin)
        variants = variants_for_every_shard(org, per_shard=3)
        for v in variants:
            await shop.receive(v, "north", 1000)
        # Reservations due to expire while a node is down.
        expiring = [f"exp-{v}" for v in variants]
        for v in variants:
            await shop.reserve(f"exp-{v}", (v, 1), ttl_seconds=6)
        stop = asyncio.Event()
        counter = iter(range(10**9))

        async def worker(w: int) -> None:
            while not stop.is_set():
                n = next(counter)
                v = variants[n % len(variants)]
                order = f"load-{n}"
                try:
                    await shop.reserve(order, (v, 1), timeout=15)
                    ok.append((order, v))
                    successes.append(time.monotonic())
                except grpc.aio.AioRpcError as e:
                    assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
                    failures.append((time.monotonic(), e.code().name))
                    await asyncio.sleep(0.05)

        workers = [asyncio.create_task(worker(w)) for w in range(16)]
        await asyncio.sleep(2)
        killed_at = time.monotonic()
        victim = "b"
        assert cluster.kill_node(victim)
        await asyncio.sleep(12)
        stop.set()
        await asyncio.gather(*workers)
        after = [t for t in successes if t > killed_at]
        print(f"kill -9 of node {victim}: {len(ok)} OK, {len(failures)} UNAVAILABLE/deadline,"
              f" last failure {max((t for t, _ in failures), default=killed_at) - killed_at:.1f} s after the kill")
        # The load resumes: every shard answers again within 10 s of the kill.
        placed = await cluster.wait_placed({"a", "c"}, timeout=10)
        assert victim not in {p[0] for p in placed}
        last_failure = max((t for t, _ in failures), default=killed_at)
        assert last_failure - killed_at < 10, f"failures until {last_failure - killed_at:.1f} s after the kill"
        assert after and after[-1] > killed_at + 10
        # Nothing acknowledged is lost; nothing is oversold.
        statuses = await line_status(org, [o for o, _ in ok])
        missing = [o for o, _ in ok if o not in statuses]
        assert not missing, f"{len(missing)} OK reservations not in Postgres, e.g. {missing[:5]}"
        await check_consistency(org)
        # The short reservations expired although some of their shards died meanwhile.
        deadline = time.monotonic() + 15
        while True:
            st = await line_status(org, expiring)
            if set(st.values()) == {"expired"} and len(st) == len(expiring):
                break
            assert time.monotonic() < deadline, f"not expired: {[o for o, s in st.items() if s != 'expired']}"
            await asyncio.sleep(0.3)
        await check_consistency(org)


@pytest.mark.timeout(200)
async def test_a_node_joining_takes_over_shards(cluster: Cluster) -> None:
    cluster.start_node("a")
    await cluster.wait_ready("a")
    await cluster.wait_placed({"a"})
    cluster.start_gateway(reply_timeout=5.0)
    channel, clients = await serving(cluster)
    org = str(uuid.uuid4())
    async with channel:
        shop = Shop(org, clients.inventory, clients.admin)
        variants = variants_for_every_shard(org)
        for v in variants:
            await shop.receive(v, "north", 100)
        ok: list[str] = []

        async def reserve_all(tag: str) -> None:
            for v in variants:
                for attempt in range(40):
                    try:
                        await shop.reserve(f"{tag}-{v}", (v, 2), timeout=10)
                        ok.append(f"{tag}-{v}")
                        break
                    except grpc.aio.AioRpcError as e:
                        assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
                        await asyncio.sleep(0.25)
                else:
                    raise AssertionError(f"{tag}-{v} never succeeded")

        await reserve_all("before")
        cluster.start_node("b")
        await cluster.wait_ready("b")
        during = asyncio.create_task(reserve_all("during"))
        placed = await cluster.wait_placed({"a", "b"})
        assert sum(1 for p in placed if p[0] == "b") == SHARDS // 2
        await during
        await reserve_all("after")
        # Retries of the same order are idempotent: exactly one line per order, each counted once.
        for v in variants:
            assert (await shop.level(v, "north")).reserved == 6
    statuses = await line_status(org, ok)
    assert len(statuses) == len(ok) == 3 * len(variants)
    assert await check_consistency(org) == {"active": 3 * len(variants)}


@pytest.mark.timeout(150)
async def test_several_gateways_serve_the_same_cluster(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.start_node(name)
        await cluster.wait_ready(name)
    await cluster.wait_placed({"a", "b"})
    cluster.start_gateway(name="gw")
    cluster.start_gateway(name="gw2")
    channel1, clients1 = await serving(cluster, name="gw")
    channel2, clients2 = await serving(cluster, name="gw2")
    org = str(uuid.uuid4())
    async with channel1, channel2:
        one = Shop(org, clients1.inventory, clients1.admin)
        two = Shop(org, clients2.inventory, clients2.admin)
        variants = variants_for_every_shard(org, per_shard=1)
        for v in variants:
            await one.receive(v, "north", 5)
        for i, v in enumerate(variants):
            shop = one if i % 2 else two
            await shop.reserve(f"order-{v}", (v, 2))
        for v in variants:
            assert (await one.level(v, "north")).reserved == 2
            assert (await two.level(v, "north")).reserved == 2
        # The same order through the other gateway is the same reservation (idempotent).
        again = await one.reserve(f"order-{variants[0]}", (variants[0], 2))
        assert again.reservation_id
        assert (await two.level(variants[0], "north")).reserved == 2

        # Both gateways at once on one stock: its shard sees two gateways sending work and merges
        # their batches into shared commits. Every caller must get the answer to its own order,
        # and no unit may be reserved twice (48 available, 2 x 40 orders of 1).
        hot = variants[1]
        await one.receive(hot, "north", 45)

        async def order(shop: Shop, order_id: str) -> tuple[str, bool, str]:
            try:
                reply = await shop.reserve(order_id, (hot, 1))
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
                return order_id, False, ""
            return order_id, reply.success, reply.reservation_id

        won = []
        for round_ in range(2):  # 40 orders each: the second finds 48 - 40 = 8 units left
            results = await asyncio.gather(*(order(one if n % 2 else two, f"burst-{round_}-{n}") for n in range(40)))
            won.append([r for r in results if r[1]])
        assert [len(w) for w in won] == [40, 8]
        assert all(rid == reservation_id(org, oid) for oid, _, rid in won[0] + won[1])  # each caller's own
        level = await two.level(hot, "north")
        assert (level.on_hand, level.reserved) == (50, 50)
        assert await cluster.ask("merged-batches") > 0  # the shared commits happened
    assert await check_consistency(org) == {"active": len(variants) + 48}


@pytest.mark.timeout(240)
async def test_a_leader_killed_and_started_again_serves_every_shard_again(cluster: Cluster) -> None:
    """The new registrar places every shard anew while the old incarnations on the member, never
    told, keep their locks: the new ones take over (after TAKE_OVER_AFTER) and every shard serves.
    (Before: the new ones never started, the leader gave up after 120 s, and no shard served.)"""
    for name in ("a", "b"):
        cluster.start_node(name)
        await cluster.wait_ready(name)
    before = await cluster.wait_placed({"a", "b"})
    cluster.start_gateway()
    channel, clients = await serving(cluster)
    async with channel:
        org = str(uuid.uuid4())
        shop = Shop(org, clients.inventory, clients.admin)
        variants = variants_for_every_shard(org, 1)
        for v in variants:
            await shop.receive(v, "north", 10)
        on_b = sum(1 for node, _ in before if node == "b")
        assert on_b, before
        processes_of_b = len(cluster.pids_of("b")) - on_b  # the node without its shards
        assert cluster.kill_node("a")
        cluster.start_node("a")
        await cluster.wait_ready("a", timeout=120)
        deadline = time.monotonic() + 30
        pending = set(variants)
        while pending:
            for v in sorted(pending):
                try:
                    await shop.reserve(f"order-{v}", (v, 1), timeout=5)
                    pending.discard(v)
                except grpc.aio.AioRpcError as e:
                    assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
            assert time.monotonic() < deadline, f"shards of {sorted(pending)} do not serve again"
            await asyncio.sleep(0.5)
    assert (await check_consistency(org)) == {"active": len(variants)}
    # The old incarnations on b, superseded, stop (their periodic check finds their session
    # ended): b keeps only the shards the new registrar placed there. (Before: they stayed.)
    after = await cluster.wait_placed({"a", "b"})
    wanted = processes_of_b + sum(1 for node, _ in after if node == "b")
    deadline = time.monotonic() + 30
    while len(cluster.pids_of("b")) != wanted:
        assert time.monotonic() < deadline, (len(cluster.pids_of("b")), wanted, after)
        await asyncio.sleep(0.5)
    assert "a newer copy has started; this one stops" in (cluster.tmp / "b.log").read_text()
