"""Events over RabbitMQ: the outbox relay against a bare aio-pika publisher, and the lag from a
committed change to its event at a consumer, in one run.

    .venv/bin/python bench/events.py                       # 20,000 events; 1,000 changes/s for 10 s
    .venv/bin/python bench/events.py --only lag --rate 300 --relay gateway process off
    .venv/bin/python bench/events.py --events 50000 --rate 1000 --duration 20 --repeat 3

What runs (all on this machine, started and stopped by this script):

1. Relay throughput. The same N outbox envelopes (an `inventory.stock.updated` of the real
   size) are published to a topic exchange with one durable queue bound (persistent
   messages, so the broker writes them to disk before it confirms), twice each way:
   * baselines: bare publishers on a channel with publisher confirms, publishing windows of
     `--batch` messages and awaiting their confirms together, once with aio-pika's
     Exchange.publish and once on that channel's aiormq channel without waiting for each
     frame's write (what the relay does, without the database);
   * relay: `gateway.relay.OutboxRelay` on its own database (default inv_bench_events,
     made afresh): the rows are committed in one transaction while the relay is already
     running; timed from the commit to the last row marked sent.
   Both count arrivals at the queue, so nothing is reported that the broker did not take.

2. End-to-end lag. `inventory serve` (2 shards) on that database with the relay in its
   gateway, an open-loop client sending `--rate` ReserveStock calls per second over gRPC
   (one unit, a new order each, round-robin over `--stocks` fresh stocks) for `--duration`
   s, and a consumer of `inventory.stock.updated` on the service's exchange. Each event's
   lag is its arrival at the consumer minus its `occurred_at`, which the shard stamps when it
   starts the batch, before the batch commits (so this is the commit-to-arrival lag plus the
   batch's own few ms; same machine, same clock). The gRPC round trip of the calls is printed
   for scale, and the same calls to the service with events off (INVENTORY_AMQP_URL unset)
   are the baseline of the same run; `--relay process` runs the relay as
   `python -m gateway.relay` beside a gateway that runs none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import aio_pika
import aiormq
import asyncpg
import grpc
import procs

from gateway import amqp
from gateway.config import Settings
from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from gateway.relay import OutboxRelay
from persistence import outbox
from persistence.migrate import migrate

AMQP_URL = os.environ.get("INVENTORY_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ADMIN_DSN = os.environ.get("INVENTORY_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
ORG = "bench-events"
BARE_PIKA = "bare publisher: aio-pika Exchange.publish"
BARE_RAW = "bare publisher: its aiormq channel, no write wait"
RELAY = "outbox relay (reads Postgres, marks sent)"
INVENTORY = Path(sys.executable).with_name("inventory")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dsn_for(name: str) -> str:
    return ADMIN_DSN.rpartition("/")[0] + "/" + name


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def fresh_database(name: str) -> str:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = dsn_for(name)
    await migrate(dsn)
    return dsn


def envelopes(n: int) -> list[outbox.OutboxRow]:
    """Realistic rows: what a shard writes for a stock change."""
    now = time.time()
    return [outbox.envelope("inventory.stock.updated", ORG, {
        "stock_id": str(uuid.uuid4()), "variant_id": f"var-{i % 1000}", "warehouse_id": "wh_101",
        "on_hand": 100, "reserved": i % 100, "available": 100 - i % 100, "in_transit": 0, "version": i + 1,
        "status": "active"}, now, sequence=i + 1) for i in range(n)]


class Sink:
    """A durable queue bound to an exchange, consumed and counted."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection, exchange: str) -> None:
        self.connection = connection
        self.exchange = exchange
        self.count = 0
        self.done = asyncio.Event()
        self.expected = 0

    async def start(self) -> None:
        self.channel = await self.connection.channel()
        await self.channel.set_qos(prefetch_count=1000)
        x = await self.channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        self.queue = await self.channel.declare_queue(f"{self.exchange}.sink", durable=True)
        await self.queue.bind(x, "#")
        await self.queue.consume(self._on_message)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        self.count += 1
        if self.count >= self.expected:
            self.done.set()

    def expect(self, n: int) -> None:
        self.count, self.expected = 0, n
        self.done.clear()

    async def close(self) -> None:
        await self.queue.delete(if_unused=False, if_empty=False)
        await self.channel.exchange_delete(self.exchange)
        await self.channel.close()


