"""What broke when wsagent was attacked, each reproduced before its fix."""

from __future__ import annotations

import asyncio
import json

import pytest

from wsagent.config import Settings
from wsagent.server import WsAgentServer
from wsagent.simulator import MAX_CHARS, MAX_TOKENS, _capped
from wsagent.tools import MAX_BITS, ToolBox, calculator, tool

from .conftest import text_reply, ws_connect


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
    capped = _capped({"tokens": "20000000", "pad": "20000", "long": str(10**9)})
    assert int(capped["tokens"]) == MAX_TOKENS
    assert int(capped["tokens"]) * int(capped["pad"]) <= MAX_CHARS and int(capped["long"]) == MAX_CHARS
