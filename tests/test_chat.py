"""The relay on /ws/chat: text mode, the JSON protocol, backpressure, cancellation, resume."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from wsagent.engine.pump import pump
from wsagent.engine.run import Run
from wsagent.upstream.completion import estimate_tokens, model_batches
from wsagent.upstream.model import UpstreamClient
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import (
    ServerFactory,
    check_sequence,
    content,
    expected_text,
    find_run,
    recv_json,
    run_events,
    run_request,
    text_reply,
    upstream_for,
    ws_connect,
)


async def stream_model(run: Run, upstream: UpstreamClient, messages: list[dict[str, Any]], *,
                       params: dict[str, Any] | None = None, collect: list[str] | None = None,
                       collect_chars: float = math.inf) -> None:
    """Relay one completion into ``run`` and end it, as the server relays a plain prompt."""
    run.prompt_estimate = estimate_tokens(messages)
    await pump(run, lambda: model_batches(upstream, messages, params=params, agent=run.agent, workflow=run.workflow,
                                          collect=collect, collect_chars=collect_chars))


@contextlib.asynccontextmanager
async def stalled_run(server: WsAgentServer, run_id: str, prompt: str) -> AsyncIterator[tuple[ClientConnection, Run]]:
    """A run whose client stopped reading, once the relay has stopped reading the upstream for it."""
    async with ws_connect(server, "/ws/chat", compression=None, max_queue=1, max_size=None) as ws:
        await ws.send(run_request(run_id, prompt))
        assert (await recv_json(ws))["type"] == "start"
        ws.transport.pause_reading()
        live = find_run(server, run_id)
        assert live is not None
        await asyncio.wait_for(live.stalled.wait(), 10)  # upstream reading paused: TCP holds the model back
        yield ws, live


async def test_text_mode_streams_and_keeps_history(server: WsAgentServer, sim: SimulatorServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send("What is a websocket?")
        first = await text_reply(ws)
        assert first == await expected_text(sim, "What is a websocket?") + "\n[DONE]"
        await ws.send("And backpressure?")
        second = await text_reply(ws)
        assert second.endswith("\n[DONE]")
        sent = sim.simulator.stats.last_body
        assert sent is not None
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
        assert sent["messages"][1]["content"] == first.removesuffix("\n[DONE]")


async def test_text_mode_history_is_bounded(make_server: ServerFactory, sim: SimulatorServer) -> None:
    server = await make_server(history_messages=4)
    async with ws_connect(server, "/ws/chat") as ws:
        for n in range(4):
            await ws.send(f"question {n} sim:tokens=3")
            await text_reply(ws)
        assert sim.simulator.stats.last_body is not None
        assert len(sim.simulator.stats.last_body["messages"]) == 5  # 4 kept + the new prompt


async def test_text_mode_error_keeps_socket(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send("boom sim:status=500")
        assert (await text_reply(ws)).startswith("[ERROR] upstream HTTP 500")
        await ws.send("fine now")
        assert (await text_reply(ws)).endswith("\n[DONE]")


async def test_json_runs_interleave_on_one_socket(server: WsAgentServer, sim: SimulatorServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        for name in ("a", "b", "c"):
            await ws.send(run_request(name, f"topic {name} sim:rate=200 sim:tokens=30"))
        order: list[str] = []
        events: dict[str, list[dict[str, Any]]] = {"a": [], "b": [], "c": []}
        while any(not ev or ev[-1]["type"] not in ("done", "error") for ev in events.values()):
            event = await recv_json(ws)
            events[event["id"]].append(event)
            order.append(event["id"])
        for name, evs in events.items():
            check_sequence(evs)
            assert evs[0]["type"] == "start" and evs[-1] == {**evs[-1], "type": "done", "finish_reason": "stop"}
            assert content(evs) == await expected_text(sim, f"topic {name} sim:rate=200 sim:tokens=30")
            assert any(e["type"] == "usage" and not e["estimated"] for e in evs)
        assert order.index("b") < len(order) - order[::-1].index("a") - 1  # b started before a ended


async def test_cancel_one_of_two(server: WsAgentServer, sim: SimulatorServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("keep", "keep going sim:rate=100 sim:tokens=40"))
        await ws.send(run_request("stop", "stop me sim:rate=100 sim:tokens=100000"))
        others: dict[str, list[dict[str, Any]]] = {}
        while True:
            event = await recv_json(ws)
            others.setdefault(event["id"], []).append(event)
            if event["id"] == "stop" and event["type"] == "token":
                break
        await ws.send(json.dumps({"type": "cancel", "id": "stop"}))
        stopped = others.pop("stop") + await run_events(ws, "stop", others)
        check_sequence(stopped)
        assert stopped[-1]["type"] == "cancelled" and stopped[-1]["reason"] == "cancelled by client"
        usage = [e for e in stopped if e["type"] == "usage"]
        assert len(usage) == 1 and usage[0]["estimated"] and usage[0]["completion_tokens"] >= 1
        await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1, 5)
        kept = others.get("keep", []) + await run_events(ws, "keep")
        check_sequence(kept)
        assert kept[-1]["type"] == "done"


@pytest.mark.parametrize("abrupt", [True, False])
async def test_client_leaving_closes_upstream(server: WsAgentServer, sim: SimulatorServer, abrupt: bool) -> None:
    ws = await ws_connect(server, "/ws/chat")
    await ws.send(run_request("r", "long sim:rate=100 sim:tokens=100000"))
    while (await recv_json(ws))["type"] != "token":
        pass
    if abrupt:
        ws.transport.abort()  # TCP reset, no close frame
    else:
        await ws.close()
    stats = sim.simulator.stats
    await stats.wait_for(lambda s: s.disconnected == 1, 5)
    assert stats.completed == 0 and stats.active == 0


async def test_close_frame_cancels_before_the_tcp_close(make_server: ServerFactory, sim: SimulatorServer) -> None:
    """The client's close frame is its leaving: the upstream closes then, not once the closing
    handshake's TCP close has come back from the client (a round trip later; here never)."""
    server = await make_server(close_timeout=30)
    ws = await ws_connect(server, "/ws/chat")
    await ws.send("long sim:rate=100 sim:tokens=100000")
    await ws.recv()
    ws.transport.pause_reading()  # the server's close reply is never read, so the TCP stays open
    ws.protocol.send_close(1000)
    ws.send_data()
    try:
        await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1, 5)
        conn = next(iter(server.manager))
        assert conn.ws.protocol.close_rcvd is not None and not conn.ws.connection_lost_waiter.done()
    finally:
        ws.transport.abort()


