"""gRPC over TLS and mutual TLS: the gateway's own server (create_server, as `inventory serve` builds it)
with certificates generated here by the openssl CLI, asked over grpc.health.v1 (no shard needed).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.app import create_server
from gateway.config import ConfigError, Settings
from gateway.metrics import Metrics

pytestmark = pytest.mark.timeout(60)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)


def make_cert(d: Path, name: str, ca: str, ext: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server (localhost, 127.0.0.1) and a client certificate; a rogue CA with a client of its own."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    make_cert(d, "rogue", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return d


@contextlib.asynccontextmanager
async def server_with(env: dict[str, str]) -> AsyncIterator[str]:
    settings = Settings.from_env({"INVENTORY_GRPC_HOST": "127.0.0.1", "INVENTORY_GRPC_PORT": "0", **env})
    core = SimpleNamespace(metrics=Metrics(), settings=settings)  # health needs no shard
    server, port, health = create_server(settings, core)  # type: ignore[arg-type]
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def check(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


def credentials(pki: Path, client: str | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(), private_key=(pki / f"{client}.key").read_bytes(),
        certificate_chain=(pki / f"{client}.pem").read_bytes())


async def refused(target: str, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = grpc.aio.insecure_channel(target) if creds is None else grpc.aio.secure_channel(target, creds)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await check(channel)
    return raised.value.code()


async def test_tls_server_answers_tls_clients_and_refuses_plaintext(pki):
    env = {"INVENTORY_TLS_CERT": str(pki / "server.pem"), "INVENTORY_TLS_KEY": str(pki / "server.key")}
    async with server_with(env) as target:
        async with grpc.aio.secure_channel(target, credentials(pki)) as channel:
            assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await refused(target, None) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(pki):
    env = {"INVENTORY_TLS_CERT": str(pki / "server.pem"), "INVENTORY_TLS_KEY": str(pki / "server.key"),
           "INVENTORY_TLS_CLIENT_CA": str(pki / "ca.pem")}
    async with server_with(env) as target:
        async with grpc.aio.secure_channel(target, credentials(pki, "client")) as channel:
            assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await refused(target, credentials(pki)) == grpc.StatusCode.UNAVAILABLE  # no certificate
        assert await refused(target, credentials(pki, "rogue")) == grpc.StatusCode.UNAVAILABLE  # other CA
        assert await refused(target, None) == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_is_the_default():
    async with server_with({}) as target, grpc.aio.insecure_channel(target) as channel:
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_tls_settings_are_checked_at_start(pki, tmp_path):
    cert, key, ca = str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem")
    assert Settings.from_env({}).tls_cert is None
    for bad in ({"INVENTORY_TLS_CERT": cert}, {"INVENTORY_TLS_KEY": key}, {"INVENTORY_TLS_CLIENT_CA": ca},
                {"INVENTORY_TLS_CERT": cert, "INVENTORY_TLS_KEY": str(tmp_path / "missing.key")}):
        with pytest.raises(ConfigError):
            Settings.from_env(bad)
    settings = Settings.from_env({"INVENTORY_TLS_CERT": cert, "INVENTORY_TLS_KEY": key,
                                  "INVENTORY_TLS_CLIENT_CA": ca})
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (Path(cert), Path(key), Path(ca))
