"""The relay on /ws/chat: text mode, the JSON protocol, backpressure, cancellation, resume."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from wsagent.core.chunks import TextDelta
from wsagent.engine.pump import pump
from wsagent.engine.run import Run
from wsagent.upstream.completion import estimate_tokens, model_batches
from wsagent.upstream.model import UpstreamClient
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import (
    LIMIT,
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


async def test_a_message_in_fragments_or_of_broken_text_is_read_in_a_task(
        server: WsAgentServer, sim: SimulatorServer, caplog: pytest.LogCaptureFixture) -> None:
    """A whole message is handled where it arrives, without a task; one in fragments, or a text frame that is
    not UTF-8 (which ``recv`` answers with a close, under a timeout that needs a task), goes on in one: the
    fragmented prompt is answered, and the broken one closes the connection with 1007, nothing logged."""
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(["What is ", "a websocket?"])
        assert await text_reply(ws) == await expected_text(sim, "What is a websocket?") + "\n[DONE]"
        await ws.send("And backpressure? sim:tokens=2")
        assert (await text_reply(ws)).endswith("\n[DONE]")
        ws.protocol.send_text(b"\xff broken")
        ws.send_data()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1007
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


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


@pytest.mark.parametrize("again", [{"type": "resume", "after": 1}, {"type": "resume", "after": 0},
                                   {"type": "attach"}])
async def test_a_socket_that_watches_a_run_already_is_refused_another_watch(server: WsAgentServer,
                                                                            again: dict[str, Any]) -> None:
    """A resume or attach of a run on the socket that watches it already once sent every event twice, the
    terminal event too (found from outside): it is refused, and the run arrives once."""
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("mine", "watch once sim:rate=100 sim:tokens=20"))
        assert (await recv_json(ws))["type"] == "start"
        await ws.send(json.dumps({**again, "id": "mine"}))
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] not in ("done", "error", "cancelled") or "seq" not in events[-1]:
            events.append(await recv_json(ws))
        refused = [event for event in events if "seq" not in event]
        assert [event["code"] for event in refused] == ["already_watching"] and "twice" in refused[0]["message"]
        check_sequence([{"type": "start", "seq": 1}, *(event for event in events if "seq" in event)])
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_json(ws))["type"] == "pong"  # nothing more of the run came (no second terminal)


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


# Text mode while an answer streams: the busy policy (--on-busy, or /ws/chat?on_busy=...).

BUSY = "[ERROR] busy: an answer is still streaming (on_busy=reject); send again once it ends"
NOT_STEERED = "[NOTE] not steered: a model's answer has no step to join; queued as the next prompt"
DONE = "\n[DONE]"
INTERRUPTED = "\n[CANCELLED] interrupted by a new message"
#: Streams for about 0.3 s: still streaming when the next prompt, sent on its first frame, arrives.
FIRST = "first sim:rate=200 sim:tokens=60 sim:reasoning=0"
ENDLESS = "first sim:rate=200 sim:tokens=100000 sim:reasoning=0"
SECOND = "second sim:tokens=8 sim:reasoning=0"


async def expected_reply(sim: SimulatorServer, messages: list[dict[str, Any]]) -> str:
    """The simulator's deterministic answer to ``messages`` (a prompt after a history)."""
    client = upstream_for(sim)
    parts = [e.text async for e in client.stream(messages) if isinstance(e, TextDelta) and e.kind == "content"]
    await client.close()
    return "".join(parts)


async def frames_until_ended(ws: ClientConnection, answers: int) -> list[str]:
    """Text-mode frames, as sent, until ``answers`` answers have ended (``[DONE]`` or ``[CANCELLED]``)."""
    frames: list[str] = []
    ended = 0
    async with asyncio.timeout(LIMIT):
        while ended < answers:
            frame = await ws.recv()
            assert isinstance(frame, str)
            frames.append(frame)
            ended += frame == DONE or frame.startswith("\n[CANCELLED]")
    return frames


async def send_busy(ws: ClientConnection, first: str, second: str, same_read: bool) -> list[str]:
    """Send ``second`` while ``first`` is being answered: both in one write (the server reads them together),
    or once ``first``'s answer streams (its first frame is returned)."""
    if same_read:
        ws.protocol.send_text(first.encode())
        ws.protocol.send_text(second.encode())
        ws.transport.write(b"".join(ws.protocol.data_to_send()))
        return []
    await ws.send(first)
    async with asyncio.timeout(LIMIT):
        streaming = await ws.recv()
    assert isinstance(streaming, str) and streaming not in (DONE, BUSY, NOT_STEERED)
    await ws.send(second)
    return [streaming]


async def busy_server(make_server: ServerFactory, policy: str, via: str) -> tuple[WsAgentServer, str]:
    """A server and the path to connect to, for ``policy`` as the server's default or as the connection's
    own, overriding another default."""
    if via == "server":
        return await make_server(on_busy=policy), "/ws/chat"
    return await make_server(on_busy="reject" if policy == "interrupt" else "interrupt"), f"/ws/chat?on_busy={policy}"


BUSY_CASES = [pytest.param(policy, via, same_read, id=f"{policy}-{via}-{'same_read' if same_read else 'streaming'}")
              for policy in ("enqueue", "steer") for via in ("server", "connection") for same_read in (True, False)]