# ---------------------------------------------------------------- 1. relay throughput


async def bare_publisher(connection: aio_pika.abc.AbstractRobustConnection, exchange: str,
                         rows: list[outbox.OutboxRow], batch: int, raw: bool) -> float:
    """Windows of `batch` publishes, confirms awaited together: with aio-pika's Exchange.publish, or
    (`raw`) on the channel's aiormq channel without waiting for each frame's write, as the relay does."""
    channel = await connection.channel(publisher_confirms=True)
    x = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    under = await channel.get_underlay_channel()
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        if raw:
            await asyncio.gather(*(under.basic_publish(
                row[3].encode(), exchange=exchange, routing_key=row[1], mandatory=False, wait=False,
                properties=aiormq.spec.Basic.Properties(content_type="application/json", delivery_mode=2,
                                                        message_id=row[0], message_type=row[1]))
                for row in rows[i:i + batch]))
        else:
            await asyncio.gather(*(x.publish(aio_pika.Message(
                row[3].encode(), content_type="application/json", message_id=row[0], type=row[1],
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=row[1], mandatory=False)
                for row in rows[i:i + batch]))
    elapsed = time.perf_counter() - started
    await channel.close()
    return elapsed


async def relay_run(dsn: str, prefix: str, rows: list[outbox.OutboxRow], batch: int) -> float:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    await pool.execute("UPDATE outbox SET sent_at = now() WHERE sent_at IS NULL")
    relay = OutboxRelay(Settings(amqp_url=AMQP_URL, amqp_prefix=prefix, database_url=dsn, relay_batch=batch,
                                 relay_poll_seconds=0.005))
    relay.start()
    while not relay.stats.active:
        await asyncio.sleep(0.01)
    async with pool.acquire() as conn, conn.transaction():
        await outbox.insert(conn, rows)
    committed = time.perf_counter()
    while await pool.fetchval("SELECT EXISTS (SELECT 1 FROM outbox WHERE sent_at IS NULL)"):
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - committed
    await relay.stop()
    await pool.close()
    return elapsed


async def throughput(dsn: str, n: int, batch: int, repeat: int) -> dict[str, list[float]]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    exchange = prefix + amqp.INVENTORY_EXCHANGE
    sink = Sink(connection, exchange)
    await sink.start()
    rows = envelopes(n)
    results: dict[str, list[float]] = {BARE_PIKA: [], BARE_RAW: [], RELAY: []}
    try:
        for run in range(repeat):
            for name, rates in results.items():
                sink.expect(n)
                if name != RELAY:
                    elapsed = await bare_publisher(connection, exchange, rows, batch, raw=name == BARE_RAW)
                else:
                    elapsed = await relay_run(dsn, prefix, envelopes(n), batch)
                await asyncio.wait_for(sink.done.wait(), 120)
                rates.append(n / elapsed)
                log(f"run {run + 1}: {name}: {n} events in {elapsed:.2f} s = {n / elapsed:,.0f}/s")
    finally:
        await sink.close()
        await connection.close()
    return results


# ---------------------------------------------------------------- 2. end-to-end lag


class Service:
    def __init__(self, dsn: str, log_dir: Path, prefix: str, relay: str = "gateway") -> None:
        self.relay_mode = relay
        self.grpc_port = procs.free_port(50400, 50499)
        self.actor_port = procs.free_port(20100, 20199)
        self.http_port = procs.free_port(8400, 8499)
        self.env = dict(os.environ, INVENTORY_DATABASE_URL=dsn, INVENTORY_AMQP_URL=AMQP_URL,
                        INVENTORY_AMQP_PREFIX=prefix, INVENTORY_GRPC_PORT=str(self.grpc_port),
                        INVENTORY_ACTOR_PORT=str(self.actor_port), INVENTORY_HTTP_PORT=str(self.http_port),
                        INVENTORY_SHARDS="2", INVENTORY_LOG_LEVEL="WARNING",
                        INVENTORY_RELAY_IN_GATEWAY="true" if relay == "gateway" else "false")
        if relay == "off":  # the service as without this issue: no consumers, no relay
            del self.env["INVENTORY_AMQP_URL"]
        self.out = log_dir / "serve.out"
        self.err = log_dir / "serve.err"

    def start(self) -> None:
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen([str(INVENTORY), "serve"], env=self.env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while b"inventory serving gRPC" not in self.out.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"inventory serve did not start:\n{self.err.read_text()[-3000:]}")
            time.sleep(0.05)
        if self.relay_mode == "process":
            self.relay = subprocess.Popen([sys.executable, "-m", "gateway.relay"], env=self.env,
                                          stdout=subprocess.DEVNULL, stderr=self.err.open("ab"))

    def stop(self) -> None:
        if self.relay_mode == "process" and self.relay.poll() is None:
            self.relay.send_signal(signal.SIGTERM)
            self.relay.wait(30)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        deadline = time.monotonic() + 10
        while (left := procs.pids_with_env("INVENTORY_ACTOR_PORT", str(self.actor_port))) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:  # ours only: they carry this run's admin port
            os.kill(pid, signal.SIGKILL)


async def lag(dsn: str, rate: int, duration: float, stocks: int, log_dir: Path,
              relay: str = "gateway") -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    service = Service(dsn, log_dir, prefix, relay)
    service.start()
    connection = await aio_pika.connect_robust(AMQP_URL)
    arrivals: list[tuple[float, float]] = []  # (occurred_at, arrival) of each stock.updated
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        x = await amqp.declare_inventory_exchange(channel, prefix)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(x, "inventory.stock.updated")

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            now = time.time()
            occurred = datetime.fromisoformat(json.loads(message.body)["occurred_at"])  # "...Z": UTC
            arrivals.append((occurred.timestamp(), now))

        await queue.consume(on_event, no_ack=True)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
            admin = pbg.InventoryAdminServiceStub(ch)
            inventory = pbg.InventoryServiceStub(ch)
            await admin.UpsertWarehouse(pb.Warehouse(organization_id=ORG, warehouse_id="wh_101", name="Bodega",
                                                     active=True))
            variants = [f"{prefix}lag-{i}" for i in range(stocks)]  # fresh stocks and orders in each run
            units = int(rate * duration / stocks) + 10
            await asyncio.gather(*(admin.RecordMovement(pb.MovementRequest(  # the stocks (not measured)
                organization_id=ORG, variant_id=v, warehouse_id="wh_101", type=pb.MOVEMENT_TYPE_RECEIPT,
                quantity=units), timeout=60) for v in variants))
            while relay != "off" and await service_unsent(dsn):
                await asyncio.sleep(0.1)
            arrivals.clear()
            log(f"lag: {stocks} stocks with {units} units; {rate} reservations/s for {duration:.0f} s")

            async def reserve(i: int) -> tuple[float, float, str]:
                sent = time.time()
                try:
                    await inventory.ReserveStock(pb.ReserveStockRequest(
                        organization_id=ORG, order_id=f"{prefix}order-{i}", ttl_minutes=60,
                        items=[pb.ReserveItem(variant_id=variants[i % stocks], quantity=1)]), timeout=30)
                except grpc.aio.AioRpcError as e:
                    return sent, time.time(), e.code().name
                return sent, time.time(), "OK"

            tasks: list[asyncio.Task[tuple[float, float, str]]] = []
            total = int(rate * duration)
            started = time.perf_counter()
            for i in range(total):
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(reserve(i)))
            sent_for = time.perf_counter() - started
            results = [await t for t in tasks]
        deadline = time.monotonic() + 30
        while relay != "off" and time.monotonic() < deadline and await service_unsent(dsn):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5 if relay != "off" else 0)
        failures: dict[str, int] = {}
        for _, _, code in results:
            if code != "OK":
                failures[code] = failures.get(code, 0) + 1
        lags = [(arrived - occurred) * 1000 for occurred, arrived in arrivals]
        rpc = [(r - s) * 1000 for s, r, code in results if code == "OK"]
        return {"changes": len(results), "offered_rate": total / sent_for, "failures": failures,
                "events": len(arrivals), "lag": lags, "rpc": rpc}
    finally:
        service.stop()
        await delete_topology(connection, prefix)
        await connection.close()


