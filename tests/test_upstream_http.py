"""The model server's connections (``wsagent.upstream.http``) against real servers on loopback: kept and reused,
replaced when the server closed them, held back by a slow reader, over TLS, and every broken answer a clear error."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from wsagent.core.chunks import TextDelta
from wsagent.core.errors import UpstreamError
from wsagent.core.http1 import request_head
from wsagent.upstream import http
from wsagent.upstream.model import UpstreamClient, UpstreamConfig

ANSWER = (b'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
          b"data: [DONE]\n\n")
CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Upstream:
    """A model server written by hand, byte by byte: ``handler(reader, writer, n)`` for its ``n``-th connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed: list[float] = []  # when each connection was seen to close, by the loop's clock
        self.tasks: set[asyncio.Task[None]] = set()
        self.gone = asyncio.Event()  # a connection closed

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer, self.connections)
            await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.append(asyncio.get_running_loop().time())
            self.gone.set()
            writer.close()


async def request(reader: asyncio.StreamReader) -> bytes:
    """One request's body (its head read and checked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and b"\r\nHost: 127.0.0.1:" in head
    length = int(head.partition(b"Content-Length: ")[2].partition(b"\r\n")[0])
    return await reader.readexactly(length)


async def answer(writer: asyncio.StreamWriter) -> None:
    writer.write(CHUNKED + b"%x\r\n%s\r\n0\r\n\r\n" % (len(ANSWER), ANSWER))
    await writer.drain()


@contextlib.asynccontextmanager
async def upstream(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[Upstream, str]]:
    server = Upstream(handler)
    listening = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=tls)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield server, f"{'https' if tls else 'http'}://127.0.0.1:{port}/v1"
    finally:
        listening.close()
        for task in server.tasks:
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        await listening.wait_closed()


async def texts(client: UpstreamClient) -> str:
    return "".join([event.text async for event in client.stream([{"role": "user", "content": "hi"}])
                    if isinstance(event, TextDelta)])


async def refused(url: str, **config: Any) -> UpstreamError:
    """The error a prompt to the model server at ``url`` ends with (a client of its own, closed after)."""
    client = UpstreamClient(UpstreamConfig(base_url=url, **config))
    try:
        with pytest.raises(UpstreamError) as info:
            await asyncio.wait_for(texts(client), 10)
    finally:
        await client.close()
    return info.value


async def test_a_connection_is_kept_and_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for _ in range(3):
            await request(reader)
            await answer(writer)

    async with upstream(handler) as (server, url):
        client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0))
        try:
            assert [await texts(client) for _ in range(3)] == ["ok"] * 3
        finally:
            await client.close()
    assert server.connections == 1


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_kept_connection_the_server_closed_goes_again_at_once_if_retries_allow(retries: int) -> None:
    """The keep-alive race: the server closes an idle connection (its keep-alive timeout) as a request is
    written on it. No byte of an answer came: the request goes again on a new connection, at once (no backoff),
    if ``max_retries`` allows; a POST is not sent twice behind the caller's back (a helper saw the pool resend
    one the server had read, as aiohttp's client never did)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        if n == 1:
            await answer(writer)
            await request(reader)  # the second request, on the kept connection: closed unanswered
            writer.close()
        else:
            await answer(writer)

    async with upstream(handler) as (server, url):
        client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=retries, backoff_base=30))
        loop = asyncio.get_running_loop()
        try:
            assert await texts(client) == "ok"
            started = loop.time()
            if retries:
                assert await texts(client) == "ok"
            else:
                with pytest.raises(UpstreamError) as info:
                    await texts(client)
                assert info.value.code == "upstream_connection" and info.value.message.endswith(
                    "the model server closed the connection before answering")
        finally:
            await client.close()
    assert loop.time() - started < 1.0  # (a backoff would have been up to 30 s)
    assert server.connections == 1 + retries


