"""What a run knows of the workflow it streams: each agent's status and answer so far, and how to
stop one agent. No I/O; the engine keeps it beside the run for clients that attach late."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any, Protocol

from .events import AgentEnd, Answer, Event, Producer

__all__ = ["Controller", "WorkflowState"]


class Controller(Protocol):
    """Something a client may stop part of: a workflow stops one of its agents by name."""

    def cancel(self, agent_name: str) -> bool: ...


class WorkflowState:
    """Each agent's status and answer so far, for the snapshot an attaching client gets."""

    def __init__(self, agents: list[str]) -> None:
        self.status = {name: "running" for name in agents}
        self.text: dict[str, list[str]] = {name: [] for name in agents}

    async def observe(self, batches: Producer) -> AsyncGenerator[Sequence[Event], None]:
        """Pass ``batches`` through, noting what each agent said and how it ended."""
        async with aclosing(batches) as stream:  # closing this closes the workflow, which stops its agents
            async for batch in stream:
                for event in batch:
                    if isinstance(event, Answer) and event.agent in self.text:
                        self.text[event.agent].append(event.content)
                    elif isinstance(event, AgentEnd) and event.agent in self.status:
                        self.status[event.agent] = event.outcome
                yield batch

    def snapshot(self) -> tuple[dict[str, Any], ...]:
        return tuple({"agent": name, "status": self.status[name], "content": "".join(self.text[name])}
                     for name in self.status)
