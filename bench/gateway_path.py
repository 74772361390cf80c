"""The gateway's own Python per ReserveStock, counted in CPU time in one process.

    .venv/bin/python bench/gateway_path.py                 # 3 rounds of 40,000 calls, 64 in flight
    .venv/bin/python bench/gateway_path.py --profile       # and cProfile's top functions

Why: on two cores the end-to-end benches (bench/reserve.py) vary by 10-15% from run to run,
which hides any single change to the gateway's Python of a few percent; the gateway's extra
over the echo ceiling is Python (see the README). This bench runs that Python alone and
counts the process's CPU time, which the rest of the machine does not change much.

What runs, in this process on uvloop: the real `InventoryServicer.ReserveStock` behind the
metrics interceptor's wrapper, the real `ActorBridge` (its lanes only: no Thespian thread),
and a lane's socket to a fake shard in a child process that answers every ReserveStock of a
batch with a ReservationResult (its CPU is not counted). No gRPC: the gRPC stack costs the
gateway what it costs the echo server. The baseline, run in the same process, is the same
driver calling the least an asynchronous handler does (await an answer resolved once per turn
of the loop for every caller waiting, then build the response from the request); the
difference is the gateway's own path. With no shard latency every batch holds all the callers
(64), where the service's hot stock commits 10-18: per-batch costs weigh less here.

Prints CPU µs per call for both, their difference, and the ratio service/baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from common import cprofile_top, paired_rounds

FAKE_SHARD = """
import socket, sys
from actors.datapath import Peer, frame
from actors.messages import ReservationResult, ReservedLine, decode_batch, encode_replies
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setblocking(True)
peer = Peer(conn, "gateway")
import select
while not peer.closed:
    select.select([peer.sock], [], [])
    for batch_id, payload, shard in peer.read():
        replies = [ReservationResult(c.reservation_id, c.expires_at,
                                     tuple(ReservedLine(ln.variant_id, ln.warehouse_id, ln.quantity) for ln in c.lines))
                   for c in decode_batch(payload)]
        peer.send(frame(batch_id, encode_replies(replies), shard))
"""


class _Context:
    """What the interceptor's wrapper asks of a grpc.aio context on a successful call."""

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()


async def _drive(handler: Any, requests: list[Any], in_flight: int) -> float:
    """CPU seconds of this process to answer every request, `in_flight` callers at a time."""
    ctx = _Context()
    queue = iter(requests)

    async def caller() -> None:
        for request in queue:
            response = await handler(request, ctx)
            response.SerializeToString()

    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return time.process_time() - started


async def main(a: argparse.Namespace, port: int) -> None:
    from gateway.app import settle_memory
    from gateway.config import Settings
    from gateway.flows import Core
    from gateway.metrics import MeasuredBridge, Metrics, RpcInterceptor
    from gateway.pb import inventory_pb2 as pb
    from gateway.service import InventoryServicer

    bridge = None
    try:
        metrics = Metrics()
        bridge = MeasuredBridge(lambda: None, [object()], data_addresses=[f"127.0.0.1:{port}"])
        bridge.metrics = metrics
        bridge._loop = asyncio.get_running_loop()  # the lanes only: the Thespian thread is not started
        core = Core(Settings.from_env({}), bridge, None, metrics)  # type: ignore[arg-type]
        core.warehouses._cache[a.org] = (float("inf"), {"wh-1": True})  # (no Postgres: known warehouse)
        method = "/inventory.v1.InventoryService/ReserveStock"
        service = RpcInterceptor(metrics).wrap(method, InventoryServicer(core).ReserveStock)
        prebuilt = pb.ReserveStockResponse(success=True, reservation_id="0d7b5d55-2f57-4bb7-9a55-3b1a9c0e6f21",
                                           expires_at="2030-01-01T00:00:00.000000Z",
                                           lines=[pb.ReservedLine(variant_id="hot", warehouse_id="wh-1", quantity=1)])

        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []

        def answer_all() -> None:
            batch = waiting[:]
            waiting.clear()
            for fut in batch:
                fut.set_result(None)

        async def baseline(request: Any, context: Any) -> Any:
            """The least an asynchronous handler does: wait for a batched answer, build the response."""
            fut = loop.create_future()
            waiting.append(fut)
            if len(waiting) == 1:
                loop.call_soon(answer_all)
            await fut
            item = request.items[0]
            return pb.ReserveStockResponse(
                success=True, reservation_id=prebuilt.reservation_id, expires_at=prebuilt.expires_at,
                lines=[pb.ReservedLine(variant_id=item.variant_id, warehouse_id=item.warehouse_id,
                                       quantity=item.quantity)])

        def requests(round_: int) -> list[Any]:
            return [pb.ReserveStockRequest(organization_id=a.org, order_id=f"order-{round_}-{i}", ttl_seconds=900,
                                           items=[pb.ReserveItem(variant_id="hot", quantity=1, warehouse_id="wh-1")])
                    for i in range(a.calls)]

        await _drive(service, requests(-1)[:2000], a.in_flight)  # warm-up: connect the lane, fill caches
        settle_memory()  # the gateway's collector settings once it serves
        base_us, svc_us = await paired_rounds(
            a.rounds, a.calls, "call", ("baseline", "gateway path"),
            lambda r: _drive(baseline, requests(r), a.in_flight), lambda r: _drive(service, requests(r), a.in_flight))
        print(f"\n== gateway path, {a.calls:,} ReserveStock calls per round, {a.in_flight} in flight, "
              f"best of {a.rounds} rounds (CPU time of this process) ==")
        print(f"baseline (await a batched answer)      {base_us:7.1f} µs/call")
        print(f"gateway path (servicer .. lane)        {svc_us:7.1f} µs/call")
        print(f"the path's own cost                    {svc_us - base_us:7.1f} µs/call   "
              f"ratio path/baseline {svc_us / base_us:.2f}")
        print(f"batches sent {bridge.stats.batches:,}, commands {bridge.stats.commands:,}")
        if a.profile:
            reqs = requests(a.rounds)
            print(await cprofile_top(lambda: _drive(service, reqs, a.in_flight), 25))
    finally:
        for lane in bridge.lanes if bridge is not None else ():
            lane.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=40_000, help="calls per round (default 40,000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the best is reported (default 3)")
    p.add_argument("--in-flight", type=int, default=64, help="concurrent callers (default 64)")
    p.add_argument("--org", default="bench-org")
    p.add_argument("--profile", action="store_true", help="one more round under cProfile")
    args = p.parse_args()
    import uvloop

    shard = subprocess.Popen([sys.executable, "-c", FAKE_SHARD], stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert shard.stdout is not None
        uvloop.run(main(args, int(shard.stdout.readline())))
    finally:
        shard.kill()
        shard.wait(5)