async def test_a_kept_connection_that_stays_silent_times_out_at_the_first_byte_timeout() -> None:
    """The wait for the head was --connect-timeout plus --first-byte-timeout, even on a kept connection."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        await answer(writer)
        await request(reader)  # and nothing more

    async with upstream(handler) as (_, url):
        client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0, connect_timeout=5, first_byte_timeout=0.3))
        loop = asyncio.get_running_loop()
        try:
            assert await texts(client) == "ok"
            started = loop.time()
            with pytest.raises(UpstreamError) as info:
                await texts(client)
        finally:
            await client.close()
    assert 0.3 <= loop.time() - started < 1.0
    assert info.value.code == "upstream_timeout"
    assert info.value.message == "the model server did not answer within 0.3 s"


async def test_what_came_before_a_break_in_the_framing_is_delivered_first() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        token = b'data: {"choices":[{"index":0,"delta":{"content":"A"},"finish_reason":null}]}\n\n'
        writer.write(CHUNKED + b"%x\r\n%s\r\nzz\r\n" % (len(token), token))  # one write, one read
        await writer.drain()

    async with upstream(handler) as (_, url):
        client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0))
        got: list[str] = []
        try:
            with pytest.raises(UpstreamError) as info:
                async for event in client.stream([{"role": "user", "content": "hi"}]):
                    if isinstance(event, TextDelta):
                        got.append(event.text)
        finally:
            await client.close()
    assert got == ["A"] and info.value.code == "upstream_protocol"


async def test_a_new_connection_closed_unanswered_is_an_error_and_no_extra_attempt() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        writer.close()

    async with upstream(handler) as (server, url):
        error = await refused(url, max_retries=1, backoff_base=0.01)
    assert error.code == "upstream_connection" and error.retryable
    assert error.message.startswith(f"cannot reach the model server at {url[7:-3]}: the model server closed "
                                         "the connection before answering")
    assert server.connections == 2  # the first attempt and max_retries=1, nothing hidden


@pytest.mark.parametrize("reply, code, says", [
    (b"HTTP/1.1 200 OK\r\nnot a header\r\n\r\n", "upstream_protocol", "did not answer in HTTP/1.1: not a header"),
    (CHUNKED + b"5\r\ndata:XX\r\n", "upstream_protocol", "broke HTTP/1.1: a chunk's data did not end"),
    (CHUNKED + b"zz\r\n", "upstream_protocol", "broke HTTP/1.1: a chunk size that is not hexadecimal"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
     % (len(gzip.compress(ANSWER)), gzip.compress(ANSWER)), "upstream_protocol", "compressed its answer (gzip)"),
    (CHUNKED + b"100\r\ndata: {", "upstream_truncated", "closed the stream before it ended"),
])
async def test_a_broken_answer_is_a_clear_error(reply: bytes, code: str, says: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    async with upstream(handler) as (_, url):
        error = await refused(url, max_retries=0)
    assert error.code == code and says in error.message


async def test_an_error_answer_whose_body_stalls_ends_at_the_first_byte_timeout() -> None:
    """A 503 whose body stopped after its head held the run for ever: the error body was read without a
    timeout (with aiohttp's client too)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100000\r\n\r\n{")
        await writer.drain()

    async with upstream(handler) as (_, url):
        loop = asyncio.get_running_loop()
        started = loop.time()
        error = await refused(url, max_retries=0, first_byte_timeout=0.3, read_timeout=5)
    assert 0.3 <= loop.time() - started < 1.0
    assert error.code == "upstream_unavailable" and error.message == "upstream HTTP 503: {"  # (what came)


@pytest.mark.parametrize("key, sent", [(None, b"Authorization: Basic dXNlcjpwIHc=\r\n"),
                                       ("sk-1", b"Authorization: Bearer sk-1\r\n")])
async def test_credentials_in_the_url_are_sent_as_basic_auth_unless_there_is_a_key(key: str | None,
                                                                                 sent: bytes) -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(int(heads[-1].partition(b"Content-Length: ")[2].partition(b"\r\n")[0]))
        await answer(writer)

    async with upstream(handler) as (_, url):
        client = UpstreamClient(UpstreamConfig(base_url=url.replace("http://", "http://user:p%20w@"), api_key=key,
                                               max_retries=0))
        try:
            assert await texts(client) == "ok"
        finally:
            await client.close()
    assert sent in heads[0] and heads[0].count(b"Authorization") == 1


async def test_a_redirect_is_not_followed_and_says_where_it_points() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        writer.write(b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://models.example/v1/chat/completions\r\n"
                     b"Content-Length: 0\r\n\r\n")
        await writer.drain()

    async with upstream(handler) as (server, url):
        error = await refused(url, max_retries=0)
    assert error.code == "upstream_bad_request" and server.connections == 1
    assert error.message == ("upstream HTTP 308: no body (redirected to https://models.example/v1/chat/completions:"
                                  " make that the upstream URL)")


async def test_an_answer_sized_by_content_length_and_one_ended_by_closing() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            for close in (b"", b"Connection: close\r\n"):  # (the second answer says the connection ends with it)
                await request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n%sContent-Length: %d\r\n\r\n%s"
                             % (close, len(ANSWER), ANSWER))
                await writer.drain()
            writer.close()
        else:
            await request(reader)
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + ANSWER)
            await writer.drain()
            writer.close()

    async with upstream(handler) as (server, url):
        client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0))
        try:
            assert [await texts(client), await texts(client)] == ["ok", "ok"]
            assert server.connections == 1
            assert [await texts(client), await texts(client)] == ["ok", "ok"]  # (an HTTP/1.0 answer's connection
        finally:                                                             # is not kept)
            await client.close()
    assert server.connections == 3


