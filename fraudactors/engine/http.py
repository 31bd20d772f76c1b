"""A small asyncio HTTP/1.1 server (keep-alive) for /metrics, /healthz, /readyz and POST /predict.

Four routes do not justify a web framework dependency; this is enough for Prometheus scrapes,
Kubernetes probes and a synchronous scoring call. Bodies are bounded (SPEC §2: 1 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from fraudactors.logging import get_logger

MAX_BODY = 1024 * 1024 + 4096
_MAX_HEADER_LINES = 100
_IDLE_TIMEOUT_S = 75.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 422: "Unprocessable Entity", 500: "Internal Server Error",
            503: "Service Unavailable"}

Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[str, str, bytes], Awaitable[Response]]  # method, path, body


class HttpServer:
    """Serves ``handler`` on one port; :attr:`port` is the bound port (``port=0`` picks a free one)."""

    def __init__(self, host: str, port: int, handler: Handler) -> None:
        self._host = host
        self._port = port
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.port = port
        self._log = get_logger(actor="http")

    async def run(self, task_status: Any) -> None:
        server = await asyncio.start_server(self._serve, self._host, self._port, limit=MAX_BODY)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._log.info("http_listening", host=self._host, port=self.port)
        task_status.started()
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(server.wait_closed())
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                keep_alive = await self._one(reader, writer)
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        async with asyncio.timeout(_IDLE_TIMEOUT_S):
            line = await reader.readline()
        if not line:
            return False
        try:
            method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        except ValueError:
            await _write(writer, (400, "text/plain", b"bad request line\n"), False)
            return False
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADER_LINES):
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            await _write(writer, (400, "text/plain", b"too many headers\n"), False)
            return False
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            await _write(writer, (400, "text/plain", b"bad content-length\n"), False)
            return False
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await _write(writer, (400, "text/plain", b"chunked bodies are not supported\n"), False)
            return False
        if length < 0 or length > MAX_BODY:
            await _write(writer, (413, "application/json", b'{"error":"body too large"}'), False)
            return False
        body = await reader.readexactly(length) if length else b""
        path = target.split("?", 1)[0]
        try:
            response = await self._handler(method.upper(), path, body)
        except Exception as exc:  # the handler's bug must not kill the server
            self._log.exception("http_handler_failed", path=path)
            response = (500, "application/json", b'{"error":"internal error: %s"}' % type(exc).__name__.encode())
        await _write(writer, response, keep_alive)
        return keep_alive


async def _write(writer: asyncio.StreamWriter, response: Response, keep_alive: bool) -> None:
    status, content_type, body = response
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
