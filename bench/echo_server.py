"""The ceiling of the gRPC stack: a trivial grpc.aio unary handler on uvloop.

It serves `/bench.Echo/ReserveStock` with the inventory proto's own request and
response types (so the client code, the serialization and the message sizes are those
of ReserveStock) and does no work: it answers each request with a response of the
shape the real service returns. Same server options as the gateway (gateway/app.py).

    python bench/echo_server.py PORT      prints "echo serving on port N" when ready;
                                          stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ECHO_PATH = "/bench.Echo/ReserveStock"


async def serve(port: int) -> None:
    import grpc

    from gateway.pb import inventory_pb2 as pb

    async def reserve(request: Any, context: Any) -> Any:
        item = request.items[0]
        return pb.ReserveStockResponse(
            success=True, reservation_id="0d7b5d55-2f57-4bb7-9a55-3b1a9c0e6f21",  # a uuid, as the service's
            expires_at="2030-01-01T00:00:00.000000Z",
            lines=[pb.ReservedLine(variant_id=item.variant_id, warehouse_id=item.warehouse_id,
                                   quantity=item.quantity)])

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "ReserveStock": grpc.unary_unary_rpc_method_handler(
            reserve, request_deserializer=pb.ReserveStockRequest.FromString,
            response_serializer=pb.ReserveStockResponse.SerializeToString),
    })
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
    ], maximum_concurrent_rpcs=10_000)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"cannot bind 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo serving on port {bound}", flush=True)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
