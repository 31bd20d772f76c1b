"""The engine's HTTP endpoint on aiohttp.web: /metrics, /healthz, /readyz and POST /predict.

aiohttp parses and bounds each header line; it has no deadline for a request's head other than
its keep-alive timeout, no cap on connections, and answers an oversized header line 400.
:class:`_Connection` (aiohttp's protocol for one connection) adds those three. Bodies are bounded (SPEC §6: 413 over 1 MiB) and must
arrive within ``http.body_timeout_s``; POST /predict takes a bearer token when one is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from prometheus_client import CollectorRegistry, generate_latest

from fraudactors.logging import get_logger
from fraudactors.settings import HttpSettings

MAX_BODY = 1024 * 1024
# generate_latest's text format: what prometheus_client's own handlers answer a scraper that
# does not ask for a newer one.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_JSON = "application/json"
_IDLE_TIMEOUT_S = 75.0  # a kept-alive connection with no new request
_LINGER_S = 1.0  # after an early answer (401, 408, 413), how long the unread rest of a body is drained
_SHUTDOWN_S = 2.0  # requests in flight when the server stops

Response = tuple[int, str, bytes]  # status, content type, body
_RETRY_AFTER_S = "1"  # the Retry-After of a 503 from POST /predict


class Endpoints(Protocol):
    """What the engine answers; this module speaks HTTP for it."""

    def healthz(self) -> Response: ...

    def readyz(self) -> Response: ...

    async def predict(self, body: bytes) -> Response: ...


class HttpServer:
    """Serves ``endpoints`` and ``registry``; :attr:`port` is the bound port (``port=0`` picks a
    free one, kept across restarts)."""

    def __init__(self, settings: HttpSettings, registry: CollectorRegistry, endpoints: Endpoints) -> None:
        self.settings = settings
        self.port = settings.port
        self._registry = registry
        self._endpoints = endpoints
        token = settings.predict_token
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None
        self._open: set[_Connection] = set()
        self._log = get_logger(actor="http")

    @property
    def connections(self) -> int:
        return len(self._open)

    async def run(self, task_status: Any) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/predict", self._predict)
        runner = web.AppRunner(app, shutdown_timeout=_SHUTDOWN_S)
        await runner.setup()
        server = runner.server
        assert server is not None
        listener: asyncio.Server | None = None
        try:
            loop = asyncio.get_running_loop()
            listener = await loop.create_server(lambda: _Connection(self, server, loop),
                                                self.settings.host, self.port)
            self.port = listener.sockets[0].getsockname()[1]
            self._log.info("http_listening", host=self.settings.host, port=self.port,
                           predict_token=self._token_digest is not None)
            task_status.started()
            await asyncio.Future()
        finally:
            await asyncio.shield(self._close(runner, listener))

    async def _close(self, runner: web.AppRunner, listener: asyncio.Server | None) -> None:
        if listener is not None:
            listener.close()
        await runner.cleanup()
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.wait_closed()

    # ---------------------------------------------------------------- routes
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        connection = request.protocol
        assert isinstance(connection, _Connection)
        connection.head_received()
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPMethodNotAllowed as exc:
            return _json(405, {"error": f"use {', '.join(sorted(exc.allowed_methods))}"},
                         headers={"Allow": exc.headers["Allow"]})
        except web.HTTPException as exc:  # the router's 404
            return _json(exc.status, {"error": exc.reason.lower()})
        except ConnectionError:
            raise
        except Exception as exc:  # the handler's bug must not kill the server
            self._log.exception("http_handler_failed", path=request.path)
            return _json(500, {"error": f"internal error: {type(exc).__name__}"})
        finally:
            connection.response_done()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _response(self._endpoints.healthz())

    async def _readyz(self, request: web.Request) -> web.Response:
        return _response(self._endpoints.readyz())

    async def _predict(self, request: web.Request) -> web.StreamResponse:
        if self._token_digest is not None and not self._authorized(request):
            challenge = 'Bearer realm="fraudactors"'
            if "Authorization" in request.headers:
                challenge += ', error="invalid_token"'
            return _json(401, {"error": "a valid bearer token is required"},
                         headers={"WWW-Authenticate": challenge})
        if (request.content_length or 0) > MAX_BODY:
            return _closing(_json(413, {"error": f"body over {MAX_BODY} bytes"}))
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                body = await request.read()
        except TimeoutError:
            return _closing(_json(408, {"error": f"body not received within {self.settings.body_timeout_s:g} s"}))
        except web.HTTPRequestEntityTooLarge:  # chunked: no Content-Length to refuse it by
            return _closing(_json(413, {"error": f"body over {MAX_BODY} bytes"}))
        status, content_type, answer = await self._endpoints.predict(body)
        # every 503 of /predict is passing: models loading, an actor restarting, the store's reads busy
        return web.Response(status=status, body=answer, headers={"Content-Type": content_type, **(
            {"Retry-After": _RETRY_AFTER_S} if status == 503 else {})})

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        assert self._token_digest is not None
        # Digests of equal length: the comparison time says nothing about the token, not even its length.
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self._token_digest)


_CONTENT_LENGTH = b"\r\ncontent-length:"


class _Boundaries:
    """Where the client's requests end in the bytes it sent: enough to tell, once a response is
    done, whether the next request's head has begun (a pipelined head, sent while the previous
    request was served, is buffered in aiohttp's parser where nothing else can see it).

    Heads end at the blank line; a body is ``Content-Length`` bytes. A chunked body (or a head
    too large for aiohttp anyway) ends the accounting for the connection (``lost``). Empty lines
    between requests do not begin a head."""

    __slots__ = ("_body_left", "_head", "lost")
    _MAX_HEAD = 64 * 1024

    def __init__(self) -> None:
        self._head = bytearray()  # the head begun and not yet ended
        self._body_left = 0
        self.lost = False

    @property
    def head_begun(self) -> bool:
        return bool(self._head) and not self.lost

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and not self.lost:
            if self._body_left:
                take = min(self._body_left, n - i)
                self._body_left -= take
                i += take
                continue
            if not self._head:
                while i < n and data[i] in b"\r\n":  # empty lines before a request
                    i += 1
                if i == n:
                    return
            start = max(0, len(self._head) - 3)  # a blank line split across chunks
            self._head += data[i:]
            end = self._head.find(b"\r\n\r\n", start)
            if end < 0:
                self.lost = len(self._head) > self._MAX_HEAD
                return
            head, rest = bytes(self._head[:end + 4]).lower(), len(self._head) - (end + 4)
            self._head.clear()
            i = n - rest
            if b"\r\ntransfer-encoding:" in head:
                self.lost = True
                return
            at = head.find(_CONTENT_LENGTH)
            if at >= 0:
                value = head[at + len(_CONTENT_LENGTH):head.find(b"\r\n", at + 2)].strip()
                if not value.isdigit():
                    self.lost = True  # aiohttp answers it 400 and closes
                    return
                self._body_left = int(value)


class _Connection(web.RequestHandler):
    """aiohttp's protocol for one connection, plus the connection cap, a deadline for each
    request head (from connect, or from the first byte after a response -- or from the response,
    when the next head had begun before it -- to the handler), and 431 for a header line over
    aiohttp's limit (8190 bytes)."""

    __slots__ = ("_admitted", "_boundaries", "_deadline", "_idle", "_owner")

    def __init__(self, owner: HttpServer, server: web.Server, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(server, loop=loop, keepalive_timeout=_IDLE_TIMEOUT_S, lingering_time=_LINGER_S,
                         access_log=None)  # type: ignore[arg-type]  # None: no access log (aiohttp checks)
        self._owner = owner
        self._admitted = False
        self._idle = True
        self._deadline: asyncio.TimerHandle | None = None
        self._boundaries = _Boundaries()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner = self._owner
        if len(owner._open) >= owner.settings.max_connections:
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_raw(503, "Service Unavailable", "too many connections"))
            transport.close()
            return
        self._admitted = True
        owner._open.add(self)
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._idle and self._deadline is None:
            self._arm()
        self._boundaries.feed(data)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._disarm()
        self._owner._open.discard(self)
        super().connection_lost(exc)

    def head_received(self) -> None:
        self._idle = False
        self._disarm()

    def response_done(self) -> None:
        self._idle = True
        if self._boundaries.head_begun and self._deadline is None:
            self._arm()  # the next head (pipelined) began while this request was served

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            return _closing(_json(431, {"error": "request header line too large"}))
        return super().handle_error(request, status, exc, message)

    def _arm(self) -> None:
        timeout = self._owner.settings.header_timeout_s
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self.transport.write(_raw(408, "Request Timeout", "request head not received in time"))
        self.force_close()


def _json(status: int, obj: object, headers: Any = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type=_JSON, headers=headers)


def _closing(response: web.Response) -> web.Response:
    response.force_close()
    return response


def _response(response: Response) -> web.Response:
    status, content_type, body = response
    return web.Response(status=status, body=body, headers={"Content-Type": content_type})


def _raw(status: int, reason: str, error: str) -> bytes:
    """A whole response written before aiohttp has a request to answer."""
    body = orjson.dumps({"error": error})
    retry = f"Retry-After: {_RETRY_AFTER_S}\r\n" if status == 503 else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {_JSON}\r\nContent-Length: {len(body)}\r\n"
            f"{retry}Connection: close\r\n\r\n").encode() + body
