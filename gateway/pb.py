"""The generated protobuf modules, built on first use if missing or stale (see proto/build.py)."""

from proto import build as _build

_build.ensure()

from proto.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from proto.inventory.v1 import inventory_pb2, inventory_pb2_grpc

__all__ = ["catalog_pb2", "catalog_pb2_grpc", "inventory_pb2", "inventory_pb2_grpc"]
