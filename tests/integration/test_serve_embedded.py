"""`inventory serve` with no database configured: the embedded default, end to end.

The README promises that `make run` works on a machine with no servers at all. This runs
the real command with INVENTORY_DATABASE_URL unset, reserves through gRPC, stops it with
SIGTERM and checks that nothing it started (Postgres, actor processes) is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from gateway.pb import inventory_pb2 as pb
from gateway.pb import inventory_pb2_grpc as pbg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_with_env(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _pids_with_cmdline(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.timeout(180)
def test_serve_runs_on_an_embedded_postgres_and_stops_everything(tmp_path: Path) -> None:
    marker = f"INVENTORY_TEST_MARKER=embedded-{uuid.uuid4().hex}"
    port, actor_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "INVENTORY_DATABASE_URL"}
    env.update(INVENTORY_DATA_DIR=str(tmp_path / "data"), INVENTORY_GRPC_PORT=str(port),
               INVENTORY_ACTOR_PORT=str(actor_port), INVENTORY_SHARDS="2", INVENTORY_LOG_JSON="false",
               INVENTORY_HTTP_PORT="0")
    key, value = marker.split("=", 1)
    env[key] = value
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if "serving gRPC on port" in line and line.startswith("inventory"):
                break
        assert any(line.startswith("inventory serving gRPC") for line in output), "".join(output)

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin, inventory = pbg.InventoryAdminServiceStub(channel), pbg.InventoryServiceStub(channel)
            admin.UpsertWarehouse(pb.Warehouse(organization_id="acme", warehouse_id="wh", name="W", active=True))
            admin.RecordMovement(pb.MovementRequest(organization_id="acme", variant_id="v", warehouse_id="wh",
                                                    type=pb.MOVEMENT_TYPE_RECEIPT, quantity=5))
            reply = inventory.ReserveStock(pb.ReserveStockRequest(
                organization_id="acme", order_id="o1", items=[pb.ReserveItem(variant_id="v", quantity=2)]))
            assert reply.success and reply.lines[0].warehouse_id == "wh"
            [level] = admin.GetStock(pb.GetStockRequest(organization_id="acme", variant_id="v")).levels
            assert (level.on_hand, level.reserved, level.available) == (5, 2, 3)
        assert (tmp_path / "data" / "postgres").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0, "".join(output)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (_pids_with_env(marker) or _pids_with_cmdline(str(tmp_path / "data"))):
        time.sleep(0.2)
    assert _pids_with_env(marker) == [], "actor or gateway processes outlived serve"
    assert _pids_with_cmdline(str(tmp_path / "data")) == [], "the embedded Postgres outlived serve"
