"""The aiohttp transport against the simulated model over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import aiohttp
import pytest

from wsagent.core.chunks import Finish, TextDelta, ToolCall, Usage
from wsagent.core.errors import UpstreamError
from wsagent.upstream.model import UpstreamClient, UpstreamConfig, parse_retry_after
from wsagent.upstream.simulator import SimulatorServer

from .helpers import ServerFactory, run_events, upstream_for, ws_connect


async def collect(client: UpstreamClient, prompt: str, **kwargs: Any) -> list[Any]:
    try:
        return [event async for event in client.stream([{"role": "user", "content": prompt}], **kwargs)]
    finally:
        await client.close()


def text(events: list[Any], kind: str = "content") -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.kind == kind)


async def failure(client: UpstreamClient, prompt: str, **kwargs: Any) -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        await collect(client, prompt, **kwargs)
    return info.value


async def test_stream_has_reasoning_content_finish_usage(sim: SimulatorServer) -> None:
    events = await collect(upstream_for(sim), "hello")
    assert text(events, "reasoning") and text(events, "content").startswith("here is a simulated answer")
    assert isinstance(events[-2], Finish) and events[-2].reason == "stop"
    assert isinstance(events[-1], Usage) and events[-1].completion_tokens > 0


async def test_deterministic(sim: SimulatorServer) -> None:
    assert await collect(upstream_for(sim), "same") == await collect(upstream_for(sim), "same")


@pytest.mark.parametrize("switch", ["sim:newline=crlf", "sim:newline=cr", "sim:comment_every=2"])
async def test_line_endings_and_comments_change_nothing(sim: SimulatorServer, switch: str) -> None:
    plain = await collect(upstream_for(sim), "endings")
    assert await collect(upstream_for(sim), f"endings {switch}") == plain


async def test_very_long_line(sim: SimulatorServer) -> None:
    events = await collect(upstream_for(sim), "long sim:long=2000000 sim:tokens=1")
    assert max(len(e.text) for e in events if isinstance(e, TextDelta)) == 2_000_000


async def test_tool_call_when_tools_offered(sim: SimulatorServer) -> None:
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    events = await collect(upstream_for(sim), "what is 6 * 7?", tools=tools)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [("calculator", '{"expression": "6 * 7"}')]
    assert Finish("tool_calls") in events


async def test_retry_429_honours_retry_after_ms(sim: SimulatorServer) -> None:
    events = await collect(upstream_for(sim, max_retries=3),
                           "retry me sim:status=429 sim:fail_times=2 sim:retry_after_ms=20")
    assert text(events)
    assert sim.simulator.stats.requests == 3


@pytest.mark.parametrize(("status", "code", "retryable"), [
    (401, "upstream_auth", False), (403, "upstream_auth", False), (400, "upstream_bad_request", False),
    (404, "upstream_bad_request", False),
])
async def test_client_errors_not_retried(sim: SimulatorServer, status: int, code: str, retryable: bool) -> None:
    error = await failure(upstream_for(sim, max_retries=3), f"x sim:status={status}")
    assert (error.code, error.status, error.retryable) == (code, status, retryable)
    assert f"simulated HTTP {status}" in error.message
    assert sim.simulator.stats.requests == 1


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503])
async def test_server_errors_retried_then_reported(sim: SimulatorServer, status: int) -> None:
    error = await failure(upstream_for(sim, max_retries=2), f"x sim:status={status}")
    assert error.retryable and error.status == status
    assert sim.simulator.stats.requests == 3


async def test_x_should_retry_false_wins(sim: SimulatorServer) -> None:
    error = await failure(upstream_for(sim, max_retries=3), "x sim:status=503 sim:should_retry=false")
    assert not error.retryable and sim.simulator.stats.requests == 1


async def test_mid_stream_error_with_and_without_done(sim: SimulatorServer) -> None:
    for prompt in ("m sim:error_after=3 sim:reasoning=0", "m sim:error_after=3 sim:reasoning=0 sim:error_done=1"):
        client = upstream_for(sim)
        seen: list[Any] = []
        with pytest.raises(UpstreamError) as info:
            async for event in client.stream([{"role": "user", "content": prompt}]):
                seen.append(event)
        await client.close()
        assert len(seen) == 3 and info.value.code == "upstream_stream_error"
        assert sim.simulator.stats.requests <= 2  # never retried after the first byte


async def timed_failure(client: UpstreamClient, prompt: str) -> tuple[UpstreamError, float]:
    """The error, and how long after the request's last byte (or its start) it came."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    with pytest.raises(UpstreamError) as info:
        async for _ in client.stream([{"role": "user", "content": prompt}]):
            last = loop.time()
    return info.value, loop.time() - last


