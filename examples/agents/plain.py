"""Your own agents without a framework: ``python -m wsagent.serve --agents examples/agents/plain.py:AGENTS``.

``countdown`` is an async generator; ``blocking`` is blocking code in a thread of its own (as a framework's
callback would be), handed over through a :class:`~wsagent.producers.ThreadBridge`; ``mailer`` asks a person
before it "sends" a mail, and takes what a person says meanwhile (docs/person-in-the-loop.md).
Try: ``{"type": "run", "id": "r1", "prompt": "go", "agent": "countdown"}`` on ``/ws/chat``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from wsagent.events import Action, Answer, Event, Observation, Thinking
from wsagent.producers import AgentRequest, ApprovalRequest, Steered, ThreadBridge, approval, steering


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


async def mailer(request: AgentRequest) -> AsyncIterator[Event]:
    mail = {"to": "team@example.com", "subject": request.prompt[:60]}
    yield ApprovalRequest("mail-1", "send_email", json.dumps(mail))  # then wait: the run waits with it
    decision = await approval("mail-1")
    for said in steering():  # messages a person sent meanwhile (a plain call: each is returned once)
        yield Steered(said)
        mail["note"] = said
    if not decision.approved:
        yield Answer(f"Not sent: {decision.reason or 'denied'}.")
        return
    yield Action(f"send_email({json.dumps(mail)})", call_id="mail-1", name="send_email", arguments=json.dumps(mail))
    yield Observation("queued for delivery", call_id="mail-1", name="send_email")
    yield Answer(f"Sent to {mail['to']}.")


AGENTS = {"countdown": countdown, "blocking": blocking, "mailer": mailer}
