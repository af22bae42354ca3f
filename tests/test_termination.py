"""Every run ends with exactly one terminal event, whatever arrives when.

Messages are written the way an attacker (or a fast page) writes them: several
frames in one TCP write, so the server reads them in the same read and handles
the second before the first run's task has ever been scheduled.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

from websockets.asyncio.client import ClientConnection

from wsagent.engine.broker import KEPT_RUN_COST
from wsagent.wiring.server import WsAgentServer

from .helpers import ServerFactory, recv_json, run_events, ws_connect


def write_together(ws: ClientConnection, *messages: dict[str, Any]) -> None:
    """Queue ``messages`` as text frames and write them to the socket in one ``transport.write``."""
    for message in messages:
        ws.protocol.send_text(json.dumps(message).encode())
    ws.send_data()


async def quiet(server: WsAgentServer) -> None:
    """Wait until no run is in flight on ``server`` (its idle event), failing after 10 s."""
    await asyncio.wait_for(server.app.idle.wait(), 10)
    assert server.app.broker.active_runs() == []


async def test_a_cancel_in_the_same_read_as_its_run_ends_the_run(server: WsAgentServer) -> None:
    """``run`` then ``cancel`` in one write: 85 of 100 runs sent ``start`` and then nothing, for ever
    (the cancel stopped the run's task before it had started, so nothing ended the run)."""
    async with ws_connect(server, "/ws/chat") as ws:
        for n in range(20):
            run_id = f"r{n}"
            write_together(ws, {"type": "run", "id": run_id, "prompt": "hi"}, {"type": "cancel", "id": run_id})
            events = await asyncio.wait_for(run_events(ws, run_id), 5)
            assert events[0]["type"] == "start"
            assert [e["type"] for e in events].count("cancelled") + [e["type"] for e in events].count("done") == 1
            assert events[-1]["type"] in ("cancelled", "done")
    await quiet(server)


async def test_an_abort_in_the_same_read_as_its_send_ends_the_run(make_server: ServerFactory) -> None:
    """useChat's Stop right after submitting: ``send`` then ``abort`` in one write."""
    server = await make_server()
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        for n in range(10):
            request = f"q{n}"
            write_together(ws, {"type": "send", "requestId": request, "id": f"chat{n}", "trigger": "submit-message",
                                "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]},
                           {"type": "abort", "requestId": request})
        # Handled in order: once this is answered, every send and abort before it was.
        await ws.send(json.dumps({"type": "resume", "requestId": "last", "id": "no-such-chat"}))
        while (frame := await asyncio.wait_for(recv_json(ws), 5)).get("requestId") != "last":
            assert frame["requestId"].startswith("q")
        assert frame == {"type": "no-active", "requestId": "last"}
        await quiet(server)
    assert server.app.inflight == 0


async def test_a_cancelled_run_counts_no_more_against_the_users_limit(make_server: ServerFactory) -> None:
    """Leaked runs held the per-connection limit: ``too_many_runs`` after three, with nothing running."""
    server = await make_server(max_runs_per_connection=3)
    async with ws_connect(server, "/ws/chat") as ws:
        for n in range(6):
            write_together(ws, {"type": "run", "id": f"r{n}", "prompt": "hi"}, {"type": "cancel", "id": f"r{n}"})
            events = await asyncio.wait_for(run_events(ws, f"r{n}"), 5)
            assert events[0]["type"] == "start", events
        await ws.send(json.dumps({"type": "ping", "id": "p"}))
        assert (await recv_json(ws))["type"] == "pong"
    await quiet(server)


async def test_lone_surrogates_in_a_clients_strings_never_reach_the_socket(server: WsAgentServer) -> None:
    """A run id ``"\\ud800"`` closed the socket with 1011 and a traceback (the reply could not be encoded);
    when the failed write was the run's own, the run never ended."""
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send('{"type":"run","id":"\\ud800","prompt":"a\\udfffb \\ud83d\\ude00"}')
        events = await asyncio.wait_for(run_events(ws, "\ufffd"), 5)
        assert events[0]["type"] == "start" and events[-1]["type"] == "done"
        await ws.send('{"type":"cancel","id":"\\udbff"}')
        assert (await recv_json(ws))["code"] == "unknown_run"
    await quiet(server)
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        await ws.send('{"type":"resume","requestId":"\\udfff","id":"c\\ud800"}')
        assert await recv_json(ws) == {"type": "no-active", "requestId": "\ufffd"}


def chat_send(request: str, chat: str, text: str = "hi") -> dict[str, Any]:
    return {"type": "send", "requestId": request, "id": chat, "trigger": "submit-message",
            "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": text}]}]}