async def test_stall_hits_read_timeout_when_it_is_due(sim: SimulatorServer) -> None:
    """With ``--read-timeout 2 --first-byte-timeout 9`` a stall after three tokens was reported at 9 s:
    the watchdog's first check was at the first-byte deadline and never moved earlier."""
    client = upstream_for(sim, read_timeout=0.3, first_byte_timeout=5)
    error, after = await timed_failure(client, "s sim:stall_after=3")
    assert error.code == "upstream_timeout"
    assert 0.3 <= after < 1.0  # at the read timeout, not at the first-byte one


async def test_no_headers_hits_first_byte_timeout_when_it_is_due(sim: SimulatorServer) -> None:
    client = upstream_for(sim, first_byte_timeout=0.3, connect_timeout=0.3, read_timeout=5, max_retries=0)
    error, after = await timed_failure(client, "h sim:hold=1")
    assert error.code == "upstream_timeout"
    assert 0.3 <= after < 1.0


async def test_dropped_connection_is_truncation(sim: SimulatorServer) -> None:
    error = await failure(upstream_for(sim), "d sim:drop_after=3")
    assert error.code in ("upstream_truncated", "upstream_connection") and error.retryable


async def test_close_without_done_after_finish_is_complete(sim: SimulatorServer) -> None:
    raw = 'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
    events = await collect(upstream_for(sim), "r", params={"sim": {"raw": raw}})
    assert events == [TextDelta("content", "ok"), Finish("stop")]


async def test_close_with_neither_is_truncated(sim: SimulatorServer) -> None:
    raw = 'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n\n'
    error = await failure(upstream_for(sim), "r", params={"sim": {"raw": raw}})
    assert error.code == "upstream_truncated"


async def test_non_streamed_completion_is_handled(sim: SimulatorServer) -> None:
    events = await collect(upstream_for(sim), "whole sim:json=1 sim:reasoning=0")
    assert text(events).startswith("here is a simulated answer") and Finish("stop") in events


async def test_event_too_large_is_a_clear_error(sim: SimulatorServer) -> None:
    error = await failure(upstream_for(sim, max_event_size=1000), "big sim:long=5000 sim:tokens=1")
    assert error.code == "upstream_protocol" and "larger than 1000" in error.message


async def test_connection_refused(sim: SimulatorServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = UpstreamClient(UpstreamConfig(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base=0.01))
    error = await failure(client, "x")
    assert error.code == "upstream_connection" and error.retryable


async def test_cancelling_the_consumer_closes_the_upstream_connection(sim: SimulatorServer) -> None:
    client = upstream_for(sim)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in client.stream([{"role": "user", "content": "slow sim:rate=20 sim:tokens=1000"}]):
            first.set()

    task = asyncio.get_running_loop().create_task(consume())
    await first.wait()
    task.cancel()
    stats = sim.simulator.stats
    await stats.wait_for(lambda s: s.disconnected == 1, 5)
    assert stats.completed == 0 and stats.tokens_sent < 1000
    await client.close()


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412478.0) == 2.0
    assert parse_retry_after({"retry-after": "soon"}) is None


