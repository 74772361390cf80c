"""The `inventory` command.

    inventory serve      one node in one command: migrations, actor system, gateway
    inventory actors     the Thespian actor system with N shards (Procfile: actors)
    inventory gateway    the gRPC gateway joining a running actor system (Procfile: gateway)
    inventory migrate    apply the SQL migrations
    inventory reconcile  compare every stock with its ledger and open lines; exit 1 on drift
    inventory call METHOD JSON   call one RPC of a running service, JSON in and out
                                 (--tls-ca/--tls-cert/--tls-key: over TLS or mutual TLS)

With INVENTORY_DATABASE_URL unset, `serve` and `migrate` run an embedded Postgres kept
under INVENTORY_DATA_DIR (default ./.data), so the service runs on a machine with no
servers at all. `actors` and `gateway` need the URL (serve passes it on).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Settings
from gateway.logs import configure

log = logging.getLogger("inventory.cli")


def _resolve_database(settings: Settings) -> tuple[Settings, object | None]:
    """Return settings with a database URL, starting the embedded Postgres if none is set."""
    if settings.database_url:
        return settings, None
    from persistence.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(settings.data_dir / "postgres")
    dsn = pg.start()
    log.info("INVENTORY_DATABASE_URL is unset: using embedded Postgres under %s", settings.data_dir / "postgres")
    return settings.with_database(dsn), pg


def _migrate(dsn: str) -> None:
    from persistence.migrate import migrate

    applied = asyncio.run(migrate(dsn))
    log.info("migrations applied: %s", ", ".join(applied) if applied else "none pending")


def cmd_migrate(settings: Settings) -> int:
    settings, pg = _resolve_database(settings)
    try:
        assert settings.database_url
        _migrate(settings.database_url)
    finally:
        if pg is not None:
            pg.stop()  # type: ignore[attr-defined]
    return 0


def cmd_actors(settings: Settings, ready_file: str | None, node: str | None = None,
               admin_port: int | None = None, leader: str | None = None) -> int:
    from actors.system import run_node

    if not settings.database_url:
        raise ConfigError("inventory actors needs INVENTORY_DATABASE_URL")
    _migrate(settings.database_url)  # (idempotent; several processes take turns: an advisory lock)
    # A single node is a cluster of one: its registrar health-checks the shards and recreates one
    # whose process died, exactly as it does across nodes.
    port = admin_port or settings.actor_port
    return run_node(node or "node-1", port, leader or f"127.0.0.1:{port}", settings.database_url,
                    settings.shards, ready_file, passivate_after=settings.passivate_after_seconds,
                    merge_window=settings.shard_merge_ms / 1000, log_json=settings.log_json,
                    log_level=settings.log_level)


def cmd_gateway(settings: Settings) -> int:
    from gateway.app import run_gateway

    if not settings.database_url:
        raise ConfigError("inventory gateway needs INVENTORY_DATABASE_URL")
    _migrate(settings.database_url)  # (idempotent; several processes take turns: an advisory lock)
    _run_async(run_gateway(settings))
    return 0


def _run_async(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_serve(settings: Settings) -> int:
    """Everything for one node; stops all of it on SIGINT/SIGTERM and on any error."""
    from gateway.app import run_gateway

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below, stopping what was started

    signal.signal(signal.SIGTERM, interrupted)
    settings, pg = _resolve_database(settings)
    launcher: subprocess.Popen[bytes] | None = None
    try:
        assert settings.database_url
        _migrate(settings.database_url)
        ready = Path(tempfile.mkdtemp(prefix="inventory-")) / "actors.ready"
        env = dict(os.environ, INVENTORY_DATABASE_URL=settings.database_url,
                   INVENTORY_SHARDS=str(settings.shards), INVENTORY_ACTOR_PORT=str(settings.actor_port))
        # The actor system starts from its own process, never forked from this threaded one.
        launcher = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "actors", "--ready-file", str(ready)], env=env)
        deadline = time.monotonic() + 120
        while not ready.exists():
            if launcher.poll() is not None:
                raise RuntimeError(f"the actor system exited with code {launcher.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the actor system did not start in 120 s")
            time.sleep(0.05)
        ready.unlink()
        ready.parent.rmdir()

        def announce(gw: object) -> None:
            port = getattr(gw, "port", settings.grpc_port)
            print(f"inventory serving gRPC on port {port} with {settings.shards} shards", flush=True)

        _run_async(run_gateway(settings, on_ready=announce))
        return 0
    finally:
        _stop_launcher(launcher, settings.actor_port)
        if pg is not None:
            pg.stop()  # type: ignore[attr-defined]


def _stop_launcher(launcher: subprocess.Popen[bytes] | None, admin_port: int) -> None:
    if launcher is None:
        return
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(30)
            return
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait(5)
    # The launcher is gone; its daemonized actor processes may not be: stop the system by its port.
    try:
        from actors.system import join

        join(admin_port).shutdown()
    except Exception as e:  # noqa: BLE001 - best effort on the way out
        log.warning("could not shut the actor system down: %s", e)


@dataclass(frozen=True)
class CallTls:
    """How `inventory call` speaks TLS: off unless `enabled`; `ca` None: the system's roots."""

    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""

    @classmethod
    def of(cls, args: argparse.Namespace) -> CallTls:
        """From --tls/--tls-ca/--tls-cert/--tls-key/--tls-server-name, each defaulting to its
        INVENTORY_CALL_TLS_* variable (raises ConfigError for a half client certificate or a missing file)."""
        paths = {name: Path(value) if value else None for name, value in (
            ("ca", args.tls_ca), ("cert", args.tls_cert), ("key", args.tls_key))}
        if (paths["cert"] is None) != (paths["key"] is None):
            raise ConfigError("--tls-cert and --tls-key (INVENTORY_CALL_TLS_CERT/KEY) must be given together")
        for name, path in paths.items():
            if path is not None and not path.is_file():
                raise ConfigError(f"--tls-{name}: no such file {str(path)!r}")
        enabled = bool(args.tls or any(paths.values()) or args.tls_server_name)
        return cls(enabled, paths["ca"], paths["cert"], paths["key"], args.tls_server_name or "")