async def delete_topology(connection: aio_pika.abc.AbstractRobustConnection, prefix: str) -> None:
    """What the service declared under this run's prefix (queues, exchanges) goes with the run."""
    channel = await connection.channel()
    for spec in amqp.CONSUMED:
        names = amqp.Names.of(spec, prefix)  # the default first retry
        for q in names.all_queues():
            await channel.queue_delete(q)
        for x in (names.exchange, names.dead_letter_exchange):
            await channel.exchange_delete(x)
    await channel.exchange_delete(prefix + amqp.INVENTORY_EXCHANGE)
    await channel.close()


async def service_unsent(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
    finally:
        await conn.close()


# ---------------------------------------------------------------- main


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per throughput run")
    parser.add_argument("--batch", type=int, default=500, help="relay batch and bare publisher window")
    parser.add_argument("--repeat", type=int, default=2, help="throughput runs per publisher")
    parser.add_argument("--rate", type=int, default=1_000, help="changes per second for the lag run")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--stocks", type=int, default=1_000, help="stocks the lag run's changes rotate over")
    parser.add_argument("--database", default="inv_bench_events")
    parser.add_argument("--only", choices=("throughput", "lag"), help="run one part only")
    parser.add_argument("--relay", choices=("gateway", "process", "off"), nargs="+", default=["gateway", "off"],
                        help="lag runs: the relay in the gateway, `python -m gateway.relay` beside it, or no "
                             "events at all (the gRPC baseline); default: gateway off")
    args = parser.parse_args()

    dsn = await fresh_database(args.database)
    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at start",
          flush=True)
    if args.only != "lag":
        log(f"throughput: {args.events} events, batch {args.batch}, {args.repeat} runs each")
        report_throughput(args, await throughput(dsn, args.events, args.batch, args.repeat))
    if args.only != "throughput":
        for mode in args.relay:
            logs = Path(tempfile.mkdtemp(prefix="bench-events-"))
            log(f"lag ({mode}): the service logs to {logs}")
            report_lag(args, mode, await lag(dsn, args.rate, args.duration, args.stocks, logs, mode))


