"""Server core: routes, refusals before the upgrade, keepalive, limits, broadcast, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

from wsagent.core.config import Settings, load_settings
from wsagent.handlers.app import MessageSession
from wsagent.transport.connections import Connection
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.router import Route, Router
from wsagent.wiring.routes import ROUTES
from wsagent.wiring.server import WsAgentServer

from .helpers import ServerFactory, local_broker, recv_json, run_events, upstream_for, ws_connect


async def server_side(server: WsAgentServer, path: str) -> Connection:
    """The server's Connection for the only client on ``path``."""
    for conn in server.manager:
        if conn.path == path:
            return conn
    raise AssertionError(f"no connection on {path}")


async def test_echo_uppercases(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws") as ws:
        await ws.send("hello, World")
        assert await ws.recv() == "HELLO, WORLD"
        await ws.send(b"\x00")
        assert (await ws.recv()).startswith("[ERROR]")


async def test_agent_streams_words_then_done(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/agent") as ws:
        await ws.send("tell me about streams sim:reasoning=0")
        words = []
        while (frame := await ws.recv()) != "[DONE]":
            words.append(frame)
        assert len(words) > 5 and all(w.endswith(" ") and " " not in w[:-1] for w in words)
        assert "".join(words).startswith("here is a simulated answer about tell me about streams")


async def test_tutorial_client_on_agent_thoughts(server: WsAgentServer) -> None:
    """A client written to the tutorial's wire protocol: send a prompt, print each event type, stop at done."""
    printed: list[str] = []
    marks = {"thinking": "💭", "action": "🔧", "observation": "👁️", "answer": "✅"}
    async with ws_connect(server, "/ws/agent-thoughts") as websocket:
        for question in ("What is 12 * (3 + 4)?", "What is machine learning?"):
            await websocket.send(question)
            while True:
                data = json.loads(await websocket.recv())
                if data["type"] == "done":
                    printed.append("done")
                    break
                assert data["type"] in marks and isinstance(data["content"], str)
                printed.append(f"{marks[data['type']]} {data['content']}")
    first = printed[:printed.index("done")]
    kinds = [line.split(" ", 1)[0] for line in first]
    assert kinds.index("💭") < kinds.index("🔧") < kinds.index("👁️") < kinds.index("✅")
    assert "🔧 calculator" in " ".join(first) and "= 84" in " ".join(first)
    assert printed.count("done") == 2  # the socket waited for, and answered, the next prompt


async def test_robust_idle_ping_and_errors_keep_socket(make_server: ServerFactory) -> None:
    server = await make_server(idle_ping=0.2)
    async with ws_connect(server, "/ws/robust") as ws:
        assert await recv_json(ws) == {"type": "ping"}
        await ws.send("fail please sim:status=400")
        error = await recv_json(ws)
        assert error["type"] == "error" and "400" in error["message"]
        assert await recv_json(ws) == {"type": "done"}
        await ws.send("and now a real question")
        kinds = []
        while (event := await recv_json(ws))["type"] != "done":
            kinds.append(event["type"])
        assert "answer" in kinds


async def test_client_addressed_personal_and_broadcast(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/alice") as alice, ws_connect(server, "/ws/bob") as bob:
        await alice.send("hello sim:tokens=5 sim:reasoning=0")
        words = []
        while (frame := await alice.recv()) != "[DONE]":
            words.append(frame)
        assert len(words) == 5
        await bob.send(json.dumps({"type": "broadcast", "content": "hi all"}))
        expected = {"type": "broadcast", "from": "bob", "content": "hi all"}
        assert await recv_json(alice) == expected
        assert await recv_json(bob) == expected


async def test_second_connection_replaces_first(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/carol") as first:
        async with ws_connect(server, "/ws/carol") as second:
            with pytest.raises(ConnectionClosed) as info:
                await first.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 4009
            await second.send("still here sim:tokens=2 sim:reasoning=0")
            assert await second.recv()


async def test_reject_policy_refuses_newcomer(make_server: ServerFactory) -> None:
    server = await make_server(client_id_policy="reject")
    async with ws_connect(server, "/ws/dave") as first:
        async with ws_connect(server, "/ws/dave") as second:
            with pytest.raises(ConnectionClosed) as info:
                await second.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 4009
        await first.send(json.dumps({"type": "broadcast", "content": "x"}))
        assert (await recv_json(first))["content"] == "x"


async def test_unknown_path_is_404(server: WsAgentServer) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server, "/nope"):
            pass
    assert info.value.response.status_code == 404


async def test_plain_http_answers(server: WsAgentServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
            body = await response.json()
            assert body["status"] == "ok" and body["connections"] == 0 and body["uptime_s"] >= 0
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "HEAD"):
            async with http.request(method, f"{base}/ws/chat") as response:
                assert response.status == 405 and response.headers["Allow"] == "GET"
        async with http.get(f"{base}/ws/chat") as response:
            assert response.status == 426
        async with http.get(f"{base}/missing") as response:
            assert response.status == 404


async def test_over_max_connections_is_503(make_server: ServerFactory) -> None:
    server = await make_server(max_connections=1)
    async with ws_connect(server, "/ws"):
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(server, "/ws"):
                pass
        assert info.value.response.status_code == 503


async def test_oversized_message_closes_1009(make_server: ServerFactory) -> None:
    server = await make_server(max_message_size=1024)
    async with ws_connect(server, "/ws") as ws:
        await ws.send("x" * 2000)
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_dead_peer_is_dropped(make_server: ServerFactory) -> None:
    """A peer that stops answering pings is failed with 1011 once its ping has waited ``ping_timeout``, and
    dropped ``close_timeout`` later (it reads nothing, so it never answers the close frame either)."""
    server = await make_server(ping_interval=0.1, ping_timeout=0.2, close_timeout=0.5)
    async with ws_connect(server, "/ws", ping_interval=None) as ws:
        conn = await server_side(server, "/ws")
        loop = asyncio.get_running_loop()
        paused = loop.time()
        ws.transport.pause_reading()  # the peer stops answering pings
        await asyncio.wait_for(conn.ws.wait_closed(), 10)
        took = loop.time() - paused
        close_sent = conn.ws.protocol.close_sent
        assert close_sent is not None and close_sent.code == 1011  # keepalive ping timeout
        assert close_sent.reason == "keepalive ping timeout"
        # The first ping at 0.1 s, its timeout at 0.3 s, then the close handshake's 0.5 s: not before 0.8 s.
        assert 0.75 <= took < 5, took
        ws.transport.abort()


class _Pinged(ClientConnection):
    """A client that notes when each ping arrives (the library answers it)."""

    pings: list[float]
    counted: asyncio.Event

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and event.opcode is Opcode.PING:
            self.pings.append(self.loop.time())
            if len(self.pings) >= 4:
                self.counted.set()
        super().process_event(event)


async def test_a_peer_that_answers_is_pinged_every_interval_and_kept(make_server: ServerFactory) -> None:
    server = await make_server(ping_interval=0.1, ping_timeout=0.05)
    async with ws_connect(server, "/ws", ping_interval=None, create_connection=_Pinged) as ws:
        assert isinstance(ws, _Pinged)
        ws.pings, ws.counted = [], asyncio.Event()
        await asyncio.wait_for(ws.counted.wait(), 10)
        gaps = [b - a for a, b in itertools.pairwise(ws.pings)]
        assert all(gap >= 0.09 for gap in gaps), gaps  # (timers gather pings due within a tenth of the interval)
        conn = await server_side(server, "/ws")
        assert conn.ws.latency > 0  # measured from its pongs, each within the 0.05 s timeout
        await ws.send("still here")
        assert await ws.recv() == "STILL HERE"


async def test_idle_connections_hold_no_task_unless_their_route_is_a_handler(make_server: ServerFactory) -> None:
    """Keepalive pings come from one timer for all connections (the library's default is a task each),
    under the default settings; a message-driven route's connection has a task only while a message of
    its is handled, and a handler's route (``/ws``) keeps its handler's."""
    server = await make_server()
    assert server.settings.ping_interval == Settings().ping_interval > 0
    before = len(asyncio.all_tasks())
    async with contextlib.AsyncExitStack() as stack:
        for path in ("/ws/chat", "/ws/ai-sdk") * 10:
            ws = await stack.enter_async_context(ws_connect(server, path, ping_interval=None))
            await ws.send('{"type": "nope", "requestId": "r1", "id": "c1"}')
            assert json.loads(await ws.recv())["type"] == "error"  # (its session answered: it is open)
        for _ in range(5):
            ws = await stack.enter_async_context(ws_connect(server, "/ws", ping_interval=None))
            await ws.send("hi")
            assert await ws.recv() == "HI"
        assert len(server.manager) == 25
        assert len(asyncio.all_tasks()) - before == 5


async def test_broadcast_with_a_client_that_never_reads(make_server: ServerFactory) -> None:
    """16 MiB of broadcasts: the readers get every message in order while the stuck client's
    queue never passes its limit and the stuck client is closed with 4008."""
    limit = 256 * 1024
    server = await make_server(outbox_bytes=limit, close_timeout=0.5)
    payload = "x" * 8192
    count = 2048
    async with ws_connect(server, "/ws/stuck", max_queue=1, compression=None) as stuck:
        stuck.transport.pause_reading()
        stuck_conn = await server_side(server, "/ws/stuck")
        readers = [await ws_connect(server, f"/ws/reader{i}", max_size=None) for i in range(3)]

        async def read_all(reader: Any) -> list[int]:
            return [json.loads(await reader.recv())["n"] for _ in range(count)]

        consumers = [asyncio.ensure_future(read_all(r)) for r in readers]
        peak = 0
        for n in range(count):
            assert local_broker(server).deliver_all(json.dumps({"n": n, "p": payload})) >= 3
            peak = max(peak, stuck_conn.outbox.queued_bytes)
            if n % 16 == 0:
                await asyncio.sleep(0)  # let the writers run between bursts, as a live server would
        for consumer in consumers:
            assert await consumer == list(range(count))
        for reader in readers:
            await reader.close()
        assert peak <= limit
        await asyncio.wait_for(stuck_conn.ws.wait_closed(), 10)
        close_sent = stuck_conn.ws.protocol.close_sent
        assert close_sent is not None and close_sent.code == 4008
        stuck.transport.abort()


async def test_graceful_shutdown_cancels_runs_and_closes_1001(make_server: ServerFactory) -> None:
    server = await make_server(drain_timeout=0.2)
    async with ws_connect(server, "/ws/chat") as ws, ws_connect(server, "/ws/agent") as words:
        await ws.send(json.dumps({"type": "run", "id": "long", "prompt": "go sim:rate=50 sim:tokens=100000"}))
        await words.send("talk sim:rate=50 sim:tokens=100000")
        assert (await recv_json(ws))["type"] == "start"
        assert await words.recv()
        stopping = asyncio.ensure_future(server.stop())
        events = await run_events(ws, "long")
        assert events[-1]["type"] == "cancelled" and events[-1]["reason"] == "server shutting down"
        assert sum(e["type"] in ("done", "error", "cancelled") for e in events) == 1
        for client in (ws, words):
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await client.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        await stopping


async def test_drain_lets_short_runs_finish(make_server: ServerFactory) -> None:
    server = await make_server(drain_timeout=10)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "short", "prompt": "go sim:rate=100 sim:tokens=20"}))
        assert (await recv_json(ws))["type"] == "start"
        stopping = asyncio.ensure_future(server.stop())
        assert (await run_events(ws, "short"))[-1]["type"] == "done"
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        await stopping


