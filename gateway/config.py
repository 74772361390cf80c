"""One frozen settings object, built from the environment at start-up and passed down.

Nothing reads the environment anywhere else, and nothing connects at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path


class ConfigError(ValueError):
    pass


def _int(env: dict[str, str], name: str, default: int, low: int = 0, high: int = 2**31 - 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float, low: float = float("-inf"),
           high: float = float("inf")) -> float:
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:  # also refuses nan
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw}")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _tls(env: dict[str, str]) -> dict[str, Path | None]:
    """INVENTORY_TLS_CERT and INVENTORY_TLS_KEY together (or neither); INVENTORY_TLS_CLIENT_CA needs both."""
    paths = {name: Path(raw) if (raw := env.get(var, "").strip()) else None for name, var in (
        ("tls_cert", "INVENTORY_TLS_CERT"), ("tls_key", "INVENTORY_TLS_KEY"),
        ("tls_client_ca", "INVENTORY_TLS_CLIENT_CA"))}
    if (paths["tls_cert"] is None) != (paths["tls_key"] is None):
        raise ConfigError("INVENTORY_TLS_CERT and INVENTORY_TLS_KEY must be set together")
    if paths["tls_client_ca"] is not None and paths["tls_cert"] is None:
        raise ConfigError("INVENTORY_TLS_CLIENT_CA needs INVENTORY_TLS_CERT and INVENTORY_TLS_KEY")
    for var, path in zip(("INVENTORY_TLS_CERT", "INVENTORY_TLS_KEY", "INVENTORY_TLS_CLIENT_CA"), paths.values()):
        if path is not None and not path.is_file():
            raise ConfigError(f"{var}: no such file {str(path)!r}")
    return paths


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None  # None: embedded Postgres under data_dir
    amqp_url: str | None = None  # unset: no consumers and no relay; events wait in the outbox
    amqp_prefix: str = ""  # prepended to every exchange and queue name (isolation of tests, tenants)
    amqp_max_attempts: int = 8  # deliveries of a message failing transiently before it is dead-lettered
    amqp_retry_seconds: float = 1.0  # first retry delay; doubles per attempt, at most 60 s
    relay_batch: int = 500  # outbox rows published per round (one confirm wait)
    relay_poll_seconds: float = 0.05  # how often an idle relay looks for new outbox rows
    relay_in_gateway: bool = True  # false: run `python -m gateway.relay` as a process of its own
    redis_url: str | None = None
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8080
    shards: int = os.cpu_count() or 2
    actor_port: int = 1900
    default_ttl_minutes: int = 15
    max_ttl_seconds: int = 24 * 3600
    max_items: int = 500
    max_message_bytes: int = 4 * 1024 * 1024
    data_dir: Path = Path(".data")
    passivate_after_seconds: float = 600.0
    shard_merge_ms: float = 2.0
    max_inflight_per_shard: int = 1
    batch_socket: bool = True  # batches to shards over their sockets (actors/datapath.py), else Thespian
    max_batch: int = 512
    shard_reply_timeout: float = 30.0
    default_organization_id: str = "default"
    catalog_host: str | None = None
    catalog_port: int | None = None
    catalog_timeout_seconds: float = 5.0  # deadline of one Catalog call, retries included
    catalog_degraded_mode: bool = True  # Catalog unreachable and nothing cached: allow, source "degraded"
    catalog_cache_ttl_seconds: float = 3600.0
    catalog_cache_max_entries: int = 10_000  # the in-process LRU (no INVENTORY_REDIS_URL)
    breaker_failure_threshold: int = 5  # consecutive failures that open a dependency's circuit breaker
    breaker_cooldown_seconds: float = 30.0  # open -> half-open
    http_host: str = "0.0.0.0"
    health_interval_seconds: float = 2.0  # Postgres check (gRPC health) and metrics polling
    shutdown_grace_seconds: float = 10.0  # in-flight RPCs may finish within this on SIGTERM
    log_level: str = "INFO"
    log_json: bool = True
    tls_cert: Path | None = None  # PEM certificate chain of the gRPC server; with tls_key: TLS on
    tls_key: Path | None = None  # PEM private key of the gRPC server
    tls_client_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed (mTLS)
    quota_rps: float = 0.0  # requests per second per organization_id; 0: no quotas
    quota_burst: int = 0  # bucket size per organization_id; 0: max(1, quota_rps)
    reconcile_interval_seconds: float = 60.0  # background drift check of stocks vs ledger; 0: off
    sweep_interval_seconds: float = 30.0  # Postgres sweep for overdue reservation lines no timer expired; 0: off

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        catalog_port = e.get("CATALOG_GRPC_PORT", "").strip()
        return cls(
            database_url=e.get("INVENTORY_DATABASE_URL") or None,
            amqp_url=e.get("INVENTORY_AMQP_URL") or None,
            amqp_prefix=e.get("INVENTORY_AMQP_PREFIX", ""),
            amqp_max_attempts=_int(e, "INVENTORY_AMQP_MAX_ATTEMPTS", 8, 1, 1000),
            amqp_retry_seconds=_float(e, "INVENTORY_AMQP_RETRY_SECONDS", 1.0, 0.001, 60.0),
            relay_batch=_int(e, "INVENTORY_RELAY_BATCH", 500, 1, 10_000),
            relay_poll_seconds=_float(e, "INVENTORY_RELAY_POLL_SECONDS", 0.05),
            relay_in_gateway=_bool(e, "INVENTORY_RELAY_IN_GATEWAY", True),
            redis_url=e.get("INVENTORY_REDIS_URL") or None,
            grpc_host=e.get("INVENTORY_GRPC_HOST", "0.0.0.0") or "0.0.0.0",
            grpc_port=_int(e, "INVENTORY_GRPC_PORT", 50051, 0, 65535),
            http_port=_int(e, "INVENTORY_HTTP_PORT", 8080, 0, 65535),
            shards=_int(e, "INVENTORY_SHARDS", os.cpu_count() or 2, 1, 4096),
            actor_port=_int(e, "INVENTORY_ACTOR_PORT", 1900, 1, 65535),
            default_ttl_minutes=_int(e, "INVENTORY_DEFAULT_TTL_MINUTES", 15, 1, 24 * 60),
            data_dir=Path(e.get("INVENTORY_DATA_DIR", ".data") or ".data"),
            passivate_after_seconds=_float(e, "INVENTORY_PASSIVATE_AFTER_SECONDS", 600.0),
            shard_merge_ms=_float(e, "INVENTORY_SHARD_MERGE_MS", 2.0),
            max_inflight_per_shard=_int(e, "INVENTORY_MAX_INFLIGHT_PER_SHARD", 1, 1, 16),
            batch_socket=_bool(e, "INVENTORY_BATCH_SOCKET", True),
            max_batch=_int(e, "INVENTORY_MAX_BATCH", 512, 1, 10_000),
            shard_reply_timeout=_float(e, "INVENTORY_SHARD_REPLY_TIMEOUT_SECONDS", 30.0),
            default_organization_id=e.get("INVENTORY_DEFAULT_ORGANIZATION_ID", "default") or "default",
            catalog_host=e.get("CATALOG_GRPC_HOST") or None,
            catalog_port=int(catalog_port) if catalog_port.isdigit() else None,
            catalog_timeout_seconds=_float(e, "INVENTORY_CATALOG_TIMEOUT_SECONDS", 5.0),
            catalog_degraded_mode=_bool(e, "INVENTORY_CATALOG_DEGRADED_MODE", True),
            catalog_cache_ttl_seconds=_float(e, "INVENTORY_CATALOG_CACHE_TTL_SECONDS", 3600.0),
            catalog_cache_max_entries=_int(e, "INVENTORY_CATALOG_CACHE_MAX_ENTRIES", 10_000, 1, 10_000_000),
            breaker_failure_threshold=_int(e, "INVENTORY_BREAKER_FAILURE_THRESHOLD", 5, 1, 1000),
            breaker_cooldown_seconds=_float(e, "INVENTORY_BREAKER_COOLDOWN_SECONDS", 30.0),
            http_host=e.get("INVENTORY_HTTP_HOST", "0.0.0.0") or "0.0.0.0",
            health_interval_seconds=_float(e, "INVENTORY_HEALTH_INTERVAL_SECONDS", 2.0),
            shutdown_grace_seconds=_float(e, "INVENTORY_SHUTDOWN_GRACE_SECONDS", 10.0),
            log_level=(e.get("INVENTORY_LOG_LEVEL", "INFO") or "INFO").upper(),
            log_json=_bool(e, "INVENTORY_LOG_JSON", True),
            **_tls(e),
            quota_rps=_float(e, "INVENTORY_QUOTA_RPS", 0.0),
            quota_burst=_int(e, "INVENTORY_QUOTA_BURST", 0, 0, 10_000_000),
            reconcile_interval_seconds=_float(e, "INVENTORY_RECONCILE_INTERVAL_SECONDS", 60.0),
            sweep_interval_seconds=_float(e, "INVENTORY_SWEEP_INTERVAL_SECONDS", 30.0),
        )

    def with_database(self, url: str) -> Settings:
        return replace(self, database_url=url)