def _channel(target: str, tls: CallTls) -> Any:
    import grpc

    if not tls.enabled:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes() if tls.ca else None,
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def cmd_call(target: str, method: str, body: str, timeout: float, tls: CallTls = CallTls()) -> int:
    """Call any InventoryService / InventoryAdminService method with a JSON request (TLS if `tls.enabled`)."""
    import grpc
    from google.protobuf import json_format

    from gateway.pb import inventory_pb2

    for service in inventory_pb2.DESCRIPTOR.services_by_name.values():
        m = service.methods_by_name.get(method)
        if m is not None:
            break
    else:
        names = sorted(n for s in inventory_pb2.DESCRIPTOR.services_by_name.values() for n in s.methods_by_name)
        print(f"inventory call: unknown method {method!r}; one of: {', '.join(names)}", file=sys.stderr)
        return 2
    request_cls = getattr(inventory_pb2, m.input_type.name)
    response_cls = getattr(inventory_pb2, m.output_type.name)
    request = json_format.Parse(body or "{}", request_cls())
    with _channel(target, tls) as channel:
        call = channel.unary_unary(f"/{service.full_name}/{method}",
                                   request_serializer=request_cls.SerializeToString,
                                   response_deserializer=response_cls.FromString)
        try:
            response = call(request, timeout=timeout)
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(json_format.MessageToJson(response, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True))
    return 0


