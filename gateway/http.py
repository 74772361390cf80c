"""A minimal HTTP/1.1 server on asyncio for /healthz, /readyz and /metrics.

Why not aiohttp: three GET routes for probes and Prometheus do not justify a framework
dependency. What is supported is exactly what those clients send: GET or HEAD, a
request line and headers (bounded in size and time), no body, one response per
connection (`Connection: close`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

log = logging.getLogger("inventory.http")

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Awaitable[Response]]

MAX_HEADER_LINES = 100
READ_TIMEOUT = 5.0


class HttpServer:
    def __init__(self, routes: dict[str, Route], host: str = "0.0.0.0", port: int = 8080) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=16 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                method, path = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT)
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
                await _respond(writer, (400, "text/plain", b"bad request\n"), head=False)
                return
            if method not in ("GET", "HEAD"):
                await _respond(writer, (405, "text/plain", b"method not allowed\n"), head=False,
                               extra="Allow: GET, HEAD\r\n")
                return
            route = self.routes.get(path.split("?", 1)[0])
            if route is None:
                await _respond(writer, (404, "text/plain", b"not found\n"), head=method == "HEAD")
                return
            try:
                response = await route()
            except Exception:
                log.exception("HTTP %s failed", path)
                response = (500, "text/plain", b"internal error\n")
            await _respond(writer, response, head=method == "HEAD")
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise ValueError(f"bad request line {line[:100]!r}")
    for _ in range(MAX_HEADER_LINES):
        if (await reader.readuntil(b"\n")).strip() == b"":
            return parts[0], parts[1]
    raise ValueError("too many header lines")


async def _respond(writer: asyncio.StreamWriter, response: Response, *, head: bool, extra: str = "") -> None:
    status, content_type, body = response
    reason = HTTPStatus(status).phrase
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n".encode("latin-1"))
    if not head:
        writer.write(body)
    await writer.drain()