async def test_slow_reader_gets_merged_text_in_order(make_server: ServerFactory, sim: SimulatorServer) -> None:
    server = await make_server(run_buffer_bytes=16384)
    prompt = "flood sim:rate=0 sim:tokens=8000 sim:pad=1000 sim:reasoning=0"
    async with stalled_run(server, "slow", prompt) as (ws, live):
        assert live.undelivered <= 16384 + 1100  # the limit plus the one event that crossed it
        assert sim.simulator.stats.tokens_sent < 8000
        ws.transport.resume_reading()
        events = await run_events(ws, "slow")
    tokens = [e for e in events if e["type"] == "token"]
    assert content(events) == await expected_text(sim, prompt)
    assert len(tokens) < 8000  # merged into fewer, larger frames
    assert [e["seq"] for e in events] == list(range(2, len(events) + 2))
    assert events[-1]["type"] == "done"


async def test_client_that_never_reads_is_closed_4008(make_server: ServerFactory, sim: SimulatorServer) -> None:
    server = await make_server(slow_client_timeout=0.5, close_timeout=0.5, run_buffer_bytes=8192)
    async with ws_connect(server, "/ws/chat", compression=None, max_queue=1) as ws:
        await ws.send(run_request("stuck", "flood sim:rate=0 sim:tokens=100000 sim:pad=1000"))
        ws.transport.pause_reading()
        conn = next(iter(server.manager))
        await asyncio.wait_for(conn.ws.wait_closed(), 10)
        close_sent = conn.ws.protocol.close_sent
        assert close_sent is not None and close_sent.code == 4008
        await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1, 5)
        ws.transport.abort()