def test_router_static_wins_and_params() -> None:
    async def handler(server: object, conn: object) -> None:
        return None

    router = Router([Route("/ws/{client_id}", handler), Route("/ws/chat", handler), Route("/a/{x}/b", handler)])
    assert router.match("/ws/chat") == (router.routes[1], {})
    assert router.match("/ws/42") == (router.routes[0], {"client_id": "42"})
    assert router.match("/a/1/b") == (router.routes[2], {"x": "1"})
    assert router.match("/ws/") is None and router.match("/ws/a/b") is None and router.match("x") is None


def test_settings_flags_env_and_defaults() -> None:
    assert load_settings([], {}) == Settings()
    settings = load_settings(["--port", "9001"], {"WSAGENT_PORT": "9000", "WSAGENT_PING_INTERVAL": "5",
                                                  "WSAGENT_UPSTREAM_URL": "http://x/v1", "OPENAI_API_KEY": "k"})
    assert (settings.port, settings.ping_interval, settings.upstream_url, settings.api_key) == (
        9001, 5.0, "http://x/v1", "k")
    with pytest.raises(SystemExit):
        load_settings([], {"WSAGENT_PORT": "eighty"})


async def test_deflate_skips_tiny_messages_and_compresses_the_rest(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws") as ws:
        conn = next(iter(server.manager))
        deflate = conn.ws.protocol.extensions[0]
        assert "encoder" not in vars(deflate)  # no zlib context until something is compressed
        await ws.send("tiny")
        assert await ws.recv() == "TINY"
        assert "encoder" not in vars(deflate)
        big = "a rather long message that deflate can shrink " * 20
        await ws.send(big)
        assert await ws.recv() == big.upper()
        assert "encoder" in vars(deflate) and "decoder" in vars(deflate)
        await ws.send("tiny again")
        assert await ws.recv() == "TINY AGAIN"


async def test_a_routed_connection_keeps_no_handshake_headers(server: WsAgentServer) -> None:
    """They were a quarter of an idle connection's memory; once the connection is checked and routed,
    nothing reads them, nor the response, nor the library's subprotocol closure (see ``_forget_handshake``);
    and no connection has a logger adapter of its own. A message-driven route (/ws/chat) has read its query
    when it opened, and keeps no request of its own; a handler's route (/ws/robust) keeps the path."""
    async with ws_connect(server, "/ws/chat?on_busy=reject", additional_headers={"X-Big": "y" * 2000}) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv())["type"] == "pong"  # past the checks, in its session
        conn = await server_side(server, "/ws/chat")
        assert conn.ws.request is not None and conn.ws.response is None
        assert list(conn.ws.request.headers.raw_items()) == [] and conn.ws.request.path == "/"
        assert "select_subprotocol" not in vars(conn.ws.protocol)
        assert isinstance(conn.ws.logger, logging.Logger) and conn.ws.protocol.logger is conn.ws.logger
        await ws.send("first")
        await ws.send("second")  # refused: the query's policy was read when the connection opened
        async with asyncio.timeout(10):
            while "busy" not in await ws.recv():
                pass
    async with ws_connect(server, "/ws/robust?x=1", additional_headers={"X-Big": "y" * 2000}) as ws:
        conn = await server_side(server, "/ws/robust")
        assert conn.ws.request is not None and conn.ws.response is None
        assert list(conn.ws.request.headers.raw_items()) == []
        assert conn.ws.request.path == "/ws/robust?x=1"


