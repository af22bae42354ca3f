"""Agents for tests/test_producers.py, loaded with ``--agents tests/agents_fixture.py:AGENTS``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

from wsagent.core.events import Answer, Event
from wsagent.upstream.agents.producers import AgentRequest, Stopped, ThreadBridge

#: What the threaded agent saw: set when its emit raised Stopped (the run was cancelled).
STOPPED = threading.Event()


async def fails(request: AgentRequest) -> AsyncIterator[Event]:
    yield Answer("about to fail")
    raise RuntimeError("the framework's own bug\nwith a second line")


async def hangs(request: AgentRequest) -> AsyncIterator[Event]:
    yield Answer("waiting for ever")
    await asyncio.Event().wait()


async def flood(request: AgentRequest) -> AsyncIterator[Event | Sequence[Event]]:
    """A framework thread that writes far faster than any client reads, until the run stops it."""
    bridge = ThreadBridge(limit=32)

    def work() -> None:
        try:
            for n in range(10_000_000):
                bridge.emit(Answer(f"{n} "))
        except Stopped:
            STOPPED.set()
            raise

    async for batch in bridge.stream(work):
        yield batch


AGENTS = {"fails": fails, "hangs": hangs, "flood": flood}
