"""What broke when wsagent was attacked, each reproduced before its fix."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wsagent.core.config import Settings, load_settings
from wsagent.core.errors import UpstreamError
from wsagent.core.tools import MAX_BITS, ToolBox, calculator, tool
from wsagent.upstream.model import UpstreamClient, UpstreamConfig
from wsagent.upstream.simulator import MAX_CHARS, MAX_TOKENS
from wsagent.upstream.simulator.plan import cap
from wsagent.wiring.server import WsAgentServer

from .helpers import (
    SECRET,
    ServerFactory,
    local_broker,
    recv_json,
    run_events,
    run_request,
    text_reply,
    token,
    ws_connect,
)


@pytest.mark.parametrize("expression", ["((9**99)**999)**99", "((9**99)**999)**999", "(10**999)**5", "9**999*9**999"])
async def test_a_huge_calculation_is_refused_before_it_runs(expression: str) -> None:
    """``((9**99)**999)**99`` froze every stream for 7 s; one more ``9`` ran for over a minute."""
    observation, is_error = await ToolBox([calculator]).call("calculator", json.dumps({"expression": expression}))
    assert is_error and f"over {MAX_BITS} bits" in observation


async def test_the_largest_allowed_result_is_computed() -> None:
    expression = "2**1000 * 2**1000 * 2**1000 * 2**1000"
    observation, is_error = await ToolBox([calculator]).call("calculator", json.dumps({"expression": expression}))
    assert not is_error and observation.endswith(str(2**4000))


async def test_a_tool_that_overruns_its_time_is_stopped_and_reported() -> None:
    @tool
    async def hang() -> str:
        """Never answers."""
        await asyncio.Event().wait()
        return ""

    loop = asyncio.get_running_loop()
    started = loop.time()
    observation, is_error = await ToolBox([hang], timeout=0.2).call("hang", "{}")
    elapsed = loop.time() - started
    assert is_error and "took longer than 0.2s" in observation
    assert 0.2 <= elapsed < 1.0  # fired at its limit, not at some other deadline


async def test_the_built_in_simulator_ignores_fault_switches_unless_asked() -> None:
    """In the default configuration anyone could send ``sim:tokens=20000 sim:pad=20000`` (RSS 49 to
    438 MiB, another stream paused for 1.6 s)."""
    server = await WsAgentServer(Settings(host="127.0.0.1", port=0, sim_rate=0)).start()
    try:
        async with ws_connect(server, "/ws/chat") as ws:
            await ws.send("a sim:tokens=20000 sim:pad=20000 sim:status=500")
            reply = await text_reply(ws)
    finally:
        await server.stop(drain=0)
    assert reply.endswith("\n[DONE]") and len(reply.split()) < 60
    assert "sim:tokens=20000" in reply  # the words were just words: the answer is about them


def test_switches_are_capped_even_when_honoured() -> None:
    capped = cap({"tokens": "20000000", "pad": "20000", "long": str(10**9)})
    assert int(capped["tokens"]) == MAX_TOKENS
    assert int(capped["tokens"]) * int(capped["pad"]) <= MAX_CHARS and int(capped["long"]) == MAX_CHARS


async def handshake(server: WsAgentServer, headers: list[tuple[str, str]], path: str = "/ws") -> bytes:
    """A raw upgrade request with exactly these headers; the first line of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    lines += [f"{name}: {value}" for name, value in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    status = await reader.readline()
    writer.close()
    return status


@pytest.mark.parametrize("header", ["Origin", "Upgrade", "Authorization", "Host", "Sec-WebSocket-Key"])
async def test_a_duplicate_header_is_a_plain_400(server: WsAgentServer, header: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Two ``Origin``, ``Upgrade`` or ``Authorization`` headers gave HTTP 500 or close 1011, with a traceback."""
    value = {"Origin": f"http://127.0.0.1:{server.port}", "Upgrade": "websocket", "Authorization": "Bearer x",
             "Host": "127.0.0.1", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}[header]
    extra = [(header, value)] * (1 if header in ("Upgrade", "Host", "Sec-WebSocket-Key") else 2)
    with caplog.at_level(logging.INFO):
        status = await handshake(server, extra)
    assert status.startswith(b"HTTP/1.1 400")
    assert not any(r.exc_info for r in caplog.records)


async def test_the_origin_check_never_trusts_the_host_header(server: WsAgentServer) -> None:
    """A DNS-rebinding page sends Host and Origin both of its own name: they matched, so it got in."""
    evil = f"evil.example:{server.port}"
    status = await handshake(server, [("Origin", f"http://{evil}")])
    assert status.startswith(b"HTTP/1.1 403")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(f"GET /ws HTTP/1.1\r\nHost: {evil}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 f"Origin: http://{evil}\r\n\r\n".encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 403")
    writer.close()


async def test_the_server_s_own_page_may_always_connect(make_server: ServerFactory,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Allowing another origin once locked wsagent's own page at ``/`` out; a refusal was never logged."""
    server = await make_server(allowed_origins="http://localhost:9999")
    for origin in (f"http://127.0.0.1:{server.port}", f"http://localhost:{server.port}"):
        async with ws_connect(server, "/ws", origin=origin) as ws:
            await ws.send("mine")
            assert await ws.recv() == "MINE"
    with caplog.at_level(logging.INFO, "wsagent"):
        for origin in ("null", f"http://127.0.0.1:{server.port + 1}"):
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(server, "/ws", origin=origin):
                    pass
            assert info.value.response.status_code == 403
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 2 and "origin null" in refused[0]


async def test_in_band_auth_passes_the_handshake_s_checks(make_server: ServerFactory) -> None:
    """Five sockets that authenticated in band were all let in as one user with a limit of 2, and
    a token whose ``routes`` left out the route was accepted by refresh."""
    server = await make_server(jwt_secret=SECRET, max_connections_per_user=2)
    narrow = token({"routes": ["/ws/agent"]})
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "auth", "token": narrow}))
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["code"] == "forbidden"
    sockets = [await ws_connect(server, "/ws/chat") for _ in range(3)]
    replies = []
    for ws in sockets:
        await ws.send(json.dumps({"type": "auth", "token": token()}))
        replies.append(await recv_json(ws))
    assert [r["type"] for r in replies] == ["auth", "auth", "error"] and replies[2]["code"] == "too_many_connections"
    with pytest.raises(ConnectionClosed) as closed:
        await sockets[2].recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4029
    for ws in sockets[:2]:
        await ws.close()