async def test_the_startup_log_names_the_model_sent_upstream(make_server: ServerFactory,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsagent")
    await make_server(upstream={"model": "my-model"})
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model server: ")]
    assert "model my-model" in line


async def test_stop_ends_cleanly_when_a_client_vanishes_while_its_writes_wait(make_server: ServerFactory) -> None:
    """A client that read nothing (the server's writer waiting for it to drain) and then vanished while the
    server stopped: the loss cancelled the writer that the stop's flush was waiting for, and the stop
    raised CancelledError (found by a benchmark that stopped its server right after its slow reader left)."""
    server = await make_server(close_timeout=1, socket_send_buffer=4096)
    ws = await ws_connect(server, "/ws/chat", ping_interval=None, max_queue=1)
    ws.transport.pause_reading()
    await ws.send("long sim:rate=0 sim:tokens=200000 sim:pad=200 sim:reasoning=0")
    conn = await server_side(server, "/ws/chat")
    async with asyncio.timeout(30):
        while True:  # (the writer's wait tells nobody: polled, bounded by the timeout)
            if conn.outbox.sending_since is not None:
                break
            await asyncio.sleep(0.01)
    ws.transport.abort()
    await server.stop(drain=0)
    assert len(server.manager) == 0


class _Failing(MessageSession):
    """A session whose second message raises, as a route's bug would."""

    async def handle(self, message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("a bug in a route")
        self.conn.put(f"ok {message!s}")

    @staticmethod
    def refuse(code: str, text: str, refused: str | bytes) -> str:
        return text


async def test_a_session_that_fails_closes_its_connection_alone(sim: SimulatorServer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A message-driven route that raises: its connection is closed with 1011 and the failure logged with the
    route and the connection; another connection of the route goes on, and the server lets go of both."""
    routes = [Route("/ws/fails", session=_Failing), *ROUTES]
    settings = Settings(host="127.0.0.1", port=0)
    async with WsAgentServer(settings, upstream_for(sim), routes=routes) as server:
        async with ws_connect(server, "/ws/fails") as bad, ws_connect(server, "/ws/fails") as good:
            await bad.send("one")
            assert await bad.recv() == "ok one"
            await bad.send("boom")
            await bad.send("never handled")
            with pytest.raises(ConnectionClosed) as closed:
                await bad.recv()
            assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1011, "internal error")
            await good.send("two")
            assert await good.recv() == "ok two"
        async with asyncio.timeout(10):
            await server.manager.wait_empty()
    failures = [r for r in caplog.records if r.getMessage().startswith("handler for /ws/fails failed on")]
    assert len(failures) == 1 and failures[0].exc_info is not None


class _Uncaught(_Failing):
    """A session whose own ``on_message`` lets a failure through (an override that catches nothing)."""

    async def on_message(self, message: str | bytes) -> None:
        raise RuntimeError(f"a bug in a route, at {message!s}")


async def test_a_failure_no_session_catches_closes_its_connection_with_1011(sim: SimulatorServer,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """What a route's session lets through is the connection's failure alone: 1011, logged, and the connection
    still ends for the server."""
    settings = Settings(host="127.0.0.1", port=0)
    async with WsAgentServer(settings, upstream_for(sim), routes=[Route("/ws/bare", session=_Uncaught)]) as server:
        async with ws_connect(server, "/ws/bare") as ws:
            await ws.send("boom")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        async with asyncio.timeout(10):
            await server.manager.wait_empty()
    assert [r.exc_info is not None for r in caplog.records if r.getMessage() == "handling a message failed"] == [True]


def test_a_route_has_a_handler_or_a_session_opener() -> None:
    with pytest.raises(ValueError, match="one of them"):
        Route("/ws/none")
    with pytest.raises(ValueError, match="one of them"):
        Route("/ws/both", _Failing.handle, session=_Failing)  # type: ignore[arg-type]


async def test_every_waiter_sees_the_connections_end(make_server: ServerFactory) -> None:
    """Two waits for an empty server at once (a stop, and a test or a second stop): both end with the last
    connection, and one waiter cancelled leaves the other waiting."""
    server = await make_server()
    ws = await ws_connect(server, "/ws/chat")
    first = asyncio.ensure_future(server.manager.wait_empty())
    second = asyncio.ensure_future(server.manager.wait_empty())
    cancelled = asyncio.ensure_future(server.manager.wait_empty())
    await asyncio.sleep(0)  # (one turn of the loop: each waiter takes its first step, and waits on the one future)
    cancelled.cancel()
    await ws.close()
    async with asyncio.timeout(10):
        await asyncio.gather(first, second)
    assert cancelled.cancelled() and len(server.manager) == 0


async def test_messages_sent_with_the_handshake_are_handled_in_order(make_server: ServerFactory) -> None:
    """A client that sends its first messages in the same write as its opening handshake: they arrive
    before the connection is checked and its session exists, and every one is handled, in order."""
    server = await make_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        frames = b"".join(Frame(Opcode.TEXT, json.dumps({"type": "ping", "id": f"p{n}"}).encode()).serialize(
            mask=True, extensions=[]) for n in range(5))
        writer.write(b"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + frames)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            replies = []
            for _ in range(5):
                first, size = await reader.readexactly(2)
                assert first == 0x81 and size < 126  # a whole text frame, unmasked, short
                replies.append(json.loads(await reader.readexactly(size)))
    finally:
        writer.close()
    assert [(r["type"], r.get("id")) for r in replies] == [("pong", f"p{n}") for n in range(5)]


async def test_a_stop_closes_idle_message_driven_connections(make_server: ServerFactory) -> None:
    """No task waits on an idle /ws/chat or /ws/ai-sdk connection: a stop still closes each with 1001 and
    ends only once the server has let go of them."""
    server = await make_server()
    clients = [await ws_connect(server, path) for path in ("/ws/chat", "/ws/ai-sdk", "/ws/chat")]
    try:
        assert len(server.manager) == 3
        await server.stop(drain=0)
        assert len(server.manager) == 0
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1001
    finally:
        for ws in clients:
            ws.transport.abort()


async def test_a_closing_connections_messages_are_not_handled(make_server: ServerFactory,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Once the server has begun to close a connection, a message that still arrives starts nothing: no reply,
    no run; the close follows with its code."""
    caplog.set_level(logging.INFO, logger="wsagent")
    server = await make_server()
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "ping", "id": "early"}))
        assert json.loads(await ws.recv())["id"] == "early"
        conn = await server_side(server, "/ws/chat")
        conn.close_soon(4008, "slow client")
        await ws.send(json.dumps({"type": "ping", "id": "late"}))
        await ws.send(json.dumps({"type": "run", "id": "late-run", "prompt": "hello"}))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
    assert not [r for r in caplog.records if r.getMessage().startswith("run late-run")]


