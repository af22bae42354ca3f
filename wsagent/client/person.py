"""A person's answers to a run's approval requests: asked on the terminal, or given by a flag.

An agent that wants to call a tool the server holds for approval sends ``approval_request`` and waits. The
client asks ``approve NAME(ARGUMENTS)? [y/N]`` on the terminal (stdin read without blocking the event loop;
several requests are asked one after another), or answers every request at once with ``--approve`` or
``--deny``. Without a terminal and without a flag it denies, and says so on stderr: a script never hangs
waiting for an answer no one can give. A question still open when the request is answered elsewhere (the
``approval`` event of another client) or the run ends is withdrawn.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any

from .display import TERMINAL, Display

__all__ = ["Approver", "Policy"]

#: What the run is told when a request is denied without a person asked.
DENIED_BY_FLAG = "denied by the client's --deny"
DENIED_UNASKED = "no one at a terminal to ask"


class Policy(Enum):
    """How the client answers approval requests."""

    ASK = "ask"  # a person at the terminal
    APPROVE = "approve"  # --approve
    DENY = "deny"  # --deny
    UNASKED = "unasked"  # no terminal and no flag: denied, said on stderr
    WATCH = "watch"  # watching someone else's run without a terminal or a flag: its owner answers


class Approver:
    """Answers the approval requests of the run a :class:`~wsagent.client.stream.StreamClient` shows.

    ``answer(call_id, approved, reason)`` sends the answer; :meth:`event` is given every event shown, before
    the display shows it (so that a withdrawn question ends its line before the display goes on)."""

    def __init__(self, answer: Callable[[str, bool, str | None], None], display: Display, policy: Policy) -> None:
        self.answer = answer
        self.display = display
        self.policy = policy
        self.asking: dict[str, asyncio.Task[None]] = {}
        self.open: str | None = None  # the call whose question is on the terminal
        self.turn = asyncio.Lock()  # one question at a time

    def event(self, event: dict[str, Any]) -> None:
        kind, call_id = event.get("type"), event.get("call_id")
        if kind == "approval_request" and isinstance(call_id, str):
            self._request(call_id, f"{event.get('name')}({event.get('arguments')})")
        elif kind == "approval" and isinstance(call_id, str):
            self._withdraw(call_id, "answered elsewhere")
        elif kind in TERMINAL:
            for pending in list(self.asking):
                self._withdraw(pending, "the run ended")

    def _request(self, call_id: str, call: str) -> None:
        if self.policy is Policy.APPROVE:
            self.answer(call_id, True, None)
        elif self.policy is Policy.DENY:
            self.answer(call_id, False, DENIED_BY_FLAG)
        elif self.policy is Policy.UNASKED:
            sys.stderr.write(f"{call} needs a person's approval and there is no terminal to ask on: denied "
                             "(--approve or --deny answer without asking)\n")
            self.answer(call_id, False, DENIED_UNASKED)
        elif self.policy is Policy.ASK and call_id not in self.asking:
            self.asking[call_id] = asyncio.ensure_future(self._ask(call_id, call))

    def _withdraw(self, call_id: str, why: str) -> None:
        task = self.asking.pop(call_id, None)
        if task is None:
            return
        if self.open == call_id:  # the question is on screen: end its line now, before the display goes on
            sys.stderr.write(f"({why})\n")
            sys.stderr.flush()
            self.open = None
        task.cancel()

    async def _ask(self, call_id: str, call: str) -> None:
        async with self.turn:
            self.display.pause()
            try:
                self.open = call_id
                sys.stderr.write(f"approve {call}? [y/N] ")
                sys.stderr.flush()
                reply = await self._line()
            finally:
                self.open = None
                self.display.resume()
        self.asking.pop(call_id, None)
        approved = reply.strip().lower() in ("y", "yes")
        self.answer(call_id, approved, None)

    async def _line(self) -> str:
        """What the person types on the terminal, up to Enter (an empty string at end of input: no answer, so no)."""
        fd = sys.stdin.fileno()
        loop = asyncio.get_running_loop()
        typed: asyncio.Future[str] = loop.create_future()

        def readable() -> None:
            if not typed.done():
                typed.set_result(os.read(fd, 4096).decode(errors="replace"))

        loop.add_reader(fd, readable)
        try:
            return await typed
        finally:
            loop.remove_reader(fd)

    async def close(self) -> None:
        """The client is done with the run: no question is left open."""
        tasks = list(self.asking.values())
        for call_id in list(self.asking):
            self._withdraw(call_id, "no answer sent")
        await asyncio.gather(*tasks, return_exceptions=True)