async def test_client_values_cannot_forge_log_lines(server: WsAgentServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "wsagent"):
        async with ws_connect(server, "/ws/chat") as ws:
            await ws.send(json.dumps({"type": "run", "id": "r\nINFO forged line", "prompt": "hi sim:tokens=2"}))
            await run_events(ws, "r\nINFO forged line")
    lines = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert lines and all("\n" not in line and "r\\x0aINFO forged line" in line for line in lines)


async def test_a_broadcast_is_bounded_well_below_the_outbox(make_server: ServerFactory) -> None:
    """A 1,048,563-byte broadcast is under ``--max-message-size``, but with ``"from"`` added it passed
    ``--outbox-bytes``: all 20 listeners were closed with 4008."""
    server = await make_server(max_message_size=2**21, outbox_bytes=2**20)
    listeners = [await ws_connect(server, f"/ws/listener{i}", max_size=None) for i in range(3)]
    async with ws_connect(server, "/ws/sender", max_size=None) as sender:
        await sender.send(json.dumps({"type": "broadcast", "content": "é" * 400_000}, ensure_ascii=False))
        refusal = await recv_json(sender)
        assert refusal["type"] == "error" and "too large" in refusal["message"]
        await sender.send(json.dumps({"type": "broadcast", "content": "still here"}))
        for listener in listeners:
            assert json.loads(await listener.recv())["content"] == "still here"
    for listener in listeners:
        await listener.close()