async def test_deltas_read_together_leave_in_one_frame(server: WsAgentServer, sim: SimulatorServer) -> None:
    """A model that writes faster than we relay hands over many deltas per network read; they go
    out merged, one frame per read, not one frame (and one system call) per delta."""
    words = [f"w{n} " for n in range(200)]
    raw = "".join(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': w}}]})}\n\n" for w in words)
    raw += 'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    async with ws_connect(server, "/ws/chat") as ws:
        (conn,) = list(server.manager)
        live = Run("burst")
        live.subscribe(conn.outbox)
        assert server.upstream is not None
        await stream_model(live, server.upstream, [{"role": "user", "content": "burst"}],
                           params={"sim": {"raw": raw}})
        events = await run_events(ws, "burst")
    check_sequence(events)
    assert content(events) == "".join(words)
    assert len([e for e in events if e["type"] == "token"]) < 20  # one write of 200 deltas: a few reads


async def test_the_read_that_ends_a_stream_leaves_with_the_end_in_one_write(server: WsAgentServer,
                                                                            sim: SimulatorServer) -> None:
    """The model's last deltas, the run's usage and its ``done`` arrive in one read, and leave in one
    write to the socket (one system call, three frames), not one write per frame or per event."""
    raw = ('data: {"choices":[{"index":0,"delta":{"content":"all of it"}}]}\n\n'
           'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    async with ws_connect(server, "/ws/chat") as ws:
        (conn,) = list(server.manager)
        transport = conn.ws.transport
        writes: list[bytes] = []
        write = transport.write

        def observed(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            write(data)

        transport.write = observed  # type: ignore[method-assign]
        live = Run("ending")
        live.subscribe(conn.outbox)
        assert server.upstream is not None
        await stream_model(live, server.upstream, [{"role": "user", "content": "end"}], params={"sim": {"raw": raw}})
        events = await run_events(ws, "ending")
        assert len(writes) == 1
    assert [e["type"] for e in events] == ["token", "usage", "done"]


async def test_a_reply_is_collected_only_up_to_what_the_history_keeps(sim: SimulatorServer) -> None:
    client = upstream_for(sim)
    reply: list[str] = []
    run = Run("long")
    await stream_model(run, client, [{"role": "user", "content": "long sim:tokens=2000 sim:reasoning=0"}],
                       collect=reply, collect_chars=500)
    await client.close()
    assert run.outcome == "done" and run.streamed == 2000
    kept = sum(map(len, reply))
    assert 500 < kept <= 500 + max(map(len, reply))  # up to the delta that crossed the limit


async def test_text_mode_forgets_a_reply_longer_than_the_history(make_server: ServerFactory,
                                                                 sim: SimulatorServer) -> None:
    server = await make_server(history_chars=2000)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send("short sim:tokens=5")
        await text_reply(ws)
        await ws.send("long sim:tokens=3000")
        assert len(await text_reply(ws)) > 2000
        await ws.send("next sim:tokens=5")
        await text_reply(ws)
    assert sim.simulator.stats.last_body is not None
    assert [m["content"] for m in sim.simulator.stats.last_body["messages"]] == ["next sim:tokens=5"]


async def test_finished_run_keeps_its_events_until_its_last_watcher_has_them(
        make_server: ServerFactory, sim: SimulatorServer) -> None:
    """With no resume grace a finished run is forgotten at once, and its log is dropped (it is
    thousands of objects); a watcher still reading it gets every event first."""
    server = await make_server(run_buffer_bytes=8 * 2**20)
    prompt = "big sim:rate=0 sim:tokens=10000 sim:pad=200 sim:reasoning=0"
    async with ws_connect(server, "/ws/chat", compression=None, max_queue=1, max_size=None) as ws:
        ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        await ws.send(run_request("big", prompt))
        start = await recv_json(ws)
        assert start["type"] == "start"
        ws.transport.pause_reading()
        live = find_run(server, "big")
        assert live is not None
        await asyncio.wait_for(live.wait(), 20)
        assert find_run(server, "big") is None and live.oldest_kept < live.streamed  # still kept for us
        ws.transport.resume_reading()
        events = [start, *await run_events(ws, "big")]
    check_sequence(events)
    assert content(events) == await expected_text(sim, prompt)
    assert live.oldest_kept == events[-1]["seq"] + 1  # and then forgotten


async def test_resume_after_drop_loses_and_repeats_nothing(make_server: ServerFactory, sim: SimulatorServer) -> None:
    server = await make_server(resume_grace=10)
    prompt = "resumable sim:rate=200 sim:tokens=60"
    first = await ws_connect(server, "/ws/chat")
    await first.send(run_request("r1", prompt))
    seen: list[dict[str, Any]] = []
    while len(seen) < 10:
        seen.append(await recv_json(first))
    first.transport.abort()
    async with ws_connect(server, "/ws/chat") as second:
        await second.send(json.dumps({"type": "resume", "id": "r1", "key": seen[0]["key"], "after": seen[-1]["seq"]}))
        rest = await run_events(second, "r1")
    events = seen + rest
    check_sequence(events)
    assert events[-1]["type"] == "done"
    assert content(events) == await expected_text(sim, prompt)
    assert sim.simulator.stats.disconnected == 0


async def test_resume_of_forgotten_events_is_an_error(make_server: ServerFactory) -> None:
    server = await make_server(resume_grace=10, replay_bytes=0, run_buffer_bytes=1024)
    first = await ws_connect(server, "/ws/chat")
    await first.send(run_request("r2", "x sim:rate=0 sim:tokens=400"))
    key = (await recv_json(first))["key"]
    while (await recv_json(first))["type"] != "token":
        pass
    first.transport.abort()
    async with ws_connect(server, "/ws/chat") as second:
        live = find_run(server, "r2")
        assert live is not None
        await live.wait()
        await second.send(json.dumps({"type": "resume", "id": "r2", "key": key, "after": 0}))
        error = await recv_json(second)
        assert error["type"] == "error" and error["code"] == "replay_gap" and "seq" not in error


async def test_without_grace_a_drop_cancels(server: WsAgentServer, sim: SimulatorServer) -> None:
    first = await ws_connect(server, "/ws/chat")
    await first.send(run_request("r3", "x sim:rate=100 sim:tokens=100000"))
    key = (await recv_json(first))["key"]
    while (await recv_json(first))["type"] != "token":
        pass
    live = find_run(server, "r3")
    first.transport.abort()
    assert live is not None
    await live.wait()
    assert live.outcome == "cancelled"
    async with ws_connect(server, "/ws/chat") as second:
        await second.send(json.dumps({"type": "resume", "id": "r3", "key": key, "after": 1}))
        assert (await recv_json(second))["code"] == "unknown_run"


async def test_attach_watches_the_same_stream(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/chat") as owner, ws_connect(server, "/ws/chat") as watcher:
        await owner.send(run_request("shared", "watch this sim:rate=100 sim:tokens=40"))
        start = await recv_json(owner)
        assert start["type"] == "start"
        await watcher.send(json.dumps({"type": "attach", "id": "shared", "key": start["key"]}))
        mine, theirs = await asyncio.gather(run_events(owner, "shared"), run_events(watcher, "shared"))
        assert theirs[0]["seq"] == 1  # everything still kept, from the start
        check_sequence(theirs)
        assert content(theirs) == content(mine) and theirs[-1]["type"] == "done"


@pytest.mark.parametrize(("prompt", "code", "retryable"), [
    ("x sim:status=429", "upstream_rate_limited", True),
    ("x sim:status=500", "upstream_unavailable", True),
    ("x sim:status=401", "upstream_auth", False),
    ("x sim:error_after=4", "upstream_stream_error", True),
])
async def test_upstream_failures_become_error_events(server: WsAgentServer, prompt: str, code: str,
                                                     retryable: bool) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("e", prompt))
        events = await run_events(ws, "e")
        check_sequence(events)
        error = events[-1]
        assert error["type"] == "error" and error["code"] == code and error["retryable"] is retryable
        assert error["message"]
        assert [e["type"] for e in events].count("usage") == 1
        await ws.send(run_request("after", "still works sim:tokens=3"))
        assert (await run_events(ws, "after"))[-1]["type"] == "done"


async def test_hundred_concurrent_clients_lose_nothing(server: WsAgentServer, sim: SimulatorServer) -> None:
    prompt = "many clients sim:rate=100 sim:tokens=40"
    expected = await expected_text(sim, prompt)

    async def one(n: int) -> str:
        async with ws_connect(server, "/ws/chat") as ws:
            await ws.send(run_request(f"c{n}", prompt))
            events = await run_events(ws, f"c{n}")
            check_sequence(events)
            return content(events)

    results = await asyncio.gather(*(one(n) for n in range(100)))
    assert results == [expected] * 100


async def test_protocol_refusals_keep_the_socket(make_server: ServerFactory) -> None:
    server = await make_server(max_runs_per_connection=1)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}
        await ws.send(json.dumps({"type": "dance"}))
        assert (await recv_json(ws))["code"] == "bad_request"
        await ws.send(json.dumps({"type": "run", "id": "x"}))
        assert "needs 'messages'" in (await recv_json(ws))["message"]
        await ws.send(json.dumps({"type": "run", "id": "x", "prompt": "p", "params": {"api_key": 1}}))
        assert "unsupported params" in (await recv_json(ws))["message"]
        await ws.send(json.dumps({"type": "run", "id": 5, "prompt": "p"}))
        assert (await recv_json(ws))["code"] == "bad_request"
        await ws.send(b"\x01\x02")
        assert "binary" in (await recv_json(ws))["message"]
        await ws.send(run_request("one", "slow sim:rate=50 sim:tokens=100000"))
        await ws.send(run_request("two", "refused"))
        refusal: dict[str, Any] = {}
        while not refusal:
            event = await recv_json(ws)
            if event.get("id") == "two":
                refusal = event
        assert refusal["type"] == "error" and refusal["code"] == "too_many_runs" and refusal["retryable"]
        await ws.send(run_request("one", "duplicate"))
        while (event := await recv_json(ws)).get("code") != "bad_request":
            pass
        assert "already in use" in event["message"]
        await ws.send(json.dumps({"type": "cancel", "id": "one"}))
        assert (await run_events(ws, "one"))[-1]["type"] == "cancelled"
        await ws.send(json.dumps({"type": "cancel", "id": "one"}))
        assert (await recv_json(ws))["code"] == "unknown_run"


async def test_malformed_json_is_a_text_prompt(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send('{"type": "run", "id": ')
        assert (await text_reply(ws)).endswith("[DONE]")
        await ws.send('{"no_type": 1}')
        assert (await text_reply(ws)).endswith("[DONE]")


async def test_socket_closed_mid_send_is_quiet(server: WsAgentServer) -> None:
    ws = await ws_connect(server, "/ws/chat")
    await ws.send(run_request("gone", "x sim:rate=0 sim:tokens=5000"))
    await ws.close()
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    async with ws_connect(server, "/ws/chat") as again:
        await again.send(run_request("fine", "x sim:tokens=3"))
        assert (await run_events(again, "fine"))[-1]["type"] == "done"


async def test_a_relay_paused_by_its_client_is_not_an_upstream_timeout(make_server: ServerFactory,
                                                                       sim: SimulatorServer) -> None:
    """Backpressure stops the upstream reads; the between-bytes timeout must not count that pause."""
    server = await make_server(run_buffer_bytes=4096, upstream={"read_timeout": 0.2})
    prompt = "paused sim:rate=0 sim:tokens=3000 sim:pad=500 sim:reasoning=0"
    async with stalled_run(server, "p", prompt) as (ws, _):
        await asyncio.sleep(0.6)  # the subject under test: three read timeouts' worth of paused time
        ws.transport.resume_reading()
        events = await run_events(ws, "p")
    assert events[-1]["type"] == "done"
    assert content(events) == await expected_text(sim, prompt)


async def test_an_unknown_run_is_explained_with_or_without_its_key(server: WsAgentServer) -> None:
    """``(send its key)`` was said to a client that had sent the key."""
    async with ws_connect(server, "/ws/chat") as ws:
        for verb in ("resume", "attach"):
            await ws.send(json.dumps({"type": verb, "id": "r9", "key": "not-a-key"}))
            with_key = await recv_json(ws)
            await ws.send(json.dumps({"type": verb, "id": "r9"}))
            without = await recv_json(ws)
            assert with_key["code"] == without["code"] == "unknown_run"
            assert "with that key" in with_key["message"] and "send" not in with_key["message"]
            assert "of yours" in without["message"] and "needs its key" in without["message"]