def _handshake(path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def _masked(opcode: Opcode, data: bytes) -> bytes:
    return Frame(opcode, data).serialize(mask=True, extensions=[])


async def test_runs_asked_for_just_before_the_close_frame_are_released_with_it(make_server: ServerFactory,
                                                                               sim: SimulatorServer) -> None:
    """Two runs and a close frame in one write, the TCP connection kept open (found from outside): the close frame
    was read first, released what the connection watched (nothing yet), and the runs then started for a client
    that had left; they streamed to the end, or until its TCP connection closed. A run started after its client's
    close frame is released as one started before it: with no resume grace, cancelled at once (here before its
    request upstream was made)."""
    server = await make_server(close_timeout=30)
    stats = sim.simulator.stats
    ended = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("run late1 end"):
                ended.set()

    watch = Watch()
    app_log = logging.getLogger("wsagent.app")
    level = app_log.level
    app_log.addHandler(watch)
    app_log.setLevel(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        runs = b"".join(_masked(Opcode.TEXT, json.dumps({"type": "run", "id": f"late{n}", "prompt":
                                                         "long sim:tokens=2000 sim:rate=100"}).encode())
                        for n in range(2))
        writer.write(_handshake("/ws/chat"))
        async with asyncio.timeout(10):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            writer.write(runs + _masked(Opcode.CLOSE, b"\x03\xe8"))
            await ended.wait()  # (the server tells a client that left nothing: its log does)
        assert server.metrics.runs["cancelled"] == 2 and stats.active == 0
        assert not writer.is_closing()  # released while its socket is still open
    finally:
        writer.close()
        app_log.removeHandler(watch)
        app_log.setLevel(level)


async def test_a_client_that_keeps_tcp_open_after_the_close_handshake_is_dropped(make_server: ServerFactory) -> None:
    """A client that sends its close frame and never closes its TCP connection (found from outside) held the
    connection for as long as it liked, on every route; it is dropped ``close_timeout`` after its close frame."""
    server = await make_server(close_timeout=0.5)
    for path in ("/ws/chat", "/ws/ai-sdk", "/ws"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(_handshake(path))
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            assert len(server.manager) == 1
            loop = asyncio.get_running_loop()
            sent = loop.time()
            writer.write(_masked(Opcode.CLOSE, b"\x03\xe8"))
            async with asyncio.timeout(10):
                await server.manager.wait_empty()
            held = loop.time() - sent
            assert 0.4 < held < 2.0, (path, held)  # (its close_timeout: 0.5 s)
        finally:
            writer.close()