@pytest.fixture
async def faulty_upstream() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A model server that answers 500 with a 300 MB plain body, or a JSON error with a 1 MB message."""
    sent = {"chunks": 0}

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "json" in json.dumps(body["messages"]):
            return web.json_response({"error": {"message": "m" * 1_000_000, "type": "server_error"}}, status=500)
        response = web.StreamResponse(status=500, headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        chunk = b"x" * 1_000_000
        for _ in range(300):
            await response.write(chunk)
            sent["chunks"] += 1
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", sent
    finally:
        await runner.cleanup()


async def test_an_upstream_error_body_is_read_only_so_far(faulty_upstream: tuple[str, dict[str, int]]) -> None:
    url, sent = faulty_upstream
    client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0))
    try:
        for prompt in ("plain", "json"):
            with pytest.raises(UpstreamError) as info:
                async for _ in client.stream([{"role": "user", "content": prompt}]):
                    pass
            assert info.value.code == "upstream_unavailable" and len(info.value.message) <= 600
    finally:
        await client.close()
    assert sent["chunks"] < 100  # the rest of the 300 MB was never read: the connection was closed


async def test_clients_choose_only_allowed_models(make_server: ServerFactory) -> None:
    """A client-chosen ``model`` was forwarded verbatim: anyone could pick the most expensive one."""
    server = await make_server(model="wsagent-sim")
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("a", "hi", model="gpt-most-expensive"))
        refusal = await recv_json(ws)
        assert refusal["code"] == "bad_request" and "may not be chosen" in refusal["message"]
        await ws.send(run_request("b", "hi sim:tokens=2", model="wsagent-sim"))
        assert (await run_events(ws, "b"))[-1]["type"] == "done"
    open_server = await make_server(allowed_models="gpt-most-expensive, other")
    async with ws_connect(open_server, "/ws/chat") as ws:
        await ws.send(run_request("c", "hi sim:tokens=2", model="gpt-most-expensive"))
        events = await run_events(ws, "c")
        assert events[0]["model"] == "gpt-most-expensive" and events[-1]["type"] == "done"


async def test_a_draining_server_answers_503_then_stops(make_server: ServerFactory) -> None:
    """README promised 503 during shutdown; new connections got a refused TCP connection."""
    server = await make_server()
    port = server.port
    streaming = await ws_connect(server, "/ws/chat")
    await streaming.send("long sim:rate=20 sim:tokens=10000")
    assert await streaming.recv()
    stopping = asyncio.ensure_future(server.stop(drain=30))
    await asyncio.sleep(0)  # one loop step: stop() runs up to its drain wait
    assert server.draining
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server, "/ws/chat"):
            pass
    assert info.value.response.status_code == 503 and info.value.response.headers["Retry-After"] == "1"
    # A load balancer's health check sees it too (it answered 200 "draining", and traffic kept coming).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    head, _, body = (await reader.read()).decode().partition("\r\n\r\n")
    writer.close()
    assert head.startswith("HTTP/1.1 503 ") and json.loads(body)["status"] == "draining"
    await streaming.close()  # the last stream ends (its run is cancelled): the drain is over at once
    await asyncio.wait_for(stopping, 10)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_finished_runs_kept_for_resume_stay_in_the_replay_budget(make_server: ServerFactory) -> None:
    """With a 60 s grace, ten sockets starting ten runs a second grew the server to 1 GiB in 20 s."""
    server = await make_server(resume_grace=60, replay_budget_bytes=60_000, replay_budget_per_user=40_000)
    keys = []
    async with ws_connect(server, "/ws/chat") as first, ws_connect(server, "/ws/chat") as second:
        for n in range(6):
            ws = first if n < 4 else second
            await ws.send(run_request(f"r{n}", f"bulk {n} sim:tokens=100 sim:pad=150"))
            events = await run_events(ws, f"r{n}")
            keys.append(events[0]["key"])
        assert server.broker.kept_bytes <= 60_000
        assert all(size <= 40_000 for size in local_broker(server)._kept_by_owner.values())
        await first.send(json.dumps({"type": "resume", "id": "r0", "key": keys[0], "after": 0}))
        assert (await recv_json(first))["code"] == "unknown_run"  # the oldest went first
        await second.send(json.dumps({"type": "resume", "id": "r5", "key": keys[5], "after": 0}))
        assert (await run_events(second, "r5"))[-1]["type"] == "done"  # the newest is kept whole
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
            text = await response.text()
    evictions = float(next(line.split()[1] for line in text.splitlines()
                           if line.startswith("wsagent_replay_evictions_total")))
    assert evictions >= 2


def test_a_misspelt_setting_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env_file = tmp_path / "wsagent.env"
    env_file.write_text("WSAGENT_MAX_CONECTIONS=5\nWSAGENT_PORT=9000\n")
    with caplog.at_level(logging.WARNING, "wsagent.config"):
        settings = load_settings(["--env-file", str(env_file)], environ={"WSAGENT_URL": "ws://x"})
    assert settings.port == 9000
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "WSAGENT_MAX_CONECTIONS" in warning and "did you mean WSAGENT_MAX_CONNECTIONS?" in warning


async def test_a_reload_that_fails_changes_nothing(server: WsAgentServer, tmp_path: Path) -> None:
    """The settings, auth, origins and limits were swapped before the workflows file was read: when
    that failed, the log said the running settings were kept, but ``max_connections`` had changed."""
    before = server.settings
    broken = tmp_path / "workflows.json"
    broken.write_text("{not json")
    new = dataclasses.replace(before, max_connections=3, allowed_origins="https://x.example",  # type: ignore[arg-type]
                              workflows=str(broken))
    with pytest.raises(ValueError):
        server.reload(new)
    assert server.settings is before and server.app.settings is before
    assert server.manager.max_connections == before.max_connections and server.origin_policy.allowed == set()


async def test_every_plain_http_answer_says_nosniff(server: WsAgentServer) -> None:
    """Found by the outside attack: ``/agents`` and ``/workflows`` (JSON with names a deployer chose) came without
    ``X-Content-Type-Options: nosniff``, which only the page had. Every plain HTTP answer carries it, once."""
    for path in ("/", "/agents", "/workflows", "/healthz", "/metrics", "/favicon.ico", "/nowhere"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head = (await reader.read()).decode(errors="replace").partition("\r\n\r\n")[0].lower()
        writer.close()
        assert head.count("x-content-type-options: nosniff") == 1, (path, head)