@pytest.mark.parametrize(("policy", "via", "same_read"), BUSY_CASES)
async def test_text_mode_busy_queues_the_prompt(make_server: ServerFactory, sim: SimulatorServer, policy: str,
                                                via: str, same_read: bool) -> None:
    """enqueue, and steer (a model's answer has no step to join: queued, and the client told so): the prompt
    is answered once the running answer has ended, with that answer in its history."""
    server, path = await busy_server(make_server, policy, via)
    async with ws_connect(server, path) as ws:
        frames = await send_busy(ws, FIRST, SECOND, same_read)
        frames += await frames_until_ended(ws, 2)
    if policy == "steer":
        assert frames.count(NOT_STEERED) == 1
        assert frames.index(NOT_STEERED) < frames.index(DONE)  # told before the running answer ended
        frames.remove(NOT_STEERED)
    first = await expected_text(sim, FIRST)
    second = await expected_reply(sim, [{"role": "user", "content": FIRST}, {"role": "assistant", "content": first},
                                        {"role": "user", "content": SECOND}])
    assert "".join(frames) == first + DONE + second + DONE
    assert frames.count(DONE) == 2


@pytest.mark.parametrize(("via", "same_read"), [(via, same_read) for via in ("server", "connection")
                                                for same_read in (True, False)])
async def test_text_mode_busy_reject_leaves_the_answer_untouched(make_server: ServerFactory, sim: SimulatorServer,
                                                                 via: str, same_read: bool) -> None:
    server, path = await busy_server(make_server, "reject", via)
    async with ws_connect(server, path) as ws:
        frames = await send_busy(ws, FIRST, SECOND, same_read)
        frames += await frames_until_ended(ws, 1)
        assert frames.count(BUSY) == 1 and frames.index(BUSY) < frames.index(DONE)
        frames.remove(BUSY)
        assert sim.simulator.stats.requests == 1  # the refused prompt was never asked
        assert "".join(frames) == await expected_text(sim, FIRST) + DONE  # byte for byte, whole
        await ws.send(SECOND)  # once it has ended, a prompt is answered, after the history of the first alone
        assert (await frames_until_ended(ws, 1))[-1] == DONE
    sent = sim.simulator.stats.last_body
    assert sent is not None
    assert [m["content"] for m in sent["messages"] if m["role"] == "user"] == [FIRST, SECOND]


@pytest.mark.parametrize(("via", "same_read"), [(via, same_read) for via in ("server", "connection")
                                                for same_read in (True, False)])
async def test_text_mode_busy_interrupt_cancels_and_answers(make_server: ServerFactory, sim: SimulatorServer,
                                                            via: str, same_read: bool) -> None:
    server, path = await busy_server(make_server, "interrupt", via)
    async with ws_connect(server, path) as ws:
        frames = await send_busy(ws, ENDLESS, SECOND, same_read)
        frames += await frames_until_ended(ws, 2)
    cut = frames.index(INTERRUPTED)
    assert frames.count(INTERRUPTED) == 1 and frames[-1] == DONE and frames.count(DONE) == 1
    assert bool(frames[:cut]) is not same_read  # (read together, the first was cancelled before it streamed)
    stats = sim.simulator.stats
    assert stats.requests == (1 if same_read else 2)
    sent = stats.last_body
    assert sent is not None and sent["messages"] == [{"role": "user", "content": SECOND}]  # the first forgotten
    assert "".join(frames[cut + 1:]) == await expected_text(sim, SECOND) + DONE
    assert server.metrics.runs["cancelled"] == 1 and server.metrics.runs["done"] == 1
    assert server.metrics.cancellations["interrupted by a new message"] == 1


async def test_text_mode_interrupt_cancels_what_was_queued_too(make_server: ServerFactory,
                                                                sim: SimulatorServer) -> None:
    """Prompts queued under enqueue, then --on-busy interrupt by a reload: the next prompt cancels the running
    answer and the queued one (each ends with one [CANCELLED]), and is answered even at the limit of runs."""
    server = await make_server(max_runs_per_connection=2)
    async with ws_connect(server, "/ws/chat") as ws:
        frames = await send_busy(ws, ENDLESS, "queued sim:tokens=5", same_read=False)
        server.reload(dataclasses.replace(server.settings, on_busy="interrupt"))
        await ws.send(SECOND)
        frames += await frames_until_ended(ws, 3)
    first_ended = frames.index(INTERRUPTED)
    assert frames[first_ended:first_ended + 2] == [INTERRUPTED, INTERRUPTED]
    assert frames[-1] == DONE and frames.count(DONE) == 1
    assert sim.simulator.stats.requests == 2  # the queued prompt was never asked
    assert "".join(frames[first_ended + 2:]) == await expected_text(sim, SECOND) + DONE
    assert server.metrics.cancellations["interrupted by a new message"] == 2


@pytest.mark.parametrize("query", ["on_busy=later", "on_busy=", "on_busy=reject&on_busy=interrupt"])
async def test_text_mode_bad_on_busy_closes_1008(server: WsAgentServer, query: str) -> None:
    async with ws_connect(server, f"/ws/chat?{query}") as ws:
        async with asyncio.timeout(LIMIT):
            assert await ws.recv() == "[ERROR] on_busy must be one of enqueue, reject, interrupt, steer"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
    assert ws.close_code == 1008
