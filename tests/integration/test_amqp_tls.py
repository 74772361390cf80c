"""AMQP over TLS (`amqps://`): the machine's RabbitMQ listens in plaintext only, so the test puts a
TLS-terminating TCP proxy of its own (asyncio + ssl, a certificate made by tests/certs.py) in front
of 127.0.0.1:5672 and gives the service nothing but the proxy's address:

    INVENTORY_AMQP_URL=amqps://guest:guest@127.0.0.1:<proxy>/?cafile=<ca.pem>

A real `inventory serve` then consumes a catalog event and its relay publishes the answer, both
through TLS handshakes the proxy counts; a broker whose certificate another CA signed (or any
certificate, with no cafile: the system's roots do not know our CA) is refused by the connect the
consumers and the relay use, and the consumers never start on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.exceptions
import asyncpg
import grpc
import pytest
from amqp_serve import AMQP_URL, AmqpService, Broker
from certs import make_pki
from conftest import (
    TEST_DATABASE_URL,
    database_url_named,
    drop_database,
    ensure_database,
    eventually,
    free_port,
)

from gateway import amqp
from gateway.config import Settings
from gateway.events import EventConsumers
from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from gateway.relay import OutboxRelay

pytestmark = pytest.mark.timeout(120)
DATABASE_URL = database_url_named(TEST_DATABASE_URL, "inv_sec2_tls")


class TlsProxy:
    """Accepts TLS on 127.0.0.1:<port> with `cert`, forwards the plaintext to RabbitMQ; counts handshakes.

    Each accepted socket is wrapped with `connect_accepted_socket(ssl=...)`, which completes the
    server-side handshake before any byte is read (wrapping a stream that already reads would swallow
    the ClientHello) and raises when the client refuses the certificate."""

    def __init__(self, cert: Path, key: Path, upstream: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.upstream = upstream
        self.handshakes = 0
        self.failed_handshakes: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter | asyncio.Transport] = set()

    async def start(self) -> int:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self._acceptor = asyncio.create_task(self._accept_loop())
        return self.port

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn, ssl=self.context,
                                                              ssl_handshake_timeout=10)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            self.failed_handshakes.append(f"{type(e).__name__}: {e}")
            conn.close()
            return
        self.handshakes += 1
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def close(self) -> None:
        self._acceptor.cancel()
        self.sock.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._acceptor, *self._tasks, return_exceptions=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextlib.asynccontextmanager
async def tls_proxy(pki: Path, name: str = "server") -> AsyncIterator[TlsProxy]:
    proxy = TlsProxy(pki / f"{name}.pem", pki / f"{name}.key")
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def amqps_url(port: int, ca: Path | None) -> str:
    return f"amqps://guest:guest@127.0.0.1:{port}/" + (f"?cafile={ca}" if ca else "")


async def test_the_service_consumes_and_publishes_over_amqps_and_verifies_the_broker(pki, tmp_path_factory):
    await drop_database(DATABASE_URL)
    await ensure_database(DATABASE_URL)
    org = f"amqps-{uuid.uuid4()}"
    async with tls_proxy(pki) as proxy:
        svc = AmqpService(DATABASE_URL, tmp_path_factory.mktemp("amqps"), grpc_port=free_port(range(50700, 50800)),
                          actor_port=free_port(range(20400, 20500)), amqp_url=amqps_url(proxy.port, pki / "ca.pem"))
        connection = await aio_pika.connect_robust(AMQP_URL)  # the test's side: plaintext, straight to RabbitMQ
        broker = Broker(connection, svc.prefix)
        try:
            await svc.start()
            await broker.open()
            await broker.consumers_up()
            tap = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
            await tap.bind(await amqp.declare_inventory_exchange(broker.channel, svc.prefix), "inventory.stock.#")
            published: list[dict[str, Any]] = []

            async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                published.append(json.loads(message.body))

            await tap.consume(on_event, no_ack=True)
            async with grpc.aio.insecure_channel(svc.target) as channel:
                await pbg.InventoryAdminServiceStub(channel).UpsertWarehouse(pb.Warehouse(
                    organization_id=org, warehouse_id="w1", name="main", active=True))
            await broker.publish(amqp.CATALOG, "catalog.variant.created", {
                "event": "catalog.variant.created", "organization_id": org,
                "data": {"variant_id": "v1", "track_inventory": True}})

            db = await asyncpg.connect(DATABASE_URL, timeout=10)
            try:
                async def stock_created() -> bool:  # consumed through TLS
                    return bool(await db.fetchval("SELECT count(*) FROM stocks WHERE organization_id = $1", org))

                await eventually(stock_created, timeout=20, what="the consumed event's stock in Postgres")
            finally:
                await db.close()

            async def initialized() -> list[dict[str, Any]] | None:  # published through TLS by the relay
                seen = [e for e in published if e["event"] == "inventory.stock.initialized"
                        and e["organization_id"] == org]
                return seen or None  # (an empty list would end the wait at once)

            (event,) = await eventually(initialized, timeout=20, what="inventory.stock.initialized published")
            assert event["data"]["variant_id"] == "v1"
            assert proxy.handshakes >= 2, proxy.handshakes  # the consumers' connection and the relay's
            assert proxy.failed_handshakes == []
        finally:
            try:
                if svc.process is not None:
                    await svc.stop()
            finally:
                await broker.delete_topology()
                await connection.close()
                await drop_database(DATABASE_URL)


async def test_a_broker_certificate_our_ca_did_not_sign_is_refused(pki):
    async with tls_proxy(pki, "rogue-server") as rogue, tls_proxy(pki) as genuine:
        for url in (amqps_url(rogue.port, pki / "ca.pem"),  # signed by another CA
                    amqps_url(genuine.port, None)):  # ours, but the system's roots do not know our CA
            with pytest.raises((aio_pika.exceptions.AMQPConnectionError, ssl.SSLError)) as refused:
                await amqp.connect(url, "amqps-test")
            assert "CERTIFICATE_VERIFY_FAILED" in chain(refused.value), chain(refused.value)
        assert rogue.handshakes == 0 and genuine.handshakes == 0
        assert rogue.failed_handshakes and genuine.failed_handshakes
        connection = await amqp.connect(amqps_url(genuine.port, pki / "ca.pem"), "amqps-test")  # the control
        await connection.close()
        assert genuine.handshakes == 1


async def test_the_consumers_and_the_relay_never_talk_to_an_untrusted_broker(pki, caplog):
    caplog.set_level("WARNING")
    async with tls_proxy(pki, "rogue-server") as rogue:
        settings = Settings(amqp_url=amqps_url(rogue.port, pki / "ca.pem"), amqp_prefix=f"untrusted-{uuid.uuid4()}.",
                            database_url=DATABASE_URL)
        consumers = EventConsumers(settings, handler=None, pool=None)  # type: ignore[arg-type]
        relay = OutboxRelay(settings)
        consumers.start()
        relay.start()
        try:
            await eventually(lambda: _value(len(rogue.failed_handshakes) >= 2 and relay.stats.failures > 0),
                             timeout=15, what="both refused the broker")
            assert not consumers.ready.is_set()
            assert any("RabbitMQ unreachable" in r.getMessage() and "CERTIFICATE_VERIFY_FAILED" in r.getMessage()
                       for r in caplog.records), [r.getMessage() for r in caplog.records]
            assert rogue.handshakes == 0
            assert "CERTIFICATE_VERIFY_FAILED" in relay.stats.last_error, relay.stats.last_error
        finally:
            await consumers.stop(grace=1)
            await relay.stop(flush=False)


async def _value(value: Any) -> Any:
    return value


def chain(e: BaseException | None) -> str:
    """The exception and its causes (aiormq wraps the TLS error in AMQPConnectionError)."""
    parts = []
    while e is not None:
        parts.append(repr(e))
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)