@pytest.mark.parametrize("comes", [True, False])
async def test_a_connection_released_before_its_last_bytes_waits_for_them(comes: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer's end (``[DONE]``) came before the chunked body's: 3 in 50 one-token answers. Its connection
    is kept once the last bytes come (aiohttp's client closed it, and the next request paid a new one), and
    closed ``DRAIN_WAIT`` after its release if they do not."""
    monkeypatch.setattr(http, "DRAIN_WAIT", 0.3)
    released = asyncio.Event()
    kept = asyncio.Event()  # the connection is back in the pool (the pool's own keep, watched)
    ended: list[float] = []
    keep = http.Pool.keep

    def watched(pool: http.Pool, conn: http._Connection) -> None:
        keep(pool, conn)
        if conn.draining is None and not conn.busy and not conn.lost:
            kept.set()

    monkeypatch.setattr(http.Pool, "keep", watched)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        writer.write(CHUNKED + b"%x\r\n%s\r\n" % (len(ANSWER), ANSWER))
        await writer.drain()
        await released.wait()
        if comes:
            writer.write(b"0\r\n\r\n")
            await request(reader)
            await answer(writer)

    async with upstream(handler) as (server, url):
        client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0))
        loop = asyncio.get_running_loop()
        try:
            assert await texts(client) == "ok"
            at = loop.time()
            released.set()
            if comes:
                await asyncio.wait_for(kept.wait(), 5)
                assert await texts(client) == "ok"
                assert server.connections == 1
            else:
                await asyncio.wait_for(server.gone.wait(), 5)
                ended.append(server.closed[0] - at)
        finally:
            await client.close()
    if not comes:
        assert 0.3 <= ended[0] < 1.0


async def test_a_slow_reader_holds_the_model_server_back() -> None:
    """Unread bytes past HIGH_WATER stop the socket being read: the server's writes wait (TCP flow control)."""
    sent = 0
    piece = b"data: " + b"x" * 65536 + b"\n\n"
    stalled = asyncio.Event()  # the kernel's buffers are full: the server's own write buffer grows

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal sent
        await request(reader)
        writer.write(CHUNKED)
        for _ in range(400):  # 26 MB, if nothing held it back
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
            if writer.transport.get_write_buffer_size() > 1_000_000:
                stalled.set()
                await writer.drain()
        writer.write(b"0\r\n\r\n")

    async with upstream(handler) as (_, url):
        pool = http.Pool(url, connect_timeout=5, receive_buffer=65536)
        response = await pool.request(request_head("POST", "/v1/chat/completions", pool.authority, {})
                                      + b"0\r\n\r\n")
        conn = response._conn
        assert conn is not None
        await asyncio.wait_for(stalled.wait(), 10)
        assert conn.paused and conn.size <= http.HIGH_WATER + 262144  # (and one read: 256 KiB at most)
        held = sent
        received = 0
        while data := await response.read(65536):
            received += len(data)
        assert held < 10_000_000 and received == sent == 400 * len(piece)
        response.release()
        pool.close()


def certificate(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


async def test_tls_with_a_trusted_certificate_and_a_clear_error_without(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused certificate is not tried again (a newcomer's client was told ``retryable`` and wsagent tried it
    three times), and its error says how to trust a private CA."""
    key, cert = certificate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        await answer(writer)

    async with upstream(handler, tls) as (_, url):
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        untrusted = UpstreamClient(UpstreamConfig(base_url=url, max_retries=2, backoff_base=0.01))
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # as a user trusts a private CA
        trusted = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0))
        try:
            assert await texts(trusted) == "ok"
            with pytest.raises(UpstreamError) as info:
                await texts(untrusted)
        finally:
            await trusted.close()
            await untrusted.close()
    assert info.value.code == "upstream_connection" and not info.value.retryable  # (a retry would not help)
    assert info.value.message == (f"cannot connect to the model server at {url[8:-3]} "
                                  "(TLS: self-signed certificate; trust its CA with SSL_CERT_FILE)")


async def test_an_idle_connection_is_closed_after_keep_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "KEEP_IDLE", 0.3)
    answered: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await request(reader)
        await answer(writer)
        answered.append(asyncio.get_running_loop().time())

    async with upstream(handler) as (server, url):
        client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0))
        try:
            assert await texts(client) == "ok"
            await asyncio.wait_for(server.gone.wait(), 5)
        finally:
            await client.close()
    assert server.closed and 0.3 <= server.closed[0] - answered[0] < 1.0
