"""The simulator's background responses (``"background": true``), in OpenAI's wire format: generated once,
kept, resumed from a sequence number, polled and cancelled; over plain HTTP and through the openai SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from openai import APIResponseValidationError, AsyncOpenAI, BadRequestError
from openai.types.responses import ResponseStreamEvent

from wsagent.upstream.simulator import SimStats, SimulatorServer, SimulatorSettings

TERMINAL = ("response.completed", "response.incomplete", "response.failed")
Event = dict[str, Any]


@pytest.fixture
async def client(sim: SimulatorServer) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=sim.base_url, api_key="unused", _strict_response_validation=True, max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


async def read_events(response: aiohttp.ClientResponse,
                      stop_after_deltas: int | None = None) -> tuple[list[Event], bool]:
    """The events of an SSE answer, and whether it ended cleanly (False: the connection was cut). With
    ``stop_after_deltas``, stop reading (the caller closes) after that many text and reasoning deltas."""
    events: list[Event] = []
    deltas = 0
    try:
        async with asyncio.timeout(10):
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                events.append(json.loads(line[len(b"data: "):]))
                if events[-1]["type"].endswith("text.delta"):
                    deltas += 1
                    if deltas == stop_after_deltas:
                        return events, True
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        return events, False
    return events, True


def output_text(response: Event) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"])


def deltas(events: list[Event]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def numbers(events: list[Event]) -> list[int]:
    return [e["sequence_number"] for e in events]


async def test_a_stream_cut_by_drop_after_resumes_after_its_last_event(sim: SimulatorServer) -> None:
    """The creating stream is cut after 5 tokens; the generation goes on; a GET from the last sequence number
    received gives each later event once; the answer is the one a plain request gets; nothing is generated twice."""
    ask = {"model": "sim", "input": "tell me about resuming"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sim.base_url}/responses", json={**ask, "background": True, "store": True,
                                                                 "stream": True, "sim": {"drop_after": 5}}) as post:
            first, clean = await read_events(post)
        assert not clean
        assert [e["type"] for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
        assert first[0]["response"]["status"] == "queued" and first[2]["response"]["status"] == "in_progress"
        assert sum(e["type"].endswith("text.delta") for e in first) == 5
        rid, last = first[0]["response"]["id"], first[-1]["sequence_number"]
        assert numbers(first) == list(range(last + 1))

        async with http.get(f"{sim.base_url}/responses/{rid}", params={"stream": "true",
                                                                         "starting_after": str(last)}) as get:
            rest, clean = await read_events(get)
        assert clean and numbers(rest) == list(range(last + 1, last + 1 + len(rest)))
        assert rest[-1]["type"] == "response.completed" and not any(e["type"] in TERMINAL for e in rest[:-1])
        async with http.get(f"{sim.base_url}/responses/{rid}", params={"stream": "true"}) as get:
            everything, clean = await read_events(get)
        assert clean and everything == first + rest  # kept, not made again: the very same events

        async with http.post(f"{sim.base_url}/responses", json=ask) as plain_post:
            plain = await plain_post.json()
        final = rest[-1]["response"]
        assert deltas(first + rest) == output_text(final) == output_text(plain) and "resuming" in output_text(plain)
        assert final["background"] is True and final["store"] is True and final["id"] == rid
        async with http.get(f"{sim.base_url}/responses/{rid}") as polled:
            assert await polled.json() == final

    stat = sim.simulator.stats.background[rid]
    assert stat.events == len(everything) and stat.tokens == final["usage"]["output_tokens"]
    assert sim.simulator.stats.tokens_sent == stat.tokens  # each token generated once, for three streams
    assert stat.retrievals == [last, -1] and stat.polls == 1 and not stat.cancelled and stat.status == "completed"


async def test_the_generation_goes_on_when_the_client_leaves(sim: SimulatorServer) -> None:
    stats = sim.simulator.stats
    body = {"model": "sim", "input": "leave early", "background": True, "store": True, "stream": True,
            "sim": {"rate": 20, "tokens": 10}}
    async with aiohttp.ClientSession() as http:
        post = await http.post(f"{sim.base_url}/responses", json=body)
        first, _ = await read_events(post, stop_after_deltas=3)
        post.close()
        rid, last = first[0]["response"]["id"], first[-1]["sequence_number"]
        await stats.wait_for(lambda s: s.disconnected == 1)
        stat = stats.background[rid]
        assert stat.status == "in_progress" and stat.tokens < 20
        async with http.get(f"{sim.base_url}/responses/{rid}") as polled:
            now = await polled.json()
        assert now["status"] == "in_progress" and now["background"] is True

        async with http.get(f"{sim.base_url}/responses/{rid}", params={"stream": "true",
                                                                         "starting_after": str(last)}) as get:
            rest, clean = await read_events(get)
    assert clean and numbers(first + rest) == list(range(len(first) + len(rest)))
    final = rest[-1]["response"]
    assert rest[-1]["type"] == "response.completed" and deltas(first + rest) == output_text(final)
    assert stat.tokens == final["usage"]["output_tokens"] == stats.tokens_sent
    assert stat.events == len(first) + len(rest) and stat.retrievals == [last]


async def test_errors_are_openai_s(sim: SimulatorServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sim.base_url}/responses", json={"model": "sim", "input": "x", "background": True,
                                                                 "store": False}) as refused:
            assert refused.status == 400
            assert (await refused.json())["error"]["param"] == "store"
        for method, path in (("GET", "/responses/resp_nope"), ("POST", "/responses/resp_nope/cancel")):
            async with http.request(method, f"{sim.base_url}{path}") as missing:
                assert missing.status == 404
                assert await missing.json() == {"error": {"message": "Response with id 'resp_nope' not found.",
                                                          "type": "invalid_request_error", "param": None,
                                                          "code": None}}
        async with http.post(f"{sim.base_url}/responses", json={"model": "sim", "input": "x",
                                                                 "background": True}) as created:
            made = await created.json()  # ``store`` left out is true
        assert made["status"] == "queued" and made["store"] is True and made["output"] == []
        await sim.simulator.stats.wait_for(lambda s: s.background[made["id"]].status == "completed")
        async with http.get(f"{sim.base_url}/responses/{made['id']}?stream=true") as unstreamable:
            assert unstreamable.status == 400 and (await unstreamable.json())["error"]["param"] == "stream"
        async with http.post(f"{sim.base_url}/responses/{made['id']}/cancel") as too_late:
            assert too_late.status == 400
            assert (await too_late.json())["error"]["message"] == "Cannot cancel a completed response."


async def test_faults_end_a_background_response_as_they_end_a_stream(sim: SimulatorServer) -> None:
    """``error_after`` fails it, ``max_output_tokens`` leaves it incomplete: the same terminal events, kept."""
    stats = sim.simulator.stats
    async with aiohttp.ClientSession() as http:
        for extra, status in (({"sim": {"error_after": 3}}, "failed"), ({"max_output_tokens": 3}, "incomplete")):
            body = {"model": "sim", "input": "end badly", "background": True, "stream": True, **extra}
            async with http.post(f"{sim.base_url}/responses", json=body) as post:
                events, clean = await read_events(post)
            rid = events[0]["response"]["id"]
            assert clean and events[-1]["type"] == f"response.{status}"
            await stats.wait_for(lambda s: s.background[rid].status == status)  # noqa: B023 (awaited here)
            async with http.get(f"{sim.base_url}/responses/{rid}") as polled:
                assert await polled.json() == events[-1]["response"]


async def test_at_most_n_kept_the_oldest_finished_forgotten_first() -> None:
    server = await SimulatorServer(SimulatorSettings(rate=0, tokens=4, switches=True, background_kept=2)).start()
    stats = server.simulator.stats
    try:
        async with aiohttp.ClientSession() as http:
            async def create(**sim: int) -> tuple[int, Event]:
                body = {"model": "sim", "input": "keep me", "background": True, "sim": sim}
                async with http.post(f"{server.base_url}/responses", json=body) as created:
                    return created.status, await created.json()

            async def done(rid: str) -> None:
                await stats.wait_for(lambda s: s.background[rid].status in ("completed", "cancelled"))

            ids = []
            for _ in range(3):
                status, made = await create()
                assert status == 200
                ids.append(made["id"])
                await done(made["id"])
            assert list(stats.background) == ids[1:]
            async with http.get(f"{server.base_url}/responses/{ids[0]}") as forgotten:
                assert forgotten.status == 404
            for rid in ids[1:]:
                async with http.get(f"{server.base_url}/responses/{rid}") as kept:
                    assert (await kept.json())["status"] == "completed"

            stalled = [(await create(stall_after=1))[1]["id"] for _ in range(2)]
            status, full = await create()
            assert status == 429 and full["error"]["code"] == "rate_limit_exceeded"
            async with http.post(f"{server.base_url}/responses/{stalled[0]}/cancel") as cancel:
                assert (await cancel.json())["status"] == "cancelled"
            status, made = await create()
            assert status == 200 and list(stats.background) == [stalled[1], made["id"]]
    finally:
        await server.stop()


async def test_sdk_resumes_a_background_stream_from_a_sequence_number(sim: SimulatorServer,
                                                                      client: AsyncOpenAI) -> None:
    stream = await client.responses.create(model="sim", input="resume me", background=True, store=True, stream=True,
                                           extra_body={"sim": {"rate": 100}})
    seen: list[ResponseStreamEvent] = []
    async with asyncio.timeout(10):
        async for event in stream:
            seen.append(event)
            if len(seen) == 6:
                break
    await stream.close()
    created = seen[0]
    assert created.type == "response.created" and created.response.status == "queued"
    assert created.response.background is True and seen[1].type == "response.queued"
    n = seen[-1].sequence_number

    resumed = await client.responses.retrieve(created.response.id, stream=True, starting_after=n)
    async with asyncio.timeout(10):
        rest = [event async for event in resumed]
    assert [e.sequence_number for e in seen + rest] == list(range(len(seen) + len(rest)))
    last = rest[-1]
    assert last.type == "response.completed" and last.response.background is True
    assert (last.response.model_extra or {}).get("store") is True  # this SDK's Response has no ``store`` field
    plain = await client.responses.create(model="sim", input="resume me")
    text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
    assert text == last.response.output_text == plain.output_text

    polled = await client.responses.retrieve(created.response.id)
    assert polled.status == "completed" and polled.output_text == plain.output_text
    stat = sim.simulator.stats.background[created.response.id]
    assert stat.retrievals == [n] and last.response.usage is not None
    assert stat.tokens == last.response.usage.output_tokens and stat.events == len(seen) + len(rest)


async def test_sdk_cancels_a_slow_one(sim: SimulatorServer, client: AsyncOpenAI) -> None:
    """Its stream ends with no further event; retrieved, it is cancelled, its text so far kept; a second cancel
    answers the same; a finished one cannot be cancelled."""
    stats: SimStats = sim.simulator.stats
    stream = await client.responses.create(model="sim", input="a slow one sim:rate=20", background=True, store=True,
                                           stream=True)
    seen: list[ResponseStreamEvent] = []
    async with asyncio.timeout(10):
        async for event in stream:
            seen.append(event)
            if event.type == "response.reasoning_summary_text.delta":
                break
    created = seen[0]
    assert created.type == "response.created"
    rid = created.response.id

    cancelled = await client.responses.cancel(rid)
    assert cancelled.status == "cancelled" and cancelled.background is True
    async with asyncio.timeout(10):
        rest = [event async for event in stream]
    assert not any(e.type in TERMINAL for e in seen + rest)
    assert [e.sequence_number for e in seen + rest] == list(range(len(seen) + len(rest)))
    replayed = await client.responses.retrieve(rid, stream=True, starting_after=0)
    async with asyncio.timeout(10):
        again = [event async for event in replayed]
    assert [e.sequence_number for e in again] == list(range(1, len(seen) + len(rest)))

    retrieved = await client.responses.retrieve(rid)
    assert retrieved.status == "cancelled" and retrieved == cancelled
    assert (await client.responses.cancel(rid)) == cancelled  # idempotent
    plain = await client.responses.create(model="sim", input="a slow one")
    assert plain.output_text.startswith(retrieved.output_text) and plain.usage is not None
    stat = stats.background[rid]
    assert stat.cancelled and stat.status == "cancelled" and stat.tokens < plain.usage.output_tokens
    assert stat.events == len(seen) + len(rest)

    done = await client.responses.create(model="sim", input="quick", background=True, store=True)
    await stats.wait_for(lambda s: s.background[done.id].status == "completed")
    with pytest.raises(BadRequestError):
        await client.responses.cancel(done.id)
    assert not stats.background[done.id].cancelled


async def test_sdk_knows_no_cancelled_event(client: AsyncOpenAI) -> None:
    """Why a cancelled response's stream just ends: the SDK's strict validation rejects a ``response.cancelled``
    event (its stream event union has none)."""
    response = {"id": "resp_x", "object": "response", "created_at": 0, "model": "sim", "status": "cancelled",
                "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
                "incomplete_details": None, "instructions": None, "metadata": {}}
    event = {"type": "response.cancelled", "response": response, "sequence_number": 0}
    raw = f"event: response.cancelled\ndata: {json.dumps(event)}\n\n"
    stream = await client.responses.create(model="sim", input="x", stream=True, extra_body={"sim": {"raw": raw}})
    with pytest.raises(APIResponseValidationError):
        async for _ in stream:
            pass