async def test_an_anonymous_address_keeps_no_more_runs_than_its_limit(make_server: ServerFactory) -> None:
    """60 sockets each sending 8 chats and closing left 480 runs streaming with no socket open: a
    response outlives its socket for ``--ai-sdk-grace`` and the per-connection cap restarts with each
    socket. Anonymous runs now count against their address, on every route."""
    server = await make_server(max_runs_per_ip=5, ai_sdk_grace=30)
    refused: list[str] = []
    for n in range(4):
        async with ws_connect(server, "/ws/ai-sdk") as ws:
            for m in range(3):
                await ws.send(json.dumps(chat_send(f"q{m}", f"c{n}-{m}", "sim:rate=5 long answer")))
            await ws.send(json.dumps({"type": "resume", "requestId": "end", "id": "no-such-chat"}))
            while (frame := await asyncio.wait_for(recv_json(ws), 5)).get("requestId") != "end":
                if frame["type"] == "error":
                    refused.append(frame["errorText"])
    assert len(server.app.broker.active_runs()) == 5
    assert len(refused) == 12 - 5 and all("address" in text for text in refused), refused
    async with ws_connect(server, "/ws/chat") as ws:  # the same address on another route
        await ws.send(json.dumps({"type": "run", "id": "r", "prompt": "hi"}))
        assert (await recv_json(ws))["code"] == "too_many_runs"


async def test_an_anonymous_sockets_chats_share_one_replay_budget(make_server: ServerFactory) -> None:
    """Each anonymous chat was a budget of its own: one socket kept 24 chats, 3.8 MB against a 1 MB
    budget, and evicted another client's finished chat."""
    server = await make_server(replay_budget_per_user=40000, replay_budget_bytes=60000, ai_sdk_grace=30,
                               replay_bytes=100000)  # each chat: 10 KB of log and KEPT_RUN_COST
    async with ws_connect(server, "/ws/ai-sdk") as other:
        await other.send(json.dumps(chat_send("q", "theirs", "sim:tokens=200 sim:pad=50")))
        while not ((frame := await recv_json(other))["type"] == "chunk" and frame["chunk"]["type"] == "finish"):
            pass
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        for n in range(6):
            await ws.send(json.dumps(chat_send(f"q{n}", f"mine{n}", "sim:tokens=200 sim:pad=50")))
            while not ((frame := await recv_json(ws))["type"] == "chunk" and frame["chunk"]["type"] == "finish"):
                pass
    broker = server.app.broker
    assert broker.kept_bytes <= 60000 and broker.evictions >= 3  # mine evicted each other, within my budget
    async with ws_connect(server, "/ws/ai-sdk") as other:
        await other.send(json.dumps({"type": "resume", "requestId": "r", "id": "theirs"}))
        assert (await recv_json(other)) == {"type": "start", "requestId": "r"}


async def test_a_watcher_whose_write_fails_never_stops_the_run_or_its_owner(server: WsAgentServer) -> None:
    """A write that raised inside a run's wake (a frame no encoder takes) reached the producer: the run
    was ended twice (``RunStateError``) and its own client waited for ever. The failing connection is
    closed with 1011 instead, and the run and its client go on."""
    async with ws_connect(server, "/ws/chat") as owner, ws_connect(server, "/ws/chat") as watcher:
        await owner.send(json.dumps({"type": "run", "id": "r", "prompt": "slow sim:rate=200 sim:tokens=40"}))
        start = await recv_json(owner)
        await watcher.send(json.dumps({"type": "attach", "id": "r", "key": start["key"]}))
        assert (await recv_json(watcher))["id"] == "r"  # attached
        (broken,) = [c for c in server.app.manager if any(s is not s.run.primary for s in c.outbox.subscriptions)]
        # Queued without a wake: it is written at the run's next wake, from inside its producer.
        broken.outbox._queue = deque(['{"type":"x","bad":"\ud800"}'])
        events = await asyncio.wait_for(run_events(owner, "r"), 10)
        assert events[-1]["type"] == "done"
        await asyncio.wait_for(watcher.wait_closed(), 5)
        assert watcher.close_code == 1011
    await quiet(server)


async def test_the_replay_budget_counts_what_a_kept_run_costs_beyond_its_log(make_server: ServerFactory) -> None:
    """A finished run kept for a resume costs kilobytes beyond its log's characters, which alone were
    counted: 13,120 churned AI SDK chats of a few hundred characters each held 157 MiB against a 64 MiB
    budget. Each kept run now counts :data:`~wsagent.broker.KEPT_RUN_COST` besides its log."""
    server = await make_server(replay_budget_bytes=10 * KEPT_RUN_COST, ai_sdk_grace=30)
    for n in range(30):
        async with ws_connect(server, "/ws/ai-sdk") as ws:
            await ws.send(json.dumps(chat_send("q", f"c{n}", "sim:tokens=3")))
            while not ((frame := await recv_json(ws))["type"] == "chunk" and frame["chunk"]["type"] == "finish"):
                pass
    broker = server.app.broker
    assert broker.kept_bytes <= broker.budget and broker.evictions >= 20
