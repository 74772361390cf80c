"""Build the Python modules for the .proto files in this folder.

Generated code is built, never committed or hand-edited. `ensure()` regenerates a
module when its .proto is newer, writing to a temporary folder and renaming, so that
several processes starting at once (gateway, tests, bench) never see half a file.
Run `python -m proto.build` to build explicitly (the Makefile and CI do).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("proto/inventory/v1/inventory.proto", "proto/catalog/v1/catalog.proto")


def _outputs(proto: str) -> tuple[Path, Path]:
    stem = ROOT / proto[: -len(".proto")]
    return stem.with_name(stem.name + "_pb2.py"), stem.with_name(stem.name + "_pb2_grpc.py")


def _stale(proto: str) -> bool:
    source = (ROOT / proto).stat().st_mtime
    return any(not out.exists() or out.stat().st_mtime < source for out in _outputs(proto))


def build(proto: str) -> None:
    """Run protoc for one file; raises RuntimeError with protoc's message on failure."""
    from grpc_tools import protoc  # build-time dependency only

    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory(dir=ROOT / "proto") as out:
        rc = protoc.main(
            ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}",
             f"--pyi_out={out}", f"--grpc_python_out={out}", str(ROOT / proto)]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed for {proto} (exit {rc})")
        rel = Path(proto).parent
        for produced in (Path(out) / rel).iterdir():
            target = ROOT / rel / produced.name
            tmp = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
            shutil.copyfile(produced, tmp)
            os.replace(tmp, target)


def ensure() -> None:
    """Build every stale module; cheap (a few stat calls) when all are current."""
    for proto in PROTOS:
        if _stale(proto):
            build(proto)


if __name__ == "__main__":
    for p in PROTOS:
        build(p)
    print(f"built {len(PROTOS)} proto files", file=sys.stderr)
