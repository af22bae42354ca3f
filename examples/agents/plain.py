"""Your own agents without a framework: ``python -m wsagent.serve --agents examples/agents/plain.py:AGENTS``.

``countdown`` is an async generator; ``blocking`` is blocking code in a thread of its own (as a framework's
callback would be), handed over through a :class:`~wsagent.producers.ThreadBridge`.
Try: ``{"type": "run", "id": "r1", "prompt": "go", "agent": "countdown"}`` on ``/ws/chat``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from wsagent.events import Action, Answer, Event, Observation, Thinking
from wsagent.producers import AgentRequest, ThreadBridge


async def countdown(request: AgentRequest) -> AsyncIterator[Event]:
    yield Thinking(f"Counting down for: {request.prompt}")
    yield Action("clock()", call_id="c1", name="clock", arguments="{}")
    yield Observation(time.strftime("%H:%M:%S"), call_id="c1", name="clock")
    for n in range(5, 0, -1):
        await asyncio.sleep(0.05)
        yield Answer(f"{n}… ")
    yield Answer("liftoff.")


async def blocking(request: AgentRequest) -> AsyncIterator[Event | list[Event]]:
    bridge = ThreadBridge(limit=64)

    def work() -> None:  # blocking code, as a framework's own loop would be
        bridge.emit(Thinking("Working in a thread of my own."))
        for word in request.prompt.split():
            time.sleep(0.01)
            bridge.emit(Answer(word.upper() + " "))

    async for batch in bridge.stream(work):
        yield batch


AGENTS = {"countdown": countdown, "blocking": blocking}
