"""The HTTP endpoint on a real loopback socket: slow clients, the connection cap, size limits and
the bearer token of POST /predict. The engine behind it is a stub; test_engine_stream.py drives
the same routes through a real engine."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from engine_helpers import wait_until
from prometheus_client import CollectorRegistry, Counter

from fraudactors.engine.http import MAX_BODY, METRICS_CONTENT_TYPE, HttpServer, Response
from fraudactors.settings import load_settings

TOKEN = "payments-0123456789abcdef"
# Far above every timeout set in these tests: how long "the server closes it" may take.
GENEROUS_S = 10.0
_JSON = "application/json"


class StubEngine:
    def healthz(self) -> Response:
        return 200, _JSON, b'{"status":"alive"}'

    def readyz(self) -> Response:
        return 503, _JSON, b'{"ready":false}'

    async def predict(self, body: bytes) -> Response:
        if body == b"busy":
            return 503, _JSON, b'{"error":"feature store busy"}'
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return 422, _JSON, b'{"error":"body is not JSON"}'
        return 200, _JSON, orjson.dumps({"scored": obj})


@contextlib.asynccontextmanager
async def serving(**http: Any) -> AsyncIterator[HttpServer]:
    settings = load_settings(env={}, overrides={"http": {"port": 0, **http}})
    registry = CollectorRegistry()
    Counter("fraudactors_test_requests", "Requests of this test.", registry=registry).inc()
    server = HttpServer(settings.http, registry, StubEngine())
    started = asyncio.get_running_loop().create_future()

    class Status:
        def started(self, value: Any = None) -> None:
            started.set_result(value)

    task = asyncio.create_task(server.run(Status()))
    await asyncio.wait([started, task], timeout=GENEROUS_S, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(GENEROUS_S):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.strip().split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ")[1]), headers, body


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await read_response(reader)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent before it closed the connection (fails if it keeps it open)."""
    async with asyncio.timeout(GENEROUS_S):
        return await reader.read()


# -- slow clients ------------------------------------------------------------------------------------
# Each timeout test runs its client against two servers at once, one with the timeout under test
# (SHORT_S) and one with a longer one (LONG_S): the connection is closed with a 408 no sooner
# than the server's own setting, and the short server's before the long server's setting has
# run out -- so it is the setting that closes it (not a constant, another unit or another timer),
# without a bound on wall time.
SHORT_S, LONG_S = 0.2, 1.5


