"""Certificates for the transport-security tests, made by the openssl CLI in a folder of the test's.

`make_pki(folder)` writes a CA (`ca.pem`/`ca.key`) with a server certificate for localhost and
127.0.0.1 (`server.pem`/`server.key`) and a client certificate (`client.*`), and a second,
untrusted CA (`rogue-ca.*`) with a server (`rogue-server.*`) and a client (`rogue.*`) of its own.
EC P-256 keys, valid for a day: a few hundred milliseconds in all.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\n"


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


def make_pki(d: Path) -> Path:
    """The CA, server and client certificates described above, in `d`; returns `d`."""
    d.mkdir(parents=True, exist_ok=True)
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "server", "ca", SERVER_EXT)
    make_cert(d, "client", "ca", CLIENT_EXT)
    make_cert(d, "rogue-server", "rogue-ca", SERVER_EXT)
    make_cert(d, "rogue", "rogue-ca", CLIENT_EXT)
    return d