async def test_a_refused_connection_reads_plainly() -> None:
    """Was ``cannot reach upstream: Cannot connect to host localhost:8001 ssl:default [...]``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = UpstreamClient(UpstreamConfig(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base=0.01))
    try:
        error = await failure(client, "hi")
    finally:
        await client.close()
    assert error.code == "upstream_connection"
    assert error.message == f"cannot connect to the model server at 127.0.0.1:{port} (connection refused; 2 attempts)"


async def test_a_stream_cut_short_reads_plainly(sim: SimulatorServer) -> None:
    """Was ``upstream connection broke: Response payload is not completed: <TransferEncodingError: 400, ...>``."""
    error = await failure(upstream_for(sim), "d sim:drop_after=3")
    assert error.message == "the model server closed the stream before it ended"
    assert "400" not in error.message and "Error" not in error.message


async def test_retries_stop_at_their_deadline_and_say_how_many(sim: SimulatorServer) -> None:
    """Behind a proxy that retries too, a 429 took 15.3 s to reach the client: retries need a total deadline."""
    client = upstream_for(sim, max_retries=10, backoff_base=0.2, backoff_cap=0.2, retry_deadline=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    error = await failure(client, "x sim:status=429 sim:retry_after_ms=200")
    elapsed = loop.time() - started
    assert error.code == "upstream_rate_limited" and 0.4 <= elapsed < 0.9
    assert error.message.endswith("attempts; gave up at the 0.5 s retry deadline)")


async def test_a_first_attempt_past_the_deadline_says_so(sim: SimulatorServer) -> None:
    """A proxy that spends the whole deadline on one attempt (LiteLLM took 5.4 s on a 429) got no retry and
    no word on why."""
    client = upstream_for(sim, max_retries=2, retry_deadline=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    error = await failure(client, "x sim:status=429 sim:retry_after_ms=2000")
    assert loop.time() - started < 0.4  # no retry was started: waiting 2 s would pass the deadline
    assert error.message == "upstream HTTP 429: simulated HTTP 429 (1 attempt; gave up at the 0.5 s retry deadline)"


async def test_health_and_the_run_line_tell_the_upstream_s_state(make_server: ServerFactory,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """``/healthz`` said ``ok`` while the upstream was down, and the ``run`` line said ``outcome=error``
    with no code."""
    server = await make_server(upstream={"max_retries": 0})
    async with aiohttp.ClientSession() as http:
        async def upstream_health() -> dict[str, Any]:
            async with http.get(f"http://127.0.0.1:{server.port}/healthz") as response:
                return dict((await response.json())["upstream"])

        assert (await upstream_health())["last_success_s_ago"] is None
        with caplog.at_level(logging.INFO, "wsagent"):
            async with ws_connect(server, "/ws/chat") as ws:
                await ws.send(json.dumps({"type": "run", "id": "bad", "prompt": "x sim:status=503"}))
                await run_events(ws, "bad")
                await ws.send(json.dumps({"type": "run", "id": "good", "prompt": "y sim:tokens=2"}))
                await run_events(ws, "good")
        state = await upstream_health()
    assert state["url"].startswith("http://127.0.0.1:") and state["last_success_s_ago"] >= 0
    assert state["last_failure"]["code"] == "upstream_unavailable"
    assert state["last_failure"]["message"].startswith("upstream HTTP 503")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run bad end")]
    assert lines and "outcome=error code=upstream_unavailable" in lines[0]


async def test_a_base_url_without_its_v1_is_named_in_the_error(sim: SimulatorServer) -> None:
    """An upstream URL without ``/v1`` answered ``upstream HTTP 404: 404: Not Found`` and no hint."""
    error = await failure(upstream_for(sim, base_url=sim.base_url.removesuffix("/v1")), "hi")
    assert (error.code, error.status) == ("upstream_bad_request", 404)
    assert "/chat/completions" in error.message and "must be the API's base" in error.message