async def close_after(port: int, client: Any, prelude: Any = None) -> tuple[float, bytes]:
    """Run ``client(reader, writer)`` until the server closes the connection: the seconds that
    took and everything the server sent (after ``prelude(reader, writer)``, if given)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if prelude is not None:
        await prelude(reader, writer)
    start = loop.time()
    talking = asyncio.create_task(client(reader, writer))
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(GENEROUS_S):  # fails if the server keeps it open
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                talking.cancel()  # the server answered: the client stops sending
        return loop.time() - start, b"".join(chunks)
    except ConnectionResetError:
        # A client still sending when the server closed gets a reset, which can discard the
        # answer not read yet: the close is what was waited for, its answer is unknown.
        return loop.time() - start, b"".join(chunks) or RESET
    finally:
        talking.cancel()
        await asyncio.gather(talking, return_exceptions=True)
        writer.close()


RESET = b"(reset by the server)"


async def assert_closed_at_the_timeout(client: Any, setting: str, prelude: Any = None, sending: bool = False) -> None:
    """``sending``: the client is still sending when the server closes (its answer may be lost
    to the reset that brings)."""
    async with serving(**{setting: SHORT_S}) as short, serving(**{setting: LONG_S}) as long:
        (t_short, sent_short), (t_long, sent_long) = await asyncio.gather(
            close_after(short.port, client, prelude), close_after(long.port, client, prelude))
    for sent in (sent_short, sent_long):
        assert sent.startswith(b"HTTP/1.1 408 ") or (sending and sent == RESET), sent[:80]
    slack = 0.05  # the timer's resolution
    assert SHORT_S - slack <= t_short < LONG_S <= t_long + slack, (t_short, t_long)


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    await assert_closed_at_the_timeout(silent, "header_timeout_s")


async def test_a_client_trickling_its_headers_is_cut_off_at_the_header_timeout() -> None:
    head = request("GET", "/healthz", X_Padding="p" * 400)[:-2]  # never the blank line

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in head:  # the slow client itself: a byte every 20 ms, 8 s in all
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)
        raise AssertionError("the whole head went out: the server never cut the client off")

    await assert_closed_at_the_timeout(trickle, "header_timeout_s", sending=True)


async def test_the_next_request_head_on_a_kept_alive_connection_has_the_header_timeout_too() -> None:
    async def first_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request("GET", "/healthz"))
        assert (await read_response(reader))[0] == 200

    async def second_head_unfinished(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request("GET", "/healthz")[:-2])  # the next head, never finished
        await asyncio.Event().wait()

    await assert_closed_at_the_timeout(second_head_unfinished, "header_timeout_s", prelude=first_request)


@pytest.mark.parametrize("first", [request("GET", "/healthz"),
                                   request("POST", "/predict", b'{"amount": 1}', Content_Type=_JSON)])
async def test_a_head_pipelined_behind_a_request_has_the_header_timeout_from_the_response(first: bytes) -> None:
    """A request and the start of the next head in one write: the partial head waits in aiohttp's
    parser while the first is served, and no later byte comes to start its deadline. It gets one
    from the response (else the connection is held until the 75 s keep-alive timeout)."""
    async def pipelined(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(first + request("GET", "/healthz")[:-2])
        await asyncio.Event().wait()

    async with serving(header_timeout_s=SHORT_S) as short, serving(header_timeout_s=LONG_S) as long:
        (t_short, sent_short), (t_long, sent_long) = await asyncio.gather(
            close_after(short.port, pipelined), close_after(long.port, pipelined))
    for sent in (sent_short, sent_long):
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", sent) == [b"200", b"408"], sent[:300]
    assert SHORT_S - 0.05 <= t_short < LONG_S <= t_long + 0.05, (t_short, t_long)


@pytest.mark.parametrize("first", [
    request("GET", "/healthz"),
    # the body and a stray CRLF after it are not the start of a next head: no deadline
    request("POST", "/predict", b'{"amount": 1}', Content_Type=_JSON) + b"\r\n",
], ids=["get", "post-and-empty-line"])
async def test_a_kept_alive_connection_may_idle_longer_than_the_header_timeout(first: bytes) -> None:
    async with serving(header_timeout_s=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(first)
            assert (await read_response(reader))[0] == 200
            await asyncio.sleep(1.0)  # idle well past the header timeout: nothing to wait for but time
            writer.write(request("GET", "/healthz"))
            assert (await read_response(reader))[0] == 200
        finally:
            writer.close()


async def test_a_client_that_promises_a_body_and_never_sends_it_gets_408_and_is_closed() -> None:
    async def no_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 200\r\n\r\n{\"transaction")
        await asyncio.Event().wait()

    await assert_closed_at_the_timeout(no_body, "body_timeout_s")
    async with serving(body_timeout_s=SHORT_S) as server:
        _, sent = await close_after(server.port, no_body)
    assert b"body not received" in sent




# -- the connection cap ------------------------------------------------------------------------------
async def test_one_connection_over_the_cap_gets_503_and_a_freed_slot_is_reused() -> None:
    async with serving(max_connections=2) as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        try:
            for reader, writer in held:  # both admitted, and kept alive
                writer.write(request("GET", "/healthz"))
                assert (await read_response(reader))[0] == 200
            assert server.connections == 2
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                sent = await closed_by_server(reader)
            finally:
                writer.close()
            assert sent.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nRetry-After: 1\r\n" in sent.split(b"\r\n\r\n", 1)[0] + b"\r\n", sent
            held[0][1].close()
            await wait_until(lambda: server.connections == 1, timeout_s=GENEROUS_S)
            assert (await exchange(server.port, request("GET", "/healthz")))[0] == 200
        finally:
            for _, writer in held:
                writer.close()


# -- sizes -------------------------------------------------------------------------------------------
async def test_an_oversized_header_line_gets_431() -> None:
    async with serving() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(request("GET", "/healthz", X_Big="b" * 20_000))
            status, _, body = await read_response(reader)
            assert status == 431, body
            assert await closed_by_server(reader) == b""
        finally:
            writer.close()
        assert (await exchange(server.port, request("GET", "/healthz", X_Big="b" * 8_000)))[0] == 200


async def test_a_body_over_one_mebibyte_gets_413_and_one_of_exactly_one_mebibyte_does_not() -> None:
    async with serving() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(request("POST", "/predict", b"x" * (MAX_BODY + 1)))
            status, headers, body = await read_response(reader)
            assert status == 413, body
            assert headers.get("connection") == "close"
            assert await closed_by_server(reader) == b"", "the unread body is never parsed as a request"
        finally:
            writer.close()
        chunked = (b"POST /predict HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n" % (MAX_BODY + 1) + b"x" * (MAX_BODY + 1) + b"\r\n0\r\n\r\n")
        status, _, body = await exchange(server.port, chunked)
        assert status == 413, body
        status, _, body = await exchange(server.port, request("POST", "/predict", b"x" * MAX_BODY))
        assert status == 422, body


# -- routes and the token ----------------------------------------------------------------------------
async def test_routes_answer_as_before_and_metrics_are_the_registry_in_text_format() -> None:
    async with serving() as server:
        status, headers, body = await exchange(server.port, request("GET", "/metrics"))
        assert status == 200
        assert headers["content-type"] == METRICS_CONTENT_TYPE
        assert "fraudactors_test_requests_total 1.0" in body.decode()
        assert (await exchange(server.port, request("GET", "/healthz")))[0] == 200
        assert (await exchange(server.port, request("GET", "/readyz")))[0] == 503
        status, _, body = await exchange(server.port, request("POST", "/predict", b'{"amount": 1}'))
        assert (status, orjson.loads(body)) == (200, {"scored": {"amount": 1}})
        assert (await exchange(server.port, request("POST", "/predict", b"not json")))[0] == 422
        status, headers, body = await exchange(server.port, request("GET", "/predict"))
        assert (status, headers["allow"]) == (405, "POST") and orjson.loads(body)["error"]
        status, _, body = await exchange(server.port, request("GET", "/nowhere"))
        assert status == 404 and orjson.loads(body)["error"]


async def test_a_503_of_predict_tells_the_caller_when_to_retry() -> None:
    """/predict's 503s are passing (the store's reads busy, models loading): Retry-After says so."""
    async with serving() as server:
        status, headers, body = await exchange(server.port, request("POST", "/predict", b"busy"))
        assert (status, headers["retry-after"], orjson.loads(body)) == (503, "1", {"error": "feature store busy"})
        status, headers, _ = await exchange(server.port, request("POST", "/predict", b'{"amount": 1}'))
        assert status == 200 and "retry-after" not in headers


async def test_predict_needs_the_bearer_token_when_one_is_configured_and_the_probes_do_not() -> None:
    body = b'{"amount": 1}'
    async with serving(predict_token=TOKEN) as server:
        status, headers, _ = await exchange(server.port, request("POST", "/predict", body))
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer ")
        for wrong in ("Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x", "Basic " + TOKEN, TOKEN):
            status, headers, _ = await exchange(server.port, request("POST", "/predict", body, Authorization=wrong))
            assert status == 401, wrong
            assert 'error="invalid_token"' in headers["www-authenticate"]
        status, _, answer = await exchange(server.port,
                                           request("POST", "/predict", body, Authorization=f"Bearer {TOKEN}"))
        assert (status, orjson.loads(answer)) == (200, {"scored": {"amount": 1}})
        for path, expected in (("/healthz", 200), ("/readyz", 503), ("/metrics", 200)):
            assert (await exchange(server.port, request("GET", path)))[0] == expected, path


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_request_boundaries_are_found_however_the_bytes_are_split(chunk: int) -> None:
    from fraudactors.engine.http import _Boundaries

    stream = (request("POST", "/predict", b'{"amount": 1}\r\n\r\n', Content_Type=_JSON) + b"\r\n"
              + request("GET", "/healthz") + request("GET", "/readyz")[:-4])
    boundaries = _Boundaries()
    for i in range(0, len(stream), chunk):
        boundaries.feed(stream[i:i + chunk])
    # the body's own blank lines are body, the CRLF after it begins nothing, the third head is open
    assert boundaries.head_begun and not boundaries.lost
    done = _Boundaries()
    done.feed(stream[:-len(request("GET", "/readyz")[:-4])])
    assert not done.head_begun
    chunked = _Boundaries()
    chunked.feed(b"POST /predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /")
    assert chunked.lost and not chunked.head_begun
