"""``--upstream-background``: a Responses API stream that breaks is read again from where it stopped, and a run
that ends without its answer cancels its response upstream; against the simulator's background responses over
real HTTP, through the client and through the server."""

from __future__ import annotations

import json

from wsagent.core.chunks import TextDelta
from wsagent.core.errors import UpstreamError
from wsagent.upstream.simulator import SimulatorServer

from .helpers import LIMIT, ServerFactory, run_events, run_request, upstream_for, ws_connect

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
