"""``--upstream-background``: a Responses API stream that breaks is read again from where it stopped, and a run
that ends without its answer cancels its response upstream; against the simulator's background responses over
real HTTP, through the client and through the server."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import pytest

from wsagent.core.chunks import TextDelta
from wsagent.core.config import Settings
from wsagent.core.errors import UpstreamError
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import STOP_STEP_LIMIT, WsAgentServer

from .helpers import LIMIT, ServerFactory, run_events, run_request, upstream_for, ws_connect
from .processes import free_port, started

PROMPT = "tell me about sockets sim:tokens=40"


async def text_of(sim: SimulatorServer, prompt: str, **config: object) -> str:
    client = upstream_for(sim, api="responses", **config)
    try:
        return "".join([e.text async for e in client.stream([{"role": "user", "content": prompt}])
                        if isinstance(e, TextDelta) and e.kind == "content"])
    finally:
        await client.close()


async def test_a_broken_stream_is_read_again_from_its_last_event(sim: SimulatorServer) -> None:
    stats = sim.simulator.stats
    before = stats.tokens_sent
    expected = await text_of(sim, PROMPT)
    one_answer = stats.tokens_sent - before  # its reasoning and its text
    got = await text_of(sim, f"{PROMPT} sim:drop_after=5", background=True)
    assert got == expected  # every token once, none lost, none twice
    (stat,) = stats.background.values()
    assert stat.status == "completed" and len(stat.retrievals) == 1 and stat.retrievals[0] >= 4
    assert stat.tokens == one_answer  # generated once upstream, though read by two streams


async def test_without_background_a_broken_stream_is_an_error(sim: SimulatorServer) -> None:
    try:
        await text_of(sim, f"{PROMPT} sim:drop_after=5")
    except UpstreamError as exc:
        assert exc.code in ("upstream_truncated", "upstream_connection")
    else:
        raise AssertionError("a broken stream of a response that is not in the background was read to its end")
    assert not sim.simulator.stats.background


async def test_re_attachments_are_bounded_by_max_retries(sim: SimulatorServer) -> None:
    """A stream is read again at most --max-retries times (here none), then fails as it would have; the response
    it gives up on is cancelled upstream, since nobody will read it."""
    client = upstream_for(sim, api="responses", background=True, max_retries=0)
    try:
        async for _ in client.stream([{"role": "user", "content": "long one sim:drop_after=3 sim:rate=50"}]):
            pass
    except UpstreamError as exc:
        failed = exc.code
    else:
        failed = ""
    finally:
        await client.close()
    (stat,) = sim.simulator.stats.background.values()
    assert failed in ("upstream_truncated", "upstream_connection") and stat.retrievals == []
    assert stat.cancelled and stat.status == "cancelled"  # (close() waited for the cancel)


async def test_a_cancelled_run_cancels_its_response_upstream(make_server: ServerFactory,
                                                             sim: SimulatorServer) -> None:
    server = await make_server(upstream={"api": "responses", "background": True})
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("c", "a long answer sim:rate=50 sim:tokens=5000"))
        while json.loads(await ws.recv())["type"] != "token":
            pass
        await ws.send(json.dumps({"type": "cancel", "id": "c"}))
        events = await run_events(ws, "c")
    assert events[-1]["type"] == "cancelled"
    stats = sim.simulator.stats
    await stats.wait_for(lambda s: any(stat.cancelled for stat in s.background.values()), LIMIT)
    (stat,) = stats.background.values()
    assert stat.status == "cancelled"


async def test_a_run_through_a_broken_stream_is_whole_on_the_wire(make_server: ServerFactory,
                                                                  sim: SimulatorServer) -> None:
    """Through the server: the client sees every token once, seq without a gap, and done (a pause, not an
    error), while the model server's stream to wsagent broke."""
    expected = await text_of(sim, PROMPT)
    server = await make_server(upstream={"api": "responses", "background": True})
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("b", f"{PROMPT} sim:drop_after=5"))
        events = await run_events(ws, "b")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "done"
    assert "".join(e["content"] for e in events if e["type"] == "token") == expected


async def test_a_stop_is_bounded_when_the_model_server_does_not_answer_a_cancel(
        caplog: pytest.LogCaptureFixture) -> None:
    """A cancelled run's background response is cancelled upstream, and the stop waited for that cancel for
    as long as the connect and first-byte timeouts allow (70 s by default) when the model server stopped
    answering: now each step of a stop is bounded, and the log says what was still running."""
    port = free_port()
    command = [sys.executable, "-m", "wsagent.simulator", "--port", str(port), "--switches"]
    async with started(command, b"simulated model at") as model_server:
        settings = Settings(host="127.0.0.1", port=0, upstream_url=f"http://127.0.0.1:{port}/v1",
                            upstream_api="responses", upstream_background=True)
        server = await WsAgentServer(settings).start()
        try:
            async with ws_connect(server, "/ws/chat") as ws:
                await ws.send(run_request("c", "a long one sim:rate=20 sim:tokens=400"))
                while json.loads(await ws.recv())["type"] != "token":  # streaming: its response exists upstream
                    pass
                model_server.send_signal(signal.SIGSTOP)  # the model server stops answering
                await ws.send(json.dumps({"type": "cancel", "id": "c"}))
                while json.loads(await ws.recv())["type"] != "cancelled":
                    pass
            loop = asyncio.get_running_loop()
            began = loop.time()
            await server.stop(drain=0)
            took = loop.time() - began
        finally:
            model_server.send_signal(signal.SIGCONT)
            await server.stop(drain=0)
    assert STOP_STEP_LIMIT <= took < STOP_STEP_LIMIT + 5, took
    said = [r.getMessage() for r in caplog.records if "releasing the model server took more" in r.getMessage()]
    assert said and "_cancel" in said[0], said