def report_throughput(args: argparse.Namespace, tp: dict[str, list[float]]) -> None:
    best = {name: max(rates) for name, rates in tp.items()}
    bare = max(best[BARE_PIKA], best[BARE_RAW])
    print(f"\nRelay throughput to RabbitMQ ({args.events:,} persistent events to a durable queue, "
          f"batch/window {args.batch}, best of {args.repeat})")
    for name, rate in best.items():
        print(f"  {name:52s} {rate:>8,.0f} events/s   = {rate / bare:.2f} x the faster bare publisher")
    sys.stdout.flush()


def report_lag(args: argparse.Namespace, mode: str, lg: dict[str, Any]) -> None:
    title = {"gateway": "relay in the gateway", "process": "relay as a process of its own",
             "off": "no events at all (INVENTORY_AMQP_URL unset: the gRPC baseline)"}[mode]
    print(f"\nEnd-to-end lag, {title}, at {lg['offered_rate']:,.0f} changes/s offered ({lg['changes']:,} gRPC "
          f"reservations over {args.stocks} stocks, {args.duration:.0f} s; {lg['events']:,} stock.updated events; "
          f"failed calls: {lg['failures'] or 'none'})")
    for name, values in (("change -> consumer (occurred_at -> arrival)", lg["lag"]),
                         ("gRPC round trip (for scale)", lg["rpc"])):
        if not values:
            continue
        print(f"  {name:44s} p50 {pct(values, 50):7.1f} ms   p99 {pct(values, 99):7.1f} ms   "
              f"max {max(values):7.1f} ms   mean {statistics.fmean(values):6.1f} ms", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