def cmd_reconcile(settings: Settings, organization_id: str | None) -> int:
    """One reconcile run: a line per drifting stock on stdout (and in the log), repairs nothing."""
    import asyncpg

    from persistence import reconcile, session

    if not settings.database_url:
        print("inventory reconcile: INVENTORY_DATABASE_URL is required", file=sys.stderr)
        return 2

    async def run() -> reconcile.Report:
        conn = await asyncpg.connect(settings.database_url, timeout=10,
                                     server_settings=session.settings(settings.database_url, "inventory-reconcile"))
        try:
            return await reconcile.check(conn, organization_id)
        finally:
            await conn.close()

    report = asyncio.run(run())
    reconcile.log_report(report)
    for d in report.drifts:
        print(f"drift\t{d.organization_id}\t{d.variant_id}\t{d.warehouse_id}\t{d.describe()}")
    print(f"{report.stocks} stocks checked, {len(report.drifts)} drifting")
    return 1 if report.drifts else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inventory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run one node: migrations, actor system and gateway")
    actors = sub.add_parser("actors", help="run the actor system with the shards")
    actors.add_argument("--ready-file", help="write this file once every shard is ready")
    actors.add_argument("--node", help="this node's name in a cluster (default: a single node)")
    actors.add_argument("--admin-port", type=int, help="this node's actor admin port (default INVENTORY_ACTOR_PORT)")
    actors.add_argument("--leader", help="HOST:PORT of the leader node's admin port (default: this node)")
    sub.add_parser("gateway", help="run a gRPC gateway against a running actor system")
    sub.add_parser("migrate", help="apply the SQL migrations")
    rec = sub.add_parser("reconcile", help="compare each stock with its ledger and open lines (exit 1 on drift)")
    rec.add_argument("--organization", help="only this organization_id")
    call = sub.add_parser("call", help="call one RPC with a JSON request, print the JSON response")
    call.add_argument("method", help="e.g. ReserveStock, GetStock, UpsertWarehouse")
    call.add_argument("json", nargs="?", default="{}", help="the request as JSON (proto field names)")
    call.add_argument("--target", default=f"127.0.0.1:{os.environ.get('INVENTORY_GRPC_PORT', '50051')}",
                      help="host:port of the service (default: 127.0.0.1 on INVENTORY_GRPC_PORT, else 50051)")
    call.add_argument("--timeout", type=float, default=10.0, help="deadline of the call, seconds (default 10)")
    env = os.environ
    call.add_argument("--tls", action="store_true", default=env.get("INVENTORY_CALL_TLS", "") in ("1", "true"),
                      help="speak TLS (implied by the options below); without --tls-ca: the system's CA roots")
    call.add_argument("--tls-ca", default=env.get("INVENTORY_CALL_TLS_CA"),
                      help="PEM CA bundle that signed the server's certificate")
    call.add_argument("--tls-cert", default=env.get("INVENTORY_CALL_TLS_CERT"),
                      help="PEM client certificate chain, for a server requiring mutual TLS")
    call.add_argument("--tls-key", default=env.get("INVENTORY_CALL_TLS_KEY"), help="PEM key of --tls-cert")
    call.add_argument("--tls-server-name", default=env.get("INVENTORY_CALL_TLS_SERVER_NAME"),
                      help="the name to verify in the server's certificate when it differs from the target's host")
    args = parser.parse_args(argv)
    if args.command == "call":
        try:
            tls = CallTls.of(args)
        except ConfigError as e:
            print(f"inventory call: {e}", file=sys.stderr)
            return 2
        return cmd_call(args.target, args.method, args.json, args.timeout, tls)
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        print(f"inventory: configuration error: {e}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_json)
    try:
        if args.command == "serve":
            return cmd_serve(settings)
        if args.command == "actors":
            return cmd_actors(settings, args.ready_file, args.node, args.admin_port, args.leader)
        if args.command == "gateway":
            return cmd_gateway(settings)
        if args.command == "reconcile":
            return cmd_reconcile(settings, args.organization)
        return cmd_migrate(settings)
    except ConfigError as e:
        print(f"inventory: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
